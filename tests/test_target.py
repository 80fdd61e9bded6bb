"""`python -m sdjax.bench --target tpu:...`: sdjax's programs compiled for a TPU topology on this CPU host
(libtpu, the one-level test architecture), with the numbers the report derives from the compiler's analyses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sdjax import targets

KERNEL_PLATFORMS = "all"  # lowers for the TPU and CUDA: every platform's kernels traced (conftest.py)


def test_bad_targets_are_one_line_errors(monkeypatch):
    for bad in ("gpu:a100", "tpu:v9:2x2", "tpu:v5e"):
        with pytest.raises(ValueError, match="--target must be tpu:GENERATION:TOPOLOGY"):
            targets.parse_target(bad)
    assert targets.parse_target("tpu:v5e:4x4") == ("v5e", "v5e:4x4")
    monkeypatch.setenv("SDJAX_KERNEL_PLATFORMS", "cpu")  # programs without the TPU's kernels
    with pytest.raises(RuntimeError, match="SDJAX_KERNEL_PLATFORMS=cpu leaves the TPU's kernels out"):
        targets.topology_devices("v5e", "v5e:2x2")


# With a ControlNet (each model call a ControlNet call and a UNet call) in the slow set: its programs are the
# same kinds compiled again, and it doubles the test's time.
@pytest.mark.parametrize("controlnet", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_report_for_a_v5e_slice(tmp_path, controlnet):
    """The one-level MICRO model (drawn with a random ControlNet of its UNet in the slow set) compiled for a
    v5e:2x2 slice."""
    out = tmp_path / "report.json"
    argv = [sys.executable, "-m", "sdjax.bench", "--target", "tpu:v5e:2x2", "--arch", "micro", "--height", "32"]
    argv += ["--width", "32", "--dtype", "bfloat16", "--steps", "3", "--batch", "2", "--json", str(out)]
    argv += ["--controlnet"] if controlnet else []
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    report = json.loads(out.read_text())
    assert report["chips"] == 4 and report["largest_fitting_batch"] == 2
    (row,) = report["rows"]
    step = "control_step" if controlnet else "unet_step"
    for program in ("unet_step", step, "vae_decode", "image"):
        assert row[program]["flops"] > 0 and row[program]["bytes_accessed"] > 0 and row[program]["compile_s"] > 0
        assert row[program]["time_s"] > 0 and row[program]["total_bytes"] > 0
    assert bool(report["controlnet"]) == controlnet
    if controlnet:  # each model call costs more than the UNet's alone
        assert row["control_cost"] > 1.0 and row["control_step"]["flops"] > row["unet_step"]["flops"]
    # Euler a: 3 model calls per batch of 2 images and their decodes, one image at a time as the whole-image
    # program does; 4 chips in the slice
    assert row["decode_s"] == pytest.approx(2 * row["vae_decode"]["time_s"])
    expected = 3 * row[step]["time_s"] + row["decode_s"]
    assert row["image_batch_s"] == pytest.approx(expected)
    assert row["images_per_s_slice"] == pytest.approx(4 * 2 / expected)
    assert "largest per-chip batch that fits: 2" in done.stdout


@pytest.mark.slow  # the default run exports the train step for TPU (test_export.py)
def test_tiny_lora_training_step_on_an_fsdp_slice():
    """The shipped LoRA run config's step compiles for 4 v5e chips with the parameters FSDP-split (the
    Pallas attention and, on the 16x16 latents of 128x128 images, the Pallas convolution with its XLA
    gradient run per device through shard_map) and fits a chip."""
    from train.bench import target_report

    (row,) = target_report("tpu:v5e:2x2", "tiny", 128, 1, ["lora"], "fsdp=-1", None)
    assert row["mesh"] == {"data": 1, "fsdp": 4} and row["fits"]
    assert row["flops"] > 0 and row["time_s"] > 0 and row["images_per_s_chip"] > 0


def test_cost_model_time_counts_bitcast_concatenations_as_free():
    """libtpu prices each instruction it cannot estimate at -1 s; ConcatBitcast moves no data."""
    concat = '%c = bf16[4] custom-call(%a, %b), custom_call_target="ConcatBitcast"\n'
    assert targets.cost_model_seconds(0.25, concat) == 0.25
    assert targets.cost_model_seconds(-2 + 0.004, concat * 2) == pytest.approx(0.004)
    assert targets.cost_model_seconds(-1 + 0.004, "") == -1.0  # something else unpriced: no estimate
    assert targets.cost_model_seconds(-1 + 0.004, concat + "%w = (f32[]) while(%t), body=%b\n") == -1.0
