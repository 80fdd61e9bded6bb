"""python -m train on tiny models: the loss falls, 8 devices and 2 processes give the 1-device numbers, a
killed run resumes bit for bit, and every mode's export loads in sdjax and in diffusers."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from reference import rel_l2

import sdjax
from sdjax import testing
from sdjax.convert.tensor_files import SafetensorsFile
from train.__main__ import parse
from train.config import (
    FIELDS,
    ControlNetTraining,
    DreamBooth,
    Images,
    LoRA,
    Objective,
    Optim,
    Outputs,
    Parallel,
    TextualInversion,
    TrainConfig,
)
from train.data import DataError, scan_folder
from train.loop import run

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (230, 30, 30), "green": (30, 190, 60), "blue": (40, 60, 230), "yellow": (240, 210, 20)}


# The smallest model of the SD architecture that exercises every part of training (sdjax.testing.MICRO).
MICRO = testing.MICRO


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The MICRO model with random weights (norm scales and biases too), as a diffusers folder."""
    return testing.random_pipeline(MICRO).save_pretrained(tmp_path_factory.mktemp("train") / "base")


def make_squares(folder: Path, sidecars: bool = False) -> Path:
    """Four 72x80 images of coloured squares on white, captioned 'a <colour> square'."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        pixels = np.full((72, 80, 3), 255, np.uint8)
        pixels[16 + 4 * i : 56, 20:60] = rgb
        Image.fromarray(pixels).save(folder / f"{i}.png")
        if sidecars:
            (folder / f"{i}.txt").write_text(f"a {name} square\n")
        records.append({"file_name": f"{i}.png", "text": f"a {name} square"})
    if not sidecars:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    return make_squares(tmp_path_factory.mktemp("squares"))


def step_and_draws(setup, trainable, frozen, batch, key):
    """(mean loss, gradients of the trainable part, and the draws diffusion_loss made, in its order:
    posterior noise, noise, timesteps) of one step, to set against a PyTorch computation given the same
    draws."""
    from sdjax.keys import keys_for_rows, normal_rows, split_rows
    from train import model
    from train.objective import diffusion_loss, sample_timesteps

    def mean_loss(t, frozen, batch, key):
        total, count = diffusion_loss(setup, model.assemble(setup, t, frozen), batch, key)
        return total / count

    # one compiled program (run op by op, the step compiled each operation on its own: ~2x the time)
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(trainable, frozen, batch, key)
    latent_keys, noise_keys, _, time_keys = split_rows(keys_for_rows(key, batch["row"]), 4)
    mean, _ = jax.eval_shape(  # the latents' shape
        functools.partial(setup.pipe.vae.apply, method="encode"), {"params": frozen["vae"]}, batch["pixels"]
    )
    eps_posterior = normal_rows(latent_keys, mean.shape[1:])
    noise = np.asarray(normal_rows(noise_keys, mean.shape[1:]))
    steps = np.asarray(sample_timesteps(setup.config.objective, setup.schedule.num_train_timesteps, time_keys))
    return loss, grads, eps_posterior, noise, steps


def losses(output: Path) -> np.ndarray:
    return np.array([json.loads(line)["loss"] for line in (output / "metrics.jsonl").read_text().splitlines()])


def weights(path: Path) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {k: np.array(f[k]) for k in f}


def cli(*args: str, devices: int | None = None, env: dict | None = None, **popen) -> list[str] | subprocess.Popen:
    environment = {**os.environ, **(env or {})}
    if devices:
        environment["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "train", *args]
    return subprocess.Popen(command, cwd=ROOT, env=environment, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


COMMON = ("--resolution", "16", "--progress", "false", "--log-every", "1", "--sample-prompts", "")


def run_args(config: str, base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The command line of a run of configs/CONFIG.py's tiny variant on `base` and `data`, into `out`."""
    return [
        "--config",
        f"configs/{config}.py:tiny",
        "--model",
        str(base),
        "--data",
        str(data),
        "--output",
        str(out),
        *COMMON,
        *extra,
    ]


# ---------------------------------------------------------------------------------------------- config + data


def test_command_line_overrides_a_config_file_and_refuses_unknown_keys():
    config = parse(
        [
            "--config",
            "configs/sd15_lora.py:tiny",
            "--learning-rate",
            "3e-4",
            "--lora-rank",
            "8",
            "--random-flip",
            "false",
            "--sample-prompts",
            "a cat,a dog",
        ]
    )
    assert (config.mode, config.optim.learning_rate, config.adapter.rank) == ("lora", 3e-4, 8)
    assert config.images.random_flip is False and config.outputs.sample_prompts == ("a cat", "a dog")
    assert config.model == "random:tiny"
    with pytest.raises(ValueError, match="unknown option --learning-rat"):
        parse(["--learning-rat", "1"])
    with pytest.raises(ValueError, match="mode must be one of"):
        parse(["--mode", "bogus"])
    for name in ("sd15_full", "sd15_lora", "sd15_dreambooth", "sd15_textual_inversion"):
        assert parse(["--config", f"configs/{name}.py"]).images.resolution == 512
        assert parse(["--config", f"configs/{name}.py:tiny"]).model == "random:tiny"


def test_data_folders_bad_images_and_missing_captions(tmp_path):
    meta = scan_folder(make_squares(tmp_path / "meta"))
    side = scan_folder(make_squares(tmp_path / "side", sidecars=True))
    assert [e.caption for e in meta] == [e.caption for e in side] == [f"a {c} square" for c in COLOURS]
    (tmp_path / "side" / "2.txt").unlink()
    with pytest.raises(DataError, match=r"no caption for .*2\.png"):
        scan_folder(tmp_path / "side")
    assert len(scan_folder(tmp_path / "side", skip_bad=True)) == 3
    (tmp_path / "meta" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*1\.png"):
        scan_folder(tmp_path / "meta")
    assert [e.path.name for e in scan_folder(tmp_path / "meta", skip_bad=True)] == ["0.png", "2.png", "3.png"]


def test_sampling_weights_are_read_checked_and_drawn_in_proportion(tmp_path):
    from train.data import Order, _sampling_weights

    folder = make_squares(tmp_path / "meta")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row, weight in zip(rows, (1, 1, 2, 4), strict=True):
        row["weight"] = weight
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = scan_folder(folder)
    assert [e.weight for e in examples] == [1, 1, 2, 4]
    assert _sampling_weights(examples, 0.0) is None  # power 0: plain permutations
    weights = _sampling_weights(examples, 0.5)
    assert weights == (1, 1, 2**0.5, 2)

    plain = Order(4, seed=3)
    assert all(sorted(plain.index(e * 4 + i) for i in range(4)) == [0, 1, 2, 3] for e in range(50))
    weighted = Order(4, seed=3, weights=(1, 1, 2, 4))
    draws = np.bincount([weighted.index(p) for p in range(8000)], minlength=4) / 8000
    np.testing.assert_allclose(draws, [0.125, 0.125, 0.25, 0.5], atol=0.02)
    assert [weighted.index(p) for p in range(40)] == [Order(4, 3, weights=(1, 1, 2, 4)).index(p) for p in range(40)]

    rows[1]["weight"] = -1
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: weight must be a positive number, got -1"):
        scan_folder(folder)
    with pytest.raises(ValueError, match="sampling_weight_power must be >= 0"):
        TrainConfig().replace(sampling_weight_power=-1)


def test_emoji_colour_named_designs_get_the_colour_weight():
    from train.emoji_data import colour_weights

    records = [
        {"text": "an emoji of red heart", "emoji": "\u2764\ufe0f"},
        {"text": "an emoji of green circle", "emoji": "\U0001f7e2"},
        {"text": "an emoji of thumbs up", "emoji": "\U0001f44d"},
        {"text": "an emoji of man red hair", "emoji": "\U0001f468\u200d\U0001f9b0"},
        {"text": "an emoji of man light skin tone red hair", "emoji": "\U0001f468\U0001f3fb\u200d\U0001f9b0"},
        {"text": "an emoji of redwood", "emoji": "x"},  # a word, not a substring
    ]
    assert colour_weights(records, 4.0) == [4.0, 4.0, 1.0, 4.0, 1.0, 1.0]


def test_recoloured_emoji_keep_their_shape_and_shading_in_the_named_hue():
    """The demo data set's recolouring, on a drawn glyph of three tones (outline, body, highlight): every
    colour's image has that colour's dominant hue by the demo's hue rule, alpha is untouched, and the tones
    keep their order of brightness."""
    from train.demo_eval import HUE_BINS, dominant_colour
    from train.emoji_colours import COLOURS, recolour

    assert set(COLOURS) == set(HUE_BINS)
    glyph = np.zeros((32, 32, 4), np.uint8)
    glyph[4:28, 4:28] = (20, 20, 20, 255)  # outline
    glyph[6:26, 6:26] = (230, 180, 40, 255)  # body
    glyph[8:12, 8:12] = (250, 250, 250, 255)  # highlight
    for colour, hue in COLOURS.items():
        out = recolour(glyph, hue)
        assert np.array_equal(out[..., 3], glyph[..., 3])
        background = np.where(out[..., 3:] > 0, out[..., :3], 255).astype(np.uint8)
        assert dominant_colour(background) == colour
        brightness = [out[y, x, :3].astype(int).sum() for y, x in ((5, 5), (20, 20), (9, 9))]
        assert brightness == sorted(brightness) and brightness[0] < brightness[2], (colour, brightness)


def test_bad_input_is_one_line_and_exit_2(tmp_path, base, squares, capsys):
    from train.__main__ import main

    out = str(tmp_path / "o")
    cases = [
        (["--data", str(tmp_path / "missing"), "--output", out, "--model", str(base)], "does not exist"),
        (["--data", str(squares), "--output", out, "--model", str(tmp_path / "nope")], "does not exist"),
        (["--steps", "many"], "takes a int"),
        (
            ["--data", str(squares), "--output", out, "--model", str(base), "--mode", "textual_inversion"],
            "placeholder token",
        ),
        (["--data", str(squares), "--output", out, "--model", str(base), "--mode", "dreambooth"], "--class-prompt"),
    ]
    for args, message in cases:
        assert main(args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], lines
    proc = subprocess.run([sys.executable, "-m", "train", "--bogus", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m train: error: unknown option --bogus; see `python -m train --help` for the config keys"
    ]


# ---------------------------------------------------------------------------------------------- full fine-tune


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, base, squares):
    """60 steps of the tiny full fine-tune config on 4 images (EMA on), in this process."""
    out = tmp_path_factory.mktemp("full") / "run"
    config = parse(
        run_args(
            "sd15_full",
            base,
            squares,
            out,
            "--steps",
            "60",
            "--checkpoint-every",
            "30",
            "--sample-prompts",
            "a red square,a blue square",
            "--sample-steps",
            "3",
        )
    )
    run(config)
    return out


def test_overfitting_four_images_halves_the_loss(full_run):
    values = losses(full_run)
    assert len(values) == 60
    first, last = values[:10].mean(), values[-10:].mean()
    print(f"loss: first 10 steps {first:.4f}, last 10 {last:.4f}")
    assert last <= 0.5 * first, (first, last)
    assert (full_run / "loss.png").is_file()
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.isdigit()) == ["30", "60"]
    samples = full_run / "samples"
    assert {p.name for p in samples.iterdir()} == {"step-000060-0.png", "step-000060-1.png", "step-000060.png"}
    with Image.open(samples / "step-000060.png") as grid:  # the two prompts side by side
        assert grid.size == (32, 16) and grid.text["parameters"] == "a red square | a blue square"


def test_full_export_loads_in_diffusers_and_sdjax(full_run, base):
    import torch
    from diffusers import UNet2DConditionModel

    final = full_run / "final"
    ours = sdjax.load_pipeline(final)
    theirs = UNet2DConditionModel.from_pretrained(final / "unet").eval()
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((1, 77, 32)).astype(np.float32)  # MICRO's context width
    mine = np.asarray(ours.unet.apply({"params": ours.params["unet"]}, x, np.array([500.0]), ctx))
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(ctx)).sample.numpy()
    assert rel_l2(mine, ref.transpose(0, 2, 3, 1)) <= 1e-5
    before = sdjax.load_pipeline(base).params["unet"]["conv_in"]["kernel"]
    assert not np.allclose(ours.params["unet"]["conv_in"]["kernel"], before)


# ---------------------------------------------------------------------------------------------- 8 devices, 2 hosts


def _run_args(base, data, out, *extra, grad_accum: int = 2):
    """4 steps of batch 8 (the 4 images twice), as `grad_accum` micro-batches."""
    return run_args(
        "sd15_full",
        base,
        data,
        out,
        "--steps",
        "4",
        "--batch-size",
        str(8 // grad_accum),
        "--grad-accum",
        str(grad_accum),
        "--ema-decay",
        "0",
        "--checkpoint-every",
        "4",
        *extra,
    )


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory, base, squares):
    out = tmp_path_factory.mktemp("eight") / "run"
    finish(cli(*_run_args(base, squares, out, "--mesh", "data=2,fsdp=4"), devices=8))
    return out


def test_eight_devices_with_fsdp_match_one_device(tmp_path, base, squares, eight_devices):
    """4 steps on 8 devices (data=2, fsdp=4), each update accumulated over 2 micro-batches of 4, give the losses
    and weights of 4 steps on one device with the whole batch of 8 at once (1e-5 relative)."""
    one = tmp_path / "one"
    run(parse(list(_run_args(base, squares, one, grad_accum=1))))
    a, b = losses(one), losses(eight_devices)
    print("losses, 1 device:", a, "8 devices:", b)
    np.testing.assert_allclose(b, a, rtol=1e-5)
    mine, theirs = (
        weights(one / "final/unet/diffusion_pytorch_model.safetensors"),
        weights(eight_devices / "final/unet/diffusion_pytorch_model.safetensors"),
    )
    worst = max(rel_l2(theirs[k], mine[k]) for k in mine)
    print(f"largest relative parameter difference: {worst:.2e}")
    assert worst <= 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # the default run checks two processes sampling (test_sharding.py) and 8-device training
def test_two_processes_match_one_process_with_eight_devices(tmp_path, base, squares, eight_devices):
    out = tmp_path / "two"
    port = _free_port()
    procs = [
        cli(
            *_run_args(
                base,
                squares,
                out,
                "--mesh",
                "data=2,fsdp=4",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            devices=4,
        )
        for i in range(2)
    ]
    for proc in procs:
        finish(proc)
    np.testing.assert_allclose(losses(out), losses(eight_devices), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- kill and resume

# Runs python -m train with two pauses a test can kill into: SLOW_STEP=N holds the commit (rename) of
# checkpoint N for two minutes (its files are written), PAUSE_EXPORT=1 holds the export after final/'s
# temporary folder is complete and before it is renamed into place.
_PAUSING_TRAIN = """
import asyncio, os, runpy, sys, time
from orbax.checkpoint._src.path import atomicity
import train.export
original = atomicity.AtomicRenameTemporaryPath.finalize
async def slow_finalize(self):
    if self.get_final().name == os.environ.get("SLOW_STEP"):
        await asyncio.sleep(120)
    return await original(self)
atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
export = train.export.export_final
def paused_export(*args):
    out = export(*args)
    if os.environ.get("PAUSE_EXPORT"):
        time.sleep(120)
    return out
train.export.export_final = paused_export
sys.argv = ["train", *sys.argv[1:]]
runpy.run_module("train", run_name="__main__")
"""


def _kill_args(base, squares, out):
    return run_args("sd15_full", base, squares, out, "--steps", "8", "--checkpoint-every", "2", "--random-flip", "true")


def _wait_for(condition, proc, timeout=300.0) -> bool:
    """Waits until `condition()` holds (True) or the process ends (False)."""
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    return True


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _checkpoint_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def test_killed_runs_resume_bit_identical(tmp_path, base, squares):
    """kill -9 five times at random moments of a run (during start-up, after a random step, twice while a
    checkpoint is being committed, while final/ is being exported), then run it to the end: the final weights
    and the losses are bit-identical to an uninterrupted run's, and nothing written before a kill is ever lost
    or half-written."""
    reference = tmp_path / "uninterrupted"
    run(parse(list(_kill_args(base, squares, reference))))  # in-process; its compiled step is cached for the rest

    out = tmp_path / "killed"
    script = tmp_path / "pausing_train.py"
    script.write_text(_PAUSING_TRAIN)
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)
    print("fault-test seed", seed)
    # moments still ahead of the run: during start-up, after a step not yet done (the kill lands in a later
    # step, a save or the data loading), in the commit of a checkpoint not yet written; then in the export
    # (the run trains to the end first). Each round is a new process (~7 s of start-up and compiling).
    moments = rng.sample(["start-up", "step", "checkpoint", "checkpoint"], 4)
    for round_, moment in enumerate([*moments, "export"]):
        latest = max(_checkpoint_steps(out), default=0)
        if latest == 8 and moment == "checkpoint":
            moment = "step"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if moment == "checkpoint":
            env["SLOW_STEP"] = str(rng.choice([s for s in (2, 4, 6, 8) if s > latest]))
            ready = lambda step=env["SLOW_STEP"]: any((out / "checkpoints").glob(f"{step}.orbax-checkpoint-tmp*"))
        elif moment == "export":
            env["PAUSE_EXPORT"] = "1"
            ready = lambda: any(out.glob(".final.*.sdjax-tmp/unet/*.safetensors"))
        elif moment == "step":
            at = rng.randint(min(latest + 1, 8), 8)
            ready = lambda at=at: _logged_steps(out) >= at
        else:
            deadline = time.time() + rng.uniform(0.5, 4.0)
            ready = lambda deadline=deadline: time.time() > deadline
        before = _checkpoint_steps(out)
        proc = subprocess.Popen(
            [sys.executable, str(script), *_kill_args(base, squares, out)],
            cwd=ROOT,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        if _wait_for(ready, proc):
            time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        err = proc.communicate()[1]
        print(f"round {round_}: {moment}, exit {proc.returncode}, checkpoints {_checkpoint_steps(out)}")
        assert proc.returncode == -signal.SIGKILL, err[-3000:]  # every round is killed before the run ends
        if (out / "final").exists():  # final/ is whole or absent
            assert (out / "final/unet/diffusion_pytorch_model.safetensors").is_file()
        after = _checkpoint_steps(out)
        if before:  # checkpoints only ever move forward (the oldest rotate out)
            assert after and after[-1] >= before[-1]
    finish(cli(*_kill_args(base, squares, out)))

    want = weights(reference / "final/unet/diffusion_pytorch_model.safetensors")
    got = weights(out / "final/unet/diffusion_pytorch_model.safetensors")
    assert want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in want)
    np.testing.assert_array_equal(losses(out), losses(reference))
    assert not list(out.glob(".*sdjax-tmp")) and not list((out / "checkpoints").glob("*tmp*"))


# ---------------------------------------------------------------------------------------------- finished work and NaNs


def test_output_folders_keep_finished_work_and_refused_runs_write_nothing(tmp_path, base, squares, capsys):
    """A finished run is not redone; a resume refused for other settings leaves config.json as it was;
    a run with more steps keeps the earlier result as final-step-NNNNNN/; --overwrite starts over (and
    leaves such kept results alone)."""
    from train.__main__ import main

    out = tmp_path / "run"
    args = run_args("sd15_full", base, squares, out, "--steps", "2", "--checkpoint-every", "1")
    assert main(args) == 0
    capsys.readouterr()
    finished = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    assert main(args) == 0  # the same command again: nothing to do, nothing rewritten
    assert "nothing to do" in capsys.readouterr().err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == finished

    assert main([*args, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "seed: 0 -> 5" in err[0] and "--overwrite true" in err[0], err
    assert (out / "config.json").read_bytes() == finished["config.json"]

    assert main([*args, "--steps", "3"]) == 0  # trained further: the 2-step result is kept
    assert (out / "final-step-000002" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == finished[
        "final/unet/diffusion_pytorch_model.safetensors"
    ]
    assert len(losses(out)) == 3

    assert main([*args, "--seed", "5", "--overwrite", "true"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert len(losses(out)) == 2 and (out / "final-step-000002").is_dir()  # kept results are never deleted


def test_a_diverging_run_stops_with_finite_checkpoints(tmp_path, base, squares, capsys):
    """A learning rate of 1e30 makes step 2's loss infinite: with --nan-policy stop the run ends with one line
    at step 2, the update is not applied, every checkpoint holds finite weights and nothing is exported;
    with skip, it goes on, skipping (and logging) the non-finite updates, and exports finite weights."""
    from train.__main__ import main

    out = tmp_path / "stop"
    args = run_args(
        "sd15_full", base, squares, out, "--steps", "4", "--checkpoint-every", "1", "--learning-rate", "1e30"
    )
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training stopped at step 2" in err[0] and "--nan-policy skip" in err[0], err
    assert not (out / "final").exists()
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1]
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpoints

    manager = Checkpoints(out / "checkpoints", keep=3, asynchronous=False)
    restored = manager.manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    leaves = [np.asarray(x) for x in jax.tree.leaves(restored["state"]["params"])]
    assert all(np.isfinite(x).all() for x in leaves)

    out = tmp_path / "skip"
    args = run_args("sd15_full", base, squares, out, "--steps", "4", "--learning-rate", "1e30", "--nan-policy", "skip")
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False, True, True, True]
    exported = weights(out / "final/unet/diffusion_pytorch_model.safetensors")
    assert all(np.isfinite(v).all() for v in exported.values())


def test_metrics_leave_the_device_one_step_late(tmp_path, base, squares, monkeypatch):
    """With --log-every 1 the loop reads step k's metrics after dispatching step k + 1, so the device never
    waits for the host; before a checkpoint (every 3 steps here) and at the end it reads every step so far,
    so that no non-finite update reaches a checkpoint. The log still has a row for every step."""
    from train import loop
    from train.__main__ import main

    dispatched, looks = [], []
    real_compile, real_get = loop.compile_step, jax.device_get

    def compile_step(*args, **kwargs):
        step_fn = real_compile(*args, **kwargs)
        return lambda *a: (dispatched.append(1), step_fn(*a))[1]

    def device_get(tree):
        if isinstance(tree, list) and tree and isinstance(tree[0], tuple):  # the loop's (step, metrics)
            looks.append((len(dispatched), [at for at, _ in tree]))
        return real_get(tree)

    monkeypatch.setattr(loop, "compile_step", compile_step)
    monkeypatch.setattr(jax, "device_get", device_get)
    out = tmp_path / "run"
    assert main(run_args("sd15_full", base, squares, out, "--steps", "5", "--checkpoint-every", "3")) == 0
    assert looks == [(2, [1]), (3, [2, 3]), (5, [4, 5])]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base, squares):
    out = tmp_path_factory.mktemp("lora") / "run"
    run(
        parse(
            run_args(
                "sd15_lora",
                base,
                squares,
                out,
                "--steps",
                "12",
                "--lora-text-encoder",
                "true",
                "--lora-alpha",
                "8",
                "--checkpoint-every",
                "12",
            )
        )
    )
    return out


def test_lora_export_matches_diffusers(lora_run, base):
    import torch
    from diffusers import StableDiffusionPipeline

    final = lora_run / "final"
    pipe = sdjax.load_pipeline(base)
    trained = pipe.load_lora(final / "pytorch_lora_weights.safetensors")
    kohya = pipe.load_lora(final / "pytorch_lora_weights_kohya.safetensors")
    ref = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(final)
    ref.fuse_lora(lora_scale=1.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    ids = pipe.tokenizer(["a red square", "a blue square"])
    with torch.no_grad():
        ctx_ref = ref.text_encoder(torch.from_numpy(ids.astype(np.int64)))[0]
        unet_ref = (
            ref.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 300, ctx_ref).sample.numpy().transpose(0, 2, 3, 1)
        )
    for variant in (trained, kohya):
        ctx = variant.text_encoder.apply({"params": variant.params["text_encoder"]}, ids)[0]
        assert rel_l2(ctx, ctx_ref.numpy()) <= 1e-5
        out = variant.unet.apply({"params": variant.params["unet"]}, x, np.array([300.0, 300.0]), ctx_ref.numpy())
        assert rel_l2(out, unet_ref) <= 1e-5
    before = pipe.unet.apply({"params": pipe.params["unet"]}, x, np.array([300.0, 300.0]), ctx_ref.numpy())
    assert rel_l2(before, unet_ref) > 1e-3  # the LoRA did change the UNet


# ---------------------------------------------------------------------------------------------- DreamBooth, TI


def _image(pipe, prompt):
    return pipe.generate(prompt, num_inference_steps=4, seed=3, height=16, width=16, mesh=None)[0].astype(np.int32)


@pytest.mark.slow  # its step: test_train_parity.py; a run's output loading: the textual inversion test below
def test_dreambooth_output_loads_and_changes_the_images(tmp_path, base, squares):
    out = tmp_path / "db"
    run(parse(run_args("sd15_dreambooth", base, squares, out, "--steps", "6")))
    assert len(list((out / "class_images").glob("*.png"))) == 4
    prompt = "a photo of sks square"
    before, after = _image(sdjax.load_pipeline(base), prompt), _image(sdjax.load_pipeline(out / "final"), prompt)
    print("mean |after - before|:", np.abs(after - before).mean())
    assert np.abs(after - before).mean() > 1.0


def test_textual_inversion_output_loads_and_changes_the_images(tmp_path, base, squares):
    import torch
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "ti"
    run(
        parse(
            run_args(
                "sd15_textual_inversion",
                base,
                squares,
                out,
                "--steps",
                "15",
                "--initializer-token",
                "square",
                "--placeholder-token",
                "<sq>",
                "--instance-prompt",
                "a photo of a <sq>",
            )
        )
    )
    embeds = out / "final" / "learned_embeds.safetensors"
    learned = weights(embeds)["<sq>"]
    pipe = sdjax.load_pipeline(base)
    start = np.asarray(pipe.params["text_encoder"]["embeddings.token_embedding"]["embedding"])[
        pipe.tokenizer.encode_plain("square")[0]
    ]
    assert learned.shape == (1, 32) and not np.allclose(learned[0], start)
    with_ti = pipe.load_textual_inversion(embeds)
    initial = pipe.load_textual_inversion(_embedding_file(tmp_path / "init.safetensors", "<sq>", start[None]))
    prompt = "a photo of a <sq>"
    assert np.abs(_image(with_ti, prompt) - _image(initial, prompt)).mean() > 1.0
    ref = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    ref.load_textual_inversion(embeds)
    ids = ref.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = ref.text_encoder(ids)[0].numpy()
    ours = with_ti.text_encoder.apply({"params": with_ti.params["text_encoder"]}, with_ti.tokenizer([prompt]))[0]
    assert rel_l2(ours, theirs) <= 1e-5


def _embedding_file(path: Path, token: str, vectors: np.ndarray) -> Path:
    from sdjax.convert.tensor_files import save_safetensors

    save_safetensors(path, {token: np.asarray(vectors, np.float32)})
    return path


def test_config_defaults_are_sane():
    config = TrainConfig()
    assert config.mode == "full" and config.dtype == "float32" and config.remat == "none"


# every field away from its default, written by group (the round-trip test below checks that none is missed)
EVERY_FIELD_SET = TrainConfig(
    model="random:tiny",
    data="data/dogs",
    output="runs/dogs",
    mode="dreambooth",
    architecture="configs/emoji_demo/architecture",
    scratch=("vae",),
    unet_init="identity",
    train_text_encoder=True,
    dtype="bfloat16",
    remat="dots_all",
    seed=5,
    optim=Optim(
        steps=7,
        batch_size=4,
        grad_accum=2,
        learning_rate=3e-4,
        lr_schedule="cosine",
        warmup_steps=2,
        adam_b1=0.8,
        adam_b2=0.99,
        adam_eps=1e-6,
        weight_decay=0.0,
        max_grad_norm=0.5,
        ema_decay=0.9,
        nan_policy="skip",
    ),
    images=Images(
        resolution=64,
        center_crop=False,
        random_flip=True,
        skip_bad_images=True,
        caption_dropout=0.1,
        sampling_weight_power=0.5,
        instance_prompt="a photo of sks dog",
        loader_workers=2,
        buckets=True,
    ),
    objective=Objective(
        noise_offset=0.05,
        min_snr_gamma=5.0,
        snr_floor=1.0,
        timestep_bias_strategy="range",
        timestep_bias_multiplier=2.0,
        timestep_bias_portion=0.5,
        timestep_bias_begin=100,
        timestep_bias_end=200,
        kl_weight=1e-5,
    ),
    adapter=LoRA(rank=8, alpha=16.0, targets=("to_q", "to_v"), text_encoder=True),
    dreambooth=DreamBooth(
        class_prompt="a photo of dog",
        class_data="data/dog_class",
        num_class_images=8,
        prior_loss_weight=0.5,
        class_sample_steps=10,
        lora=True,
    ),
    inversion=TextualInversion(placeholder_token="<x>", initializer_token="toy", num_vectors=2),
    controlnet=ControlNetTraining(
        model="runs/cn/final", conditioning_column="edges", embedding_channels=(8, 16, 32, 64), sample_images=("e.png",)
    ),
    parallel=Parallel(mesh="data=2,fsdp=4", coordinator="127.0.0.1:1234", num_processes=2, process_id=1),
    outputs=Outputs(
        checkpoint_every=5,
        keep_checkpoints=2,
        log_every=3,
        progress=False,
        sample_every=4,
        sample_prompts=("a cat", "a dog"),
        sample_steps=6,
        sample_seed=9,
        export_dtype="float16",
        overwrite=True,
    ),
)


def _flag_text(value) -> str:
    """A value of `to_json` as a command line writes it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def test_every_flat_name_round_trips_through_the_command_line():
    """Every flat name (a field of TrainConfig or of one of its groups) is a flag: the flags of a config's
    values rebuild it, each flag alone changes its own field and nothing else, and --help lists it."""
    from train.__main__ import _usage
    from train.config import from_args, load_config_file, to_json

    configs = [EVERY_FIELD_SET] + [load_config_file(str(p)) for p in sorted((ROOT / "configs").glob("*.py"))]
    default = to_json(TrainConfig())
    changed = set()
    for config in configs:
        flat = to_json(config)
        assert list(flat) == list(FIELDS)
        rebuilt = from_args(
            TrainConfig(), [(name.replace("_", "-"), _flag_text(value)) for name, value in flat.items()]
        )
        assert rebuilt == config and to_json(rebuilt) == flat
        for name, value in flat.items():
            assert to_json(from_args(TrainConfig(), [(name, _flag_text(value))])) == {**default, name: value}, name
            if value != default[name]:
                changed.add(name)
    assert changed == set(FIELDS), sorted(set(FIELDS) - changed)
    usage = _usage()
    assert all(f"--{name.replace('_', '-')} (default" in usage for name in FIELDS)
    assert "adapter: " in usage and "--lora-rank (default 4)" in usage


def test_flat_names_route_to_their_groups():
    from train.config import Mode, to_json

    config = TrainConfig().replace(
        learning_rate=1e-4, lora_rank=8, lora=True, mesh="data=2", resolution=64, kl_weight=0.5, seed=3
    )
    assert (config.optim.learning_rate, config.adapter.rank, config.dreambooth.lora) == (1e-4, 8, True)
    assert (config.parallel.mesh, config.images.resolution, config.objective.kl_weight) == ("data=2", 64, 0.5)
    assert config.seed == 3 and config.optim == dataclasses.replace(Optim(), learning_rate=1e-4)
    assert (FIELDS["lora_rank"].group, FIELDS["lora_rank"].field) == ("adapter", "rank")
    # a whole group, with flat changes of it on top
    both = config.replace(optim=Optim(steps=7), batch_size=2)
    assert (both.optim.steps, both.optim.batch_size, both.optim.learning_rate) == (7, 2, 1e-5)
    # choices given as strings become enums, equal to and written as the strings
    lora = config.replace(mode="lora", lr_schedule="cosine")
    assert lora.mode is Mode.LORA and lora.mode == "lora" and lora.uses_lora
    assert (to_json(lora)["mode"], to_json(lora)["lr_schedule"]) == ("lora", "cosine")
    assert json.loads(json.dumps(to_json(lora)))["mode"] == "lora"
    with pytest.raises(TypeError, match="no field, group or flat option 'lora_rnk'"):
        config.replace(lora_rnk=8)


@pytest.mark.parametrize(
    ("group", "changes", "message"),
    [
        (Optim, {"steps": 0}, "steps must be >= 1, got 0"),
        (Optim, {"lr_schedule": "linear"}, "lr_schedule must be one of ('constant', 'cosine'), got 'linear'"),
        (Optim, {"ema_decay": 1.0}, "ema_decay must be in [0, 1)"),
        (Images, {"resolution": 60}, "resolution must be a positive multiple of 8"),
        (Images, {"caption_dropout": 2.0}, "caption_dropout must be in [0, 1]"),
        (Images, {"cache_latents": True, "center_crop": False}, "cache_latents needs center_crop"),
        (Objective, {"min_snr_gamma": 1.0, "snr_floor": 2.0}, "snr_floor must not exceed min_snr_gamma"),
        (Objective, {"timestep_bias_portion": 0.0}, "timestep_bias_portion must be in (0, 1]"),
        (Objective, {"timestep_bias_begin": 5, "timestep_bias_end": 5}, "timestep_bias_begin must be >= 0 and <"),
        (LoRA, {"rank": 0}, "lora_rank must be >= 1"),
        (TextualInversion, {"num_vectors": 0}, "num_vectors must be >= 1"),
        (Outputs, {"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
        (Outputs, {"export_dtype": "int8"}, "export_dtype must be float32, float16 or bfloat16, got 'int8'"),
        (TrainConfig, {"remat": "some"}, "remat must be one of ('none', 'full', 'dots', 'dots_all'), got 'some'"),
        (TrainConfig, {"scratch": ("unet", "clip")}, "scratch takes components of ('unet', 'vae', 'text_encoder')"),
        (TrainConfig, {"dtype": "float16"}, "dtype must be one of ('float32', 'bfloat16'), got 'float16'"),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_each_config_group_checks_its_fields_in_one_line(group, changes, message):
    from train.config import GROUPS

    with pytest.raises(ValueError) as direct:
        group(**changes)
    owner = {cls: name for name, cls in GROUPS.items()}.get(group)
    flat_names = {o.field: name for name, o in FIELDS.items() if o.group == owner}
    with pytest.raises(ValueError) as flat:  # the flat names reach the same check
        TrainConfig().replace(**{flat_names[k]: v for k, v in changes.items()})
    for err in (direct, flat):
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_config_json_from_before_the_groups_still_resumes():
    """config.json and the checkpoints' meta stay flat: a run's config written before the fields were grouped
    (tests/data/config_before_groups.json, of configs/sd15_lora.py:tiny) is today's to_json of the same
    config, passes the resume check, and a changed setting is still refused by its flat name."""
    from train.config import load_config_file, to_json
    from train.run_folder import STATE_KEYS, OutputFolderError, decide

    old = json.loads((ROOT / "tests" / "data" / "config_before_groups.json").read_text())
    now = load_config_file(f"{ROOT / 'configs' / 'sd15_lora.py'}:tiny").replace(data=old["data"], output=old["output"])
    added_since = {"nan_policy", "overwrite", "cache_text_embeddings", "loader_workers", "buckets"}
    added_since |= {k for k in FIELDS if k.startswith("controlnet_")}
    written = json.loads(json.dumps(to_json(now)))
    assert {k: v for k, v in written.items() if k not in added_since} == old
    output = ROOT / "tests" / "data"  # holds no run files: only the checkpoint's settings decide
    assert decide(output, 10, old, to_json(now), overwrite=False).step == 10
    with pytest.raises(OutputFolderError, match=r"lora_rank: 4 -> 8"):
        decide(output, 10, old, to_json(now.replace(lora_rank=8)), overwrite=False)
    assert set(STATE_KEYS) <= set(FIELDS)


def test_timestep_bias_draws_the_chosen_timesteps_as_often_as_asked():
    import jax

    from train.objective import sample_timesteps, timestep_weights

    assert timestep_weights(Objective(), 1000) is None
    keys = jax.random.split(jax.random.key(0), 20000)
    later = Objective(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    t = np.asarray(sample_timesteps(later, 1000, keys))
    assert t.min() >= 0 and t.max() <= 999
    # the last 250 timesteps weigh 3 x 250 against 750: half of the draws
    assert abs((t >= 750).mean() - 0.5) < 0.02
    earlier = dataclasses.replace(later, timestep_bias_strategy="earlier")
    assert abs((np.asarray(sample_timesteps(earlier, 1000, keys)) < 250).mean() - 0.5) < 0.02
    ranged = dataclasses.replace(later, timestep_bias_strategy="range", timestep_bias_begin=100, timestep_bias_end=200)
    # 100 timesteps x 3 against 900: a quarter
    t = np.asarray(sample_timesteps(ranged, 1000, keys))
    assert abs(((t >= 100) & (t < 200)).mean() - 0.25) < 0.02
    with pytest.raises(ValueError, match="beyond the model's 1000"):
        timestep_weights(dataclasses.replace(ranged, timestep_bias_end=1200), 1000)
    with pytest.raises(ValueError, match="timestep_bias_strategy must be one of"):
        Objective(timestep_bias_strategy="late")


def test_snr_weights_clip_the_x0_weight_to_floor_and_gamma():
    """Weights on the model's own target equal SNR clipped to [floor, gamma] as a weight on the x0 error:
    the x0 error of an epsilon model is its eps error / SNR, of a v model its v error / (SNR + 1)."""
    import jax.numpy as jnp

    from train.objective import snr_weights

    abar = jnp.asarray([0.999, 0.9, 0.5, 0.1, 0.0047])
    snr = abar / (1 - abar)
    for floor, gamma in [(0.0, 5.0), (1.0, 0.0), (1.0, 5.0), (0.1, 5.0)]:
        x0_weight = jnp.clip(snr, floor or None, gamma or None)
        np.testing.assert_allclose(snr_weights(abar, gamma, "epsilon", floor), x0_weight / snr, rtol=1e-6)
        np.testing.assert_allclose(snr_weights(abar, gamma, "v_prediction", floor), x0_weight / (snr + 1), rtol=1e-6)
    # the floor raises only the noisy end (SNR < floor): at t = 999 an eps error counts 1 / SNR ~ 212 times
    assert float(snr_weights(abar, 5.0, "epsilon", 1.0)[-1]) == pytest.approx(1 / float(snr[-1]), rel=1e-5)
    np.testing.assert_allclose(snr_weights(abar, 5.0, "epsilon", 1.0)[:3], snr_weights(abar, 5.0, "epsilon")[:3])
    with pytest.raises(ValueError, match="snr_floor must not exceed"):
        Objective(min_snr_gamma=1.0, snr_floor=2.0)


def test_identity_init_starts_the_noise_prediction_at_its_input(base):
    """unet_init=identity: a fresh UNet predicts eps(x_t) = its input normalised as conv_norm_out's groups
    normalise it (any t, any text), the rest of the weights random; the default init predicts something
    else. (The MICRO architecture, 4 channels to a group: the rewiring is the same for any depth, and the
    demo model's, one channel to a group, took more than twice as long.)"""
    import jax
    import jax.numpy as jnp

    from train import model

    unet = json.loads((base / "unet" / "config.json").read_text())
    per_group = unet["block_out_channels"][0] // unet["norm_num_groups"]
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4)) * 1.3 + 0.2
    grouped = x.reshape(2, 16, 16, 4 // per_group, per_group)
    mean, std = grouped.mean((1, 2, 4), keepdims=True), grouped.std((1, 2, 4), keepdims=True)
    normalised = ((grouped - mean) / std).reshape(x.shape)
    context = jax.random.normal(jax.random.key(2), (2, 77, 32))

    @functools.partial(jax.jit, static_argnums=0)  # one compile for both inits (equal modules, t traced)
    def apply(unet, params, t):
        return unet.apply({"params": params}, x, jnp.full((2,), t), context)

    for init, close in (("identity", True), ("flax", False)):
        config = TrainConfig(architecture=str(base), scratch=("unet", "vae", "text_encoder"), unet_init=init)
        pipe = model.load_start(config)
        for t in (999, 10):
            eps = apply(pipe.unet, pipe.params["unet"], t)
            error = float(jnp.abs(eps - normalised).max())
            assert (error < 0.2) == close, (init, t, error)
    with pytest.raises(ValueError, match="unet_init must be one of"):
        TrainConfig(unet_init="zeros")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.py")), ids=lambda p: p.name)
def test_every_run_config_loads_with_its_tiny_variant(path):
    """configs/*.py: get_config() and get_config("tiny") give valid TrainConfigs (the README's commands)."""
    from train.config import load_config_file

    full, tiny = load_config_file(str(path)), load_config_file(f"{path}:tiny")
    assert isinstance(full, TrainConfig) and isinstance(tiny, TrainConfig)
    assert tiny.optim.steps < full.optim.steps


def _four_image_batch(base: Path):
    """A config of the MICRO model `base` for batches of 4 at 32x32, its pipeline and one batch of 4 captioned
    images. (The step's accumulation and remat do not depend on the architecture; the MICRO model's compile
    takes half the tiny one's.)"""
    from train import model

    config = TrainConfig(model=str(base), images=Images(resolution=32), optim=Optim(batch_size=4))
    pipe = model.load_start(config)
    rng = np.random.default_rng(0)
    batch = {
        "pixels": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
        "ids": pipe.tokenizer(["a red square", "a cat", "a blue ball", "a tree"]),
        "row": np.array([0, 2, 4, 6], np.int32),
        "weight": np.ones(4, np.float32),
        "count": np.ones(4, np.float32),
    }
    return config, pipe, batch


# The default run checks accumulation over micro-batches against the whole batch through 8-device training
# (test_eight_devices_with_fsdp_match_one_device: 4 steps, 1e-5); this one checks one update to 1e-6.
@pytest.mark.slow
def test_gradient_accumulation_gives_the_large_batch_step(base):
    """One update of 4 images as 2 micro-batches of 2 equals the update of all 4 at once (loss, gradient
    norm and parameters to 1e-6 relative, fp32): each row draws its noise and timestep from the step and
    its row id, whatever micro-batch holds it."""

    from train import model
    from train.step import init_state, make_optimizer, train_step

    config, pipe, batch = _four_image_batch(base)
    key = jax.random.key(1)

    def update(accum: int):
        cfg = config.replace(grad_accum=accum, batch_size=4 // accum)
        setup = model.make_setup(cfg, pipe)
        trainable, frozen = model.split_params(setup, key)
        optimizer = make_optimizer(cfg.optim)
        state = init_state(trainable, jax.random.key_data(key), optimizer=optimizer, ema=False)
        micro = {k: v.reshape(accum, 4 // accum, *v.shape[1:]) for k, v in batch.items()}
        step = jax.jit(functools.partial(train_step, setup=setup, optimizer=optimizer))
        new, metrics = step(state, frozen, micro)
        return jax.device_get(new["params"]), jax.device_get(metrics)

    (whole, m1), (split, m2) = update(1), update(2)
    print(f"loss {m1['loss']:.7f} vs {m2['loss']:.7f}, grad norm {m1['grad_norm']:.7f} vs {m2['grad_norm']:.7f}")
    assert abs(m1["loss"] - m2["loss"]) <= 1e-6 * abs(m1["loss"])
    assert abs(m1["grad_norm"] - m2["grad_norm"]) <= 1e-6 * abs(m1["grad_norm"])
    worst = max(jax.tree.leaves(jax.tree.map(rel_l2, split, whole)))
    print(f"parameters after the update, worst relative L2: {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.slow  # the default run trains with "full" (bfloat16 against float32 in test_train_parity.py, and
# the 8-device FSDP run against one device above), without comparing it to no remat
@pytest.mark.parametrize("remat", ["full", "dots", "dots_all"])
def test_remat_policy_gives_the_gradients_of_no_remat(remat, base):
    """Every remat policy gives the gradients of no remat (fp32, relative L2 <= 1e-6 over all parameters)."""
    import jax.numpy as jnp

    from train import model
    from train.objective import diffusion_loss

    config, pipe, batch = _four_image_batch(base)
    key = jax.random.key(1)

    def gradients(remat: str):
        setup = model.make_setup(config.replace(remat=remat), pipe)
        trainable, frozen = model.split_params(setup, key)

        def mean_loss(t):
            total, count = diffusion_loss(setup, model.assemble(setup, t, frozen), batch, key)
            return total / count

        return jax.device_get(jax.jit(jax.grad(mean_loss))(trainable))

    plain = gradients("none")
    flat = lambda tree: np.concatenate([np.ravel(g) for g in jax.tree.leaves(tree)])  # noqa: E731
    assert float(jnp.abs(flat(plain)).max()) > 0
    grads = gradients(remat)
    overall = rel_l2(flat(grads), flat(plain))
    worst = max(jax.tree.leaves(jax.tree.map(rel_l2, grads, plain)))
    print(f"remat {remat}: gradients against no remat, relative L2 {overall:.2e} (worst tensor {worst:.2e})")
    # float32 rounding of recomputed activations; the smallest tensors' gradients show it most
    assert overall <= 1e-6 and worst <= 1e-5, remat


@pytest.mark.parametrize("arch", [pytest.param("tiny", marks=pytest.mark.slow), "tiny-sdxl"])
def test_cached_text_embeddings_give_the_step_of_token_ids(arch, squares):
    """cache_text_embeddings: the batches carry each row's encoded caption (its dropped-out empty caption,
    the DreamBooth class prompt) instead of token ids, the text encoders leave the frozen parameters, and
    the step's loss is that of encoding in the step (fp32, the same rows and draws)."""

    from train import data, model
    from train.objective import diffusion_loss

    config = TrainConfig(
        model=f"random:{arch}",
        mode="dreambooth",
        images=Images(resolution=32, caption_dropout=0.5),
        dreambooth=DreamBooth(class_prompt="a shape", prior_loss_weight=0.5),
        optim=Optim(batch_size=4),
    )
    cached = config.replace(cache_text_embeddings=True)
    pipe = model.load_start(config)
    examples = scan_folder(squares)
    key = jax.random.key(3)

    def loss_of(cfg):
        setup = model.make_setup(cfg, pipe)
        trainable, frozen = model.split_params(setup, key)
        text_cache = None
        if cfg.images.cache_text_embeddings:
            text_cache = data.encode_text_cache(setup, data.run_texts(cfg, examples, examples))
        batch = data.Batches(setup, examples, examples, 1, text_cache=text_cache).micro(0, 0)

        def mean_loss(t):
            total, count = diffusion_loss(setup, model.assemble(setup, t, frozen), batch, key)
            return total / count

        # the loss alone: with the text encoders frozen, the gradients are the same function of the same UNet
        # inputs (a gradient program of each compiled for about twice the time)
        return frozen.keys(), batch, float(jax.jit(mean_loss)(trainable))

    parts, batch, loss = loss_of(config)
    parts_cached, batch_cached, loss_cached = loss_of(cached)
    texts = {"text_encoder", "text_encoder_2"}
    assert texts & set(parts) and not texts & set(parts_cached)
    assert "ids" in batch and "ids" not in batch_cached and batch_cached["context"].shape[:2] == (8, 77)
    assert ("text_embeds" in batch_cached) == (arch == "tiny-sdxl")
    assert np.array_equal(batch["time_ids"], batch_cached["time_ids"]) if "time_ids" in batch else True
    print(f"{arch}: loss {loss:.7f} vs cached {loss_cached:.7f}")
    assert abs(loss - loss_cached) <= 1e-6 * abs(loss)
    with pytest.raises(ValueError, match="cache_text_embeddings needs frozen text encoders"):
        config.replace(mode="lora", lora_text_encoder=True, cache_text_embeddings=True)
