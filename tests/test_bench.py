"""The benchmark command runs end to end on the one-level MICRO model (numbers are printed, never asserted);
its 2x VAE checks that the latents and a ControlNet's condition embedding follow the model's VAE."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdjax.testing import random_pipeline


def test_bench_micro_against_torch(tmp_path):
    env = {**os.environ, "SDJAX_BENCH_DIR": str(tmp_path / "models")}
    argv = [sys.executable, "-m", "sdjax.bench", "--arch", "micro", "--height", "32", "--width", "32", "--steps", "3"]
    argv += [
        "--against",
        "torch",
        "--repeats",
        "1",
        "--json",
        str(tmp_path / "r.json"),
        "--plot",
        str(tmp_path / "r.png"),
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout)
    report = json.loads((tmp_path / "r.json").read_text())
    for side in ("jax", "torch"):
        assert {"text_s", "unet_step_s", "vae_decode_s", "image_s", "peak_rss"} <= set(report[side])
    assert report["floor"]["unet_flops"] > 0 and report["floor"]["gemm_flops_per_s"] > 0
    assert report["pixel_difference"]["max"] <= 3  # the same weights and latents give the same image
    assert "unet_step_s" in done.stdout and Image.open(tmp_path / "r.png").size == (720, 360)
    assert (tmp_path / "models" / "micro" / "model_index.json").is_file()  # cached for the next run


@pytest.mark.slow  # the default run benchmarks without a ControlNet (test_bench_micro_against_torch)
def test_bench_micro_with_a_controlnet_against_torch(tmp_path):
    """--controlnet: both frameworks draw with the same random ControlNet (cached beside the model) and time
    the ControlNet + UNet step beside the UNet step."""
    env = {**os.environ, "SDJAX_BENCH_DIR": str(tmp_path / "models")}
    argv = [sys.executable, "-m", "sdjax.bench", "--arch", "micro", "--height", "32", "--width", "32", "--steps", "3"]
    argv += ["--against", "torch", "--repeats", "1", "--controlnet", "--json", str(tmp_path / "r.json")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    print(done.stdout)
    report = json.loads((tmp_path / "r.json").read_text())
    for side in ("jax", "torch"):
        assert report[side]["control_step_s"]["median"] > 0
        assert report["control_cost"][side] > 0
    assert report["pixel_difference"]["max"] <= 3
    assert (tmp_path / "models" / "micro-controlnet" / "config.json").is_file()
    assert "ControlNet + UNet step / UNet step: sdjax" in done.stdout


def test_random_weights_have_the_real_shapes():
    pipe = random_pipeline("tiny")
    kernel = pipe.params["unet"]["conv_in"]["kernel"]
    assert kernel.shape == (3, 3, 4, 32) and 0.05 < np.std(kernel) < 0.5
    scale = pipe.params["unet"]["conv_norm_out"]["scale"]
    assert abs(float(np.mean(scale)) - 1.0) < 0.2 and float(np.std(scale)) > 0.05
