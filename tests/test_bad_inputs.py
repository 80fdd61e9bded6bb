"""A corpus of bad inputs, tried as a new user would, through sample.py, `python -m train` and the Python API.

Each case states what the user expects: one line on stderr that says what is wrong (and exit status 2)
for the command lines, a ValueError with that line for the API; never a traceback, a silently wrong
result, or a file of earlier work overwritten. The cases are grouped by class: bad values, bad files,
bad images, output folders, runs whose work must not be lost, and numbers that must stay finite.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample as sample_cli  # the command line, sample.py at the repository root
import sdjax
from sdjax import testing

ROOT = Path(__file__).resolve().parents[1]


def sample(capsys, *argv) -> tuple[int, list[str]]:
    """sample.py's exit status and its stderr lines (progress messages off)."""
    try:
        code = sample_cli.cli([str(a) for a in argv] + ["--no-progress"])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def train(capsys, *argv) -> tuple[int, list[str]]:
    """python -m train's exit status and its stderr lines (logging of progress off)."""
    from train.__main__ import main

    code = main([str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    return code, [line for line in lines if line.strip() and "WARNING:absl" not in line]


def assert_one_line(result, *fragments: str) -> None:
    code, lines = result
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines


# ---------------------------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder of bad and good input files."""
    root = tmp_path_factory.mktemp("corpus")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(root / "init.png")
    Image.new("RGB", (2, 2), (200, 30, 30)).save(root / "tiny.png")
    Image.new("L", (32, 32), 255).save(root / "mask32.png")
    (root / "not_an_image.png").write_text("hello")
    (root / "prompts_binary.txt").write_bytes(b"\xff\xfe\x00a\x00 \x00c\x00a\x00t" + bytes(range(256)))
    (root / "prompts_empty.txt").write_text("# only a comment\n\n")
    (root / "prompts_nul.txt").write_bytes(b"a cat\x00\x00\n")
    (root / "a_file").write_text("I am a file")
    (root / "garbage.safetensors").write_bytes(os.urandom(300))
    (root / "empty.safetensors").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random-weight diffusers folder (the one-level MICRO_UNET: these tests check input handling)."""
    arch = {"unet": testing.MICRO_UNET, "vae": testing.TINY_VAE, "text_encoder": testing.TINY_CLIP}
    return testing.random_pipeline(arch).save_pretrained(tmp_path_factory.mktemp("tinymodel") / "tiny")


# ---------------------------------------------------------------------------------------------- sample.py

# (id, arguments (FILES/ replaced by the files fixture's folder), what the one line must say)
SAMPLE_CASES = [
    ("no-prompt", [], ["give either a prompt or --prompts-file"]),
    ("prompt-and-file", ["a cat", "--prompts-file", "FILES/prompts_empty.txt"], ["give either"]),
    ("steps-zero", ["a cat", "--steps", "0"], ["num_inference_steps must be >= 1"]),
    ("steps-not-a-number", ["a cat", "--steps", "ten"], ["--steps", "invalid int value"]),
    ("steps-huge", ["a cat", "--steps", "100000"], ["num_inference_steps must be <= 1000"]),
    ("guidance-nan", ["a cat", "--guidance", "nan"], ["guidance_scale must be a finite number"]),
    ("guidance-inf", ["a cat", "--guidance", "inf"], ["guidance_scale must be a finite number"]),
    ("rescale-out-of-range", ["a cat", "--guidance-rescale", "2"], ["guidance_rescale must be in [0, 1]"]),
    ("rescale-nan", ["a cat", "--guidance-rescale", "nan"], ["guidance_rescale must be a finite number"]),
    ("strength-above-one", ["a cat", "--init-image", "FILES/init.png", "--strength", "1.5"], ["strength must be"]),
    ("strength-nan", ["a cat", "--init-image", "FILES/init.png", "--strength", "nan"], ["strength must be a finite"]),
    ("clip-skip-negative", ["a cat", "--clip-skip", "-1"], ["clip_skip must be >= 0"]),
    ("batch-zero", ["a cat", "-n", "0"], ["--batch-size must be >= 1"]),
    ("height-not-multiple", ["a cat", "--height", "66", "--width", "64"], ["positive multiples of 4"]),
    ("height-negative", ["a cat", "--height", "-64"], ["positive multiples"]),
    ("size-beyond-memory", ["a cat", "--height", "100000", "--width", "100000"], ["largest square size"]),
    ("size-beyond-memory-tiled", ["a cat", "--height", "400000", "--width", "400000", "--vae-tiling"], ["GiB"]),
    ("unknown-scheduler", ["a cat", "--scheduler", "eulerr"], ["scheduler"]),
    ("unknown-dtype", ["a cat", "--dtype", "float64"], ["--dtype", "invalid choice"]),
    ("unknown-option", ["a cat", "--stepz", "3"], ["unrecognized arguments"]),
    ("model-missing", ["a cat", "--model", "FILES/nope"], ["does not exist"]),
    ("model-is-garbage", ["a cat", "--model", "FILES/garbage.safetensors"], ["garbage.safetensors"]),
    ("model-is-empty", ["a cat", "--model", "FILES/empty.safetensors"], ["empty.safetensors"]),
    ("vae-missing", ["a cat", "--vae", "FILES/nope.safetensors"], ["does not exist"]),
    ("init-missing", ["a cat", "--init-image", "FILES/nope.png"], ["init image", "does not exist"]),
    ("init-not-an-image", ["a cat", "--init-image", "FILES/not_an_image.png"], ["cannot read init image"]),
    ("init-2x2", ["a cat", "--init-image", "FILES/tiny.png"], ["2x2", "minimum"]),
    ("mask-without-init", ["a cat", "--mask", "FILES/mask32.png"], ["--mask needs --init-image"]),
    ("mask-other-size", ["a cat", "--init-image", "FILES/init.png", "--mask", "FILES/mask32.png"], ["mask is 32x32"]),
    ("prompts-missing", ["--prompts-file", "FILES/nope.txt"], ["prompts file", "does not exist"]),
    ("prompts-binary", ["--prompts-file", "FILES/prompts_binary.txt"], ["prompts_binary.txt", "not UTF-8"]),
    ("prompts-nul", ["--prompts-file", "FILES/prompts_nul.txt"], ["prompts_nul.txt", "NUL"]),
    ("prompts-empty", ["--prompts-file", "FILES/prompts_empty.txt"], ["holds no prompt"]),
    ("lora-scale-not-a-number", ["a cat", "--lora", "FILES/init.png:abc"], ["'abc'", "not a number"]),
    ("lora-scale-nan", ["a cat", "--lora", "FILES/init.png:nan"], ["finite number"]),
    ("lora-missing", ["a cat", "--lora", "FILES/nope.safetensors"], ["nope.safetensors"]),
    ("lora-garbage", ["a cat", "--lora", "FILES/garbage.safetensors"], ["garbage.safetensors"]),
    ("lora-empty", ["a cat", "--lora", "FILES/empty.safetensors"], ["empty.safetensors", "too short"]),
    ("lora-tag-without-dir", ["a cat <lora:style:0.5>"], ["--lora-dir"]),
    ("embedding-missing", ["a cat", "--embedding", "FILES/nope.safetensors"], ["nope.safetensors"]),
    ("out-is-a-file", ["a cat", "--out", "FILES/a_file"], ["is a file, not a folder"]),
    ("out-cannot-be-made", ["a cat", "--out", "/proc/sdjax-out"], ["/proc/sdjax-out"]),
    ("mesh-bad", ["a cat", "--mesh", "data=three"], ["mesh"]),
    ("mesh-too-many-devices", ["a cat", "--mesh", "data=3"], ["has 3 devices but there are"]),
    ("seed-negative", ["a cat", "--seed", "-1"], ["seeds are integers in [0, 4294967295]", "no random seed -1"]),
    ("seed-too-large", ["a cat", "--seed", "99999999999999999999"], ["seeds are integers in [0, 4294967295]"]),
    ("seed-overflows-the-batch", ["a cat", "--seed", "4294967295", "-n", "2"], ["got 4294967296"]),
    ("micro-batch-zero", ["a cat", "--micro-batch", "0"], ["micro_batch_size must be >= 1"]),
    ("init-is-a-folder", ["a cat", "--init-image", "FILES/"], ["is a folder, not an image file"]),
    ("prompts-is-a-folder", ["--prompts-file", "FILES/"], ["is a folder"]),
    ("cache-dir-is-a-file", ["a cat", "--cache-dir", "FILES/a_file"], ["compilation cache", "is a file"]),
    ("model-is-an-image", ["a cat", "--model", "FILES/init.png"], ["init.png"]),
    ("multi-host-half-given", ["a cat", "--num-processes", "2"], ["--coordinator"]),
]


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses_bad_input_in_one_line(capsys, files, tmp_path, args, fragments):
    argv = [a.replace("FILES/", f"{files}/") for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert_one_line(sample(capsys, *argv), *fragments)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_sample_weights_that_are_not_finite_are_refused_at_load(capsys, tmp_path, tiny_folder):
    """A model whose weights hold NaN gives one line naming the tensor, not a black image."""

    def poison(tensors):
        name = sorted(k for k in tensors if k.endswith("conv_in.weight"))[0]
        tensors[name][0, 0, 0, 0] = np.nan
        return name

    broken, name = _altered_copy(tiny_folder, tmp_path / "nan-model", "unet", poison)
    assert_one_line(sample(capsys, "a cat", "--model", broken, "--out", tmp_path / "o", "--steps", 2), name, "NaN")
    assert not list((tmp_path / "o").glob("*.png"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("layers_per_block", "two", "layers_per_block"), ("block_out_channels", 32, "block_out_channels")],
)
def test_sample_a_config_field_of_the_wrong_type_is_named(capsys, tmp_path, tiny_folder, field, value, message):
    import shutil

    broken = tmp_path / "bad-config"
    shutil.copytree(tiny_folder, broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    config[field] = value
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    assert_one_line(sample(capsys, "a cat", "--model", broken, "--out", tmp_path / "o"), "config.json", message)


def test_sample_integer_weights_are_refused(capsys, tmp_path, tiny_folder):
    """Integer tensors where float weights belong are refused by name, not read as floats."""

    def to_integers(tensors):
        name = sorted(tensors)[0]
        tensors[name] = (tensors[name] * 1000).astype(np.int16)
        return name

    broken, name = _altered_copy(tiny_folder, tmp_path / "int-model", "vae", to_integers)
    assert_one_line(sample(capsys, "a cat", "--model", broken, "--out", tmp_path / "o", "--steps", 2), name, "I16")


def test_sample_a_pickle_named_safetensors_is_refused_and_never_run(capsys, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps(Exploit(), protocol=2))
    assert_one_line(sample(capsys, "a cat", "--model", bad, "--out", tmp_path / "o"), "pickle")
    assert_one_line(sample(capsys, "a cat", "--lora", bad, "--out", tmp_path / "o"), "pickle")
    assert not marker.exists()


def test_sample_a_non_finite_image_is_reported_not_saved_black(capsys, tmp_path, tiny_folder):
    """Finite weights that overflow to Inf/NaN in the decoder: the image is reported and not written."""

    def overflow(tensors):
        name = next(k for k in tensors if k.endswith("decoder.conv_in.weight"))
        tensors[name] = tensors[name] * np.float32(3e38)
        return name

    broken, _ = _altered_copy(tiny_folder, tmp_path / "overflow-model", "vae", overflow)
    out = tmp_path / "o"
    assert_one_line(sample(capsys, "a cat", "--model", broken, "--out", out, "--steps", 2), "NaN/Inf", "not saved")
    assert not list(out.glob("*.png"))


def _altered_copy(source: Path, target: Path, component: str, alter) -> tuple[Path, str]:
    """A copy of a diffusers folder whose `component` weights went through `alter(tensors) -> name changed`."""
    import shutil

    from sdjax.convert.tensor_files import SafetensorsFile, save_safetensors

    shutil.copytree(source, target)
    path = next((target / component).glob("*.safetensors"))
    tensors = {k: np.array(v) for k, v in SafetensorsFile(path).items()}
    name = alter(tensors)
    save_safetensors(path, tensors)
    return target, name


# ---------------------------------------------------------------------------------------------- sample.py: work kept


def test_sample_never_overwrites_a_grid(capsys, tmp_path):
    """A grid whose name is taken (a first run's, since moved or renamed images) gets a fresh name."""
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "grid-00000-0.png")
    before = (out / "grid-00000-0.png").read_bytes()
    code, lines = sample(capsys, "an emoji of red apple", "-n", "2", "--steps", "2", "--out", out)
    assert code == 0, lines
    assert (out / "grid-00000-0.png").read_bytes() == before
    assert (out / "grid-00000-0-1.png").is_file()


def test_sample_prompts_file_resumes_by_content(capsys, tmp_path):
    """Images already in OUT are skipped only when they record the prompt and settings this command would
    draw; an edited prompts file is a one-line error (nothing redrawn or lost), --overwrite redraws."""
    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("an emoji of red apple\nan emoji of blue heart\n")
    args = ["--prompts-file", prompts, "--steps", "2", "--out", out]
    assert sample(capsys, *args)[0] == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(first) == ["00000-0.png", "00001-1.png"]

    assert sample(capsys, *args) == (0, [])  # the same job again: nothing to draw
    prompts.write_text("an emoji of red apple\nan emoji of green star\n")
    assert_one_line(sample(capsys, *args), "00001-1.png", "blue heart", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == first
    assert_one_line(sample(capsys, *args[:2], "--steps", "3", "--out", out), "00000-0.png")
    assert_one_line(sample(capsys, *args, "--height", "32", "--width", "32"), "00000-0.png")  # another size

    assert sample(capsys, *args, "--overwrite")[0] == 0
    after = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert after["00000-0.png"] == first["00000-0.png"]  # unchanged prompt: kept
    assert after["00001-1.png"] != first["00001-1.png"]
    assert "green star" in Image.open(out / "00001-1.png").info["parameters"]


# ---------------------------------------------------------------------------------------------- Python API


@pytest.fixture(scope="module")
def demo():
    return sdjax.load_pipeline(None)


API_CASES = [
    ("guidance-nan", dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
    ("guidance-string", dict(guidance_scale="high"), "guidance_scale must be a number"),
    ("steps-fraction", dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    ("steps-string", dict(num_inference_steps="4"), "num_inference_steps must be an integer"),
    ("height-fraction", dict(height=64.5, width=64), "height must be an integer"),
    ("size-beyond-memory", dict(height=100000, width=100000), "largest square size"),
    ("strength-nan", dict(image=np.zeros((64, 64, 3), np.uint8), strength=math.nan), "strength must be a finite"),
    ("init-2x2", dict(image=np.zeros((2, 2, 3), np.uint8)), "minimum"),
    ("init-float-out-of-range", dict(image=np.full((64, 64, 3), 7.0, np.float32)), "[0, 1]"),
    ("latents-nan", dict(latents=np.full((1, 16, 16, 4), np.nan, np.float32)), "NaN/Inf"),
    ("loras-bad-scale", dict(loras=[({}, "abc")]), "LoRA scale must be a finite number"),
    ("seeds-wrong-count", dict(seed=[1, 2, 3]), "seeds"),
    ("seed-negative", dict(seed=-1), "seeds are integers in [0, 4294967295]"),
    ("seed-fraction", dict(seed=[0.5]), "seeds are integers"),
    ("rescale-above-one", dict(guidance_rescale=1.5), "guidance_rescale must be in [0, 1]"),
    ("mask-without-image", dict(mask_image=np.zeros((64, 64), np.uint8)), "mask_image needs an init image"),
    ("init-wrong-dtype", dict(image=np.zeros((64, 64, 3), np.int32)), "int32"),
    ("init-wrong-shape", dict(image=np.zeros((64, 64, 5), np.uint8)), "(H, W, 3)"),
    ("scheduler-not-a-scheduler", dict(scheduler=5), "scheduler must be a name"),
    ("scheduler-unknown", dict(scheduler="eulerr"), "unknown scheduler 'eulerr'"),
    ("mesh-bad", dict(mesh="data=x"), "bad mesh spec"),
    ("no-init-images", dict(image=[]), "0 init images for 1 prompts"),
    ("strength-zero", dict(image=np.zeros((64, 64, 3), np.uint8), strength=0.0), "leaves no denoising step"),
    ("latents-shape", dict(latents=np.zeros((1, 3, 3, 4), np.float32)), "latents must have shape"),
    ("unknown-option", dict(guidance=7.0), "unknown option 'guidance'"),
]


@pytest.mark.parametrize(("options", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_options_in_one_line(demo, options, message):
    with pytest.raises((ValueError, TypeError)) as info:  # TypeError: an argument of the wrong kind
        demo.generate("an emoji of red apple", num_inference_steps=options.pop("num_inference_steps", 2), **options)
    text = str(info.value)
    assert message in text and "\n" not in text, text


@pytest.mark.parametrize("scale", ["abc", math.inf, None, {"unet": 1.0, "vae": 2.0}])
def test_api_load_lora_refuses_a_bad_scale(demo, scale, tmp_path):
    with pytest.raises(ValueError, match="LoRA scale"):
        demo.load_lora(tmp_path / "unused.safetensors", scale=scale)


def test_api_generate_reports_non_finite_images(demo):
    import dataclasses

    vae = demo.params["vae"]
    conv_in = vae["decoder"]["conv_in"]
    huge = {**vae, "decoder": {**vae["decoder"], "conv_in": {**conv_in, "kernel": conv_in["kernel"] * 3e38}}}
    broken = dataclasses.replace(demo, params={**demo.params, "vae": huge})
    with pytest.raises(ValueError, match=r"image\(s\) 0 came out NaN/Inf"):
        broken.generate("an emoji of red apple", num_inference_steps=2)


def test_api_load_pipeline_of_a_missing_folder(tmp_path):
    with pytest.raises((ValueError, OSError), match="does not exist"):
        sdjax.load_pipeline(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- python -m train


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    folder = tmp_path_factory.mktemp("squares")
    for i, rgb in enumerate([(230, 30, 30), (30, 190, 60)]):
        pixels = np.full((24, 24, 3), 255, np.uint8)
        pixels[4:20, 4:20] = rgb
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square {i}\n")
    return folder


def _train_args(squares, output, *extra):
    return ["--model", "random:tiny", "--data", squares, "--output", output, "--resolution", "16", *extra]


TRAIN_CASES = [
    ("lr-nan", ["--learning-rate", "nan"], ["learning_rate must be a finite number"]),
    ("lr-inf", ["--learning-rate", "inf"], ["learning_rate must be a finite number"]),
    ("lr-negative", ["--learning-rate", "-1e-4"], ["learning_rate must be > 0"]),
    ("lr-text", ["--learning-rate", "fast"], ["--learning-rate takes a float"]),
    ("steps-zero", ["--steps", "0"], ["steps must be >= 1"]),
    ("steps-text", ["--steps", "two"], ["--steps takes a int"]),
    ("batch-zero", ["--batch-size", "0"], ["batch_size must be >= 1"]),
    ("resolution-60", ["--resolution", "60"], ["resolution must be a positive multiple of 8"]),
    ("adam-b1", ["--adam-b1", "1.5"], ["adam_b1 and adam_b2 must be in [0, 1)"]),
    ("adam-eps-zero", ["--adam-eps", "0"], ["adam_eps must be > 0"]),
    ("grad-norm-negative", ["--max-grad-norm", "-1"], ["max_grad_norm must be >= 0"]),
    ("ema-one", ["--ema-decay", "1"], ["ema_decay must be in [0, 1)"]),
    ("noise-offset-nan", ["--noise-offset", "nan"], ["noise_offset must be a finite number"]),
    ("lora-rank-zero", ["--lora-rank", "0"], ["lora_rank must be >= 1"]),
    ("lora-alpha-zero", ["--lora-alpha", "0"], ["lora_alpha must be > 0"]),
    ("mode-unknown", ["--mode", "finetune"], ["mode must be one of"]),
    ("nan-policy-unknown", ["--nan-policy", "ignore"], ["nan_policy must be one of ('stop', 'skip')"]),
    ("overwrite-not-bool", ["--overwrite", "maybe"], ["--overwrite takes true or false"]),
    ("log-every-zero", ["--log-every", "0"], ["log_every must be >= 1"]),
    ("unknown-option", ["--learning-rat", "1e-4"], ["unknown option --learning-rat"]),
    ("positional", ["stray"], ["unexpected argument 'stray'"]),
    ("missing-value", ["--steps"], ["--steps needs a value"]),
    ("config-missing", ["--config", "FILES/nope.py"], ["config file", "does not exist"]),
    ("data-missing", ["--data", "FILES/nope"], ["does not exist"]),
    ("model-missing", ["--model", "FILES/nope"], ["does not exist"]),
    ("output-is-a-file", ["--output", "FILES/a_file"], ["is a file, not a folder"]),
    ("output-cannot-be-made", ["--output", "/proc/sdjax-run"], ["cannot create the output folder"]),
    ("data-is-a-file", ["--data", "FILES/a_file"], ["is a file: give the folder of training images"]),
    ("seed-negative", ["--seed", "-5"], ["seed must be in [0, 4294967295]"]),
    ("mesh-too-many-devices", ["--mesh", "data=3"], ["has 3 devices but there are"]),
    ("random-architecture-unknown", ["--model", "random:nope"], ["unknown architecture 'nope'"]),
    ("scratch-unknown", ["--scratch", "foo"], ["scratch takes components of"]),
    ("placeholder-empty", ["--placeholder-token", " "], ["placeholder_token must not be empty"]),
    ("sample-every-negative", ["--sample-every", "-1"], ["sample_every must be >= 0"]),
    ("config-variant-unknown", ["--config", "configs/sd15_full.py:huge"], ["unknown variant 'huge'"]),
    ("export-dtype-unknown", ["--export-dtype", "int8"], ["export_dtype must be float32, float16 or bfloat16"]),
]


@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_input_in_one_line(capsys, files, squares, tmp_path, args, fragments):
    argv = [str(a).replace("FILES/", f"{files}/") for a in _train_args(squares, tmp_path / "run", *args)]
    assert_one_line(train(capsys, *argv), *fragments)
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing written


def test_train_a_config_file_with_wrong_types_names_the_field(capsys, squares, tmp_path):
    config = tmp_path / "bad_config.py"
    config.write_text(
        "from train.config import TrainConfig\n\n"
        "def get_config(variant=None):\n"
        "    return TrainConfig().replace(steps='ten')\n"
    )
    assert_one_line(
        train(capsys, "--config", config, *_train_args(squares, tmp_path / "run")), "steps takes an integer"
    )
    config.write_text(
        "from train.config import TrainConfig\n\n"
        "def get_config(variant=None):\n"
        "    return TrainConfig().replace(sample_prompts='a cat')\n"
    )
    assert_one_line(train(capsys, "--config", config, *_train_args(squares, tmp_path / "run")), "sample_prompts")


def _earlier_run(folder: Path, *names: str) -> dict[str, bytes]:
    """A folder with an earlier run's files (no checkpoint); returns their bytes."""
    folder.mkdir(parents=True)
    written = {}
    for name in names:
        path = folder / name
        if name == "final":
            (path / "unet").mkdir(parents=True)
            path = path / "unet" / "diffusion_pytorch_model.safetensors"
        path.write_bytes(name.encode() * 10)
        written[str(path.relative_to(folder))] = path.read_bytes()
    return written


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "names",
    [("final", "metrics.jsonl", "config.json"), ("metrics.jsonl",), ("loss.png",), ("config.json",)],
    ids=["finished-run", "metrics-only", "loss-plot-only", "other-config"],
)
def test_train_refuses_an_output_folder_of_an_earlier_run(capsys, squares, tmp_path, names):
    """A folder holding another (or a finished) run's files and no checkpoint is refused, untouched."""
    run = tmp_path / "run"
    before = _earlier_run(run, *names)
    assert_one_line(train(capsys, *_train_args(squares, run)), "no checkpoint", "--overwrite true")
    assert _contents(run) == before


def test_train_nan_weights_in_the_start_model_are_refused(capsys, squares, tmp_path, tiny_folder):
    def poison(tensors):
        name = next(k for k in sorted(tensors) if np.issubdtype(tensors[k].dtype, np.floating))
        tensors[name].reshape(-1)[0] = np.inf
        return name

    broken, name = _altered_copy(tiny_folder, tmp_path / "nan-model", "text_encoder", poison)
    args = ["--model", broken, "--data", squares, "--output", tmp_path / "run", "--resolution", "16"]
    assert_one_line(train(capsys, *args), name)
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_data_folder_problems_are_one_line(capsys, files, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line(train(capsys, *_train_args(empty, tmp_path / "r1")), "no usable images")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0.png").write_text("not a png")
    (broken / "0.txt").write_text("a cat")
    assert_one_line(train(capsys, *_train_args(broken, tmp_path / "r2")), "0.png")


def test_corpus_size():
    """The corpus holds at least 60 cases (the parametrised ones, plus the tests above)."""
    assert len(SAMPLE_CASES) + len(API_CASES) + len(TRAIN_CASES) >= 60
    assert json.dumps([c[0] for c in SAMPLE_CASES + API_CASES + TRAIN_CASES])
