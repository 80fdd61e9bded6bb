"""The sample.py command line: PNG files and their A1111 metadata, LoRA tags, one-line errors, and a killed
--prompts-file job that resumes to exactly the images of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference import (
    MICRO_UNET,
    TINY_CLIP,
    TINY_VAE,
    build_text_encoder,
    build_unet,
    build_vae,
    kohya_lora_file,
    save_folder,
)

import sdjax
from sdjax.convert.tensor_files import save_safetensors

ROOT = Path(__file__).resolve().parents[1]


def _load_cli():
    spec = importlib.util.spec_from_file_location("sample_cli", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


@pytest.fixture(scope="module")
def torch_models():
    return {"unet": build_unet(MICRO_UNET), "vae": build_vae(TINY_VAE), "text_encoder": build_text_encoder(TINY_CLIP)}


@pytest.fixture(scope="module")
def folder(torch_models, tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("cli") / "tiny-sd", **torch_models)


@pytest.fixture(scope="module")
def pipe(folder):
    return sdjax.load_pipeline(folder)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = CLI.cli([str(a) for a in argv])
    return code, capsys.readouterr().err


def parameters(path: Path) -> str:
    with Image.open(path) as image:
        return image.text["parameters"]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.fusion_emitters  # sample.py's image 1 of 2 against the image drawn alone
def test_writes_pngs_with_a1111_parameters(folder, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["a red cube", "--model", folder, "--steps", 3, "-n", 2, "--seed", 5, "--scheduler", "EULER A"]
    args += ["--negative-prompt", "blurry", "--guidance", 6.5, "--out", out, "--no-progress"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["00000-5.png", "00001-6.png", "grid-00000-5.png"]
    assert parameters(out / "00001-6.png") == (
        "a red cube\nNegative prompt: blurry\n"
        "Steps: 3, Sampler: Euler a, CFG scale: 6.5, Seed: 6, Size: 64x64, Model: tiny-sd"
    )
    expected = pipe.generate(
        "a red cube", "blurry", num_inference_steps=3, scheduler="euler_a", guidance_scale=6.5, seed=6
    )
    np.testing.assert_array_equal(pixels(out / "00001-6.png"), expected[0])
    assert pixels(out / "grid-00000-5.png").shape == (64, 128, 3)
    # A second run adds images after the existing ones (A1111 numbering); nothing is overwritten.
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert {"00002-5.png", "00003-6.png"} <= {p.name for p in out.iterdir()}
    np.testing.assert_array_equal(pixels(out / "00003-6.png"), pixels(out / "00001-6.png"))


def test_a_single_file_model_compiles_before_its_weights_are_read(folder, pipe, tmp_path, capsys):
    """A `.safetensors` checkpoint (here with --vae and a two-vector --embedding) is compiled from its header,
    configs and the embedding's shape, then loaded, as a folder is: the compiler's memory and the weights are
    never resident together; the image is `generate`'s. A `.ckpt` pickle has no header: it is loaded first."""
    single = pipe.save_single_file(tmp_path / "tiny.safetensors")
    width = pipe.text_encoder.config.hidden_size
    embedding = tmp_path / "Pixel-Art.safetensors"
    save_safetensors(embedding, {"emb_params": np.random.default_rng(0).standard_normal((2, width), np.float32)})
    out = tmp_path / "out"
    args = ["a Pixel-Art cube", "--model", single, "--config", folder, "--vae", single, "--embedding", embedding]
    code, err = run_cli(capsys, *args, "--steps", 3, "--seed", 5, "--out", out)
    assert code == 0, err
    assert 0 <= err.index("compiling (") < err.index("loading "), err
    expected = pipe.load_textual_inversion(embedding).generate("a Pixel-Art cube", num_inference_steps=3, seed=5)
    np.testing.assert_array_equal(pixels(out / "00000-5.png"), expected[0])
    import torch
    from safetensors.numpy import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({k: torch.from_numpy(v) for k, v in load_file(single).items()}, ckpt)
    assert CLI.model_shapes(CLI.parse_args(["x", "--model", str(ckpt), "--config", str(folder)])) is None


def test_img2img_metadata_and_lora_tags(folder, pipe, torch_models, tmp_path, capsys):
    """`<lora:name:w>` tags load LoRAs from --lora-dir at that weight; the tag stays in the metadata."""
    loras = tmp_path / "loras"
    loras.mkdir()
    lora = kohya_lora_file(loras / "style.safetensors", torch_models, seed=1)
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    prompt = "a cat <lora:style:0.6>"
    args = [prompt, "--model", folder, "--steps", 4, "--lora-dir", loras, "--init-image", init, "--strength", 0.5]
    code, err = run_cli(capsys, *args, "--clip-skip", 1, "--out", out, "--no-progress")
    assert code == 0, err
    assert parameters(out / "00000-0.png").startswith(
        f"{prompt}\nSteps: 4, Sampler: PLMS, CFG scale: 7.5"
    )  # the model's own
    assert parameters(out / "00000-0.png").endswith("Denoising strength: 0.5, Clip skip: 2")
    expected = pipe.load_lora(lora, 0.6).generate(
        "a cat", num_inference_steps=4, image=init, strength=0.5, clip_skip=1, seed=0
    )
    np.testing.assert_array_equal(pixels(out / "00000-0.png"), expected[0])
    plain = pipe.generate("a cat", num_inference_steps=4, image=init, strength=0.5, clip_skip=1, seed=0)
    assert np.abs(plain.astype(int) - expected.astype(int)).mean() > 0.5  # the LoRA did something


def _truncated_model(folder: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return broken


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing model", "model path /nonexistent/model does not exist"),
        ("not a model", "is not a diffusers model folder"),
        ("truncated weights", "truncated"),
        ("size", "height and width must be positive multiples of 8, got 60x64"),
        ("scheduler", "unknown scheduler 'euler_x'; choose one of ddim, pndm, pndm_prk, lms"),
        ("init image", "does not exist"),
        ("unreadable init image", "cannot read init image"),
        ("mask size", "mask is 32x32 but the init image is 64x64"),
        ("strength", "strength must be in [0, 1], got 1.5"),
        ("lora tag without dir", "pass --lora-dir DIR"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys, case, message):
    init, mask, junk = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "junk.png"
    Image.new("RGB", (64, 64)).save(init)
    Image.new("L", (32, 32)).save(mask)
    junk.write_bytes(b"not an image")
    model, extra, prompt = folder, [], "a cat"
    if case == "missing model":
        model = "/nonexistent/model"
    elif case == "not a model":
        model = tmp_path
    elif case == "truncated weights":
        model = _truncated_model(folder, tmp_path)
    elif case == "size":
        extra = ["--height", 60]
    elif case == "scheduler":
        extra = ["--scheduler", "euler_x"]
    elif case == "init image":
        extra = ["--init-image", tmp_path / "nowhere.png"]
    elif case == "unreadable init image":
        extra = ["--init-image", junk]
    elif case == "mask size":
        extra = ["--init-image", init, "--mask", mask]
    elif case == "strength":
        extra = ["--init-image", init, "--strength", 1.5]
    elif case == "lora tag without dir":
        prompt = "a cat <lora:style:0.5>"
    code, err = run_cli(
        capsys, prompt, "--model", model, "--steps", 2, "--out", tmp_path / "o", "--no-progress", *extra
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: ") and message in lines[0], err
    assert not list((tmp_path / "o").glob("*.png")) if (tmp_path / "o").exists() else True


# Runs sample.py in a process that SIGKILLs itself when it is about to write its third image (during the
# second batch): a deterministic stand-in for a job killed at a random time.
_KILLED_RUN = """
import os, runpy, signal, sys
import sdjax.images
save, calls = sdjax.images.save_png, []
def save_or_die(*args, **kwargs):
    calls.append(args[0])
    if len(calls) == 3:
        open(str(args[0]).replace(".png", ".png.0123abcd.sdjax-tmp").replace("/0", "/.0"), "wb").write(b"half a png")
        os.kill(os.getpid(), signal.SIGKILL)
    return save(*args, **kwargs)
sdjax.images.save_png = save_or_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_job(folder: Path, prompts: Path, out: Path, cache: Path, killed: bool = False) -> subprocess.CompletedProcess:
    argv = [str(ROOT / "sample.py"), "--model", str(folder), "--prompts-file", str(prompts)]
    argv += ["--steps", "3", "-n", "2", "--seed", "100", "--out", str(out), "--cache-dir", str(cache)]
    prefix = [sys.executable, "-c", _KILLED_RUN] if killed else [sys.executable]
    return subprocess.run(prefix + argv, capture_output=True, text=True, timeout=600)


def test_a_prompts_file_with_edits_compiles_once(folder, pipe, tmp_path, capsys):
    """Batches with and without prompt editing, with stacks of 1, 2 and 3 texts, run in one program: the
    job pads every batch to its deepest stack (and longest prompt), and each image is `generate`'s."""
    prompts = tmp_path / "prompts.txt"
    lines = ["a red apple", "a [cat:dog:0.5] photo", "[a|b|c] house"]
    prompts.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["--prompts-file", prompts, "--model", folder, "--steps", 4, "--seed", 2, "--out", out]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert err.count("compiling (") == 1, err
    for k, line in enumerate(lines):
        expected = pipe.generate(line, num_inference_steps=4, seed=2 + k)
        np.testing.assert_array_equal(pixels(out / f"{k:05d}-{2 + k}.png"), expected[0])


def test_killed_prompts_file_job_resumes_to_the_same_images(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    lines = ["# a comment", "a red apple", "", "a green (pear:1.2)", "a blue car", "a yellow boat", "a pink cat"]
    prompts.write_text("\n".join(lines) + "\n")
    names = ["00000-100.png", "00001-101.png", "00002-102.png", "00003-103.png", "00004-104.png"]
    cache = tmp_path / "xla-cache"

    whole = tmp_path / "whole"
    job = _run_job(folder, prompts, whole, cache)
    assert job.returncode == 0, job.stderr
    assert sorted(p.name for p in whole.iterdir()) == names

    resumed = tmp_path / "resumed"
    job = _run_job(folder, prompts, resumed, cache, killed=True)
    assert job.returncode == -signal.SIGKILL, job.stderr
    assert sorted(p.name for p in resumed.iterdir()) == [".00002-102.png.0123abcd.sdjax-tmp", *names[:2]]
    job = _run_job(folder, prompts, resumed, cache)
    assert job.returncode == 0, job.stderr
    assert "2 of 5 images already in" in job.stderr
    assert sorted(p.name for p in resumed.iterdir()) == names  # no temporary file left, nothing drawn twice
    for name in names:
        np.testing.assert_array_equal(pixels(resumed / name), pixels(whole / name))
        assert parameters(resumed / name) == parameters(whole / name)
    assert list(cache.iterdir()), "the persistent compilation cache stayed empty"
