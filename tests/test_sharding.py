"""Scale-out: mesh specs and parameter rules, and the images of 1 device on 8 simulated CPU devices
(data=2,fsdp=4 with FSDP-sharded parameters, and data=8 in the slow set; the same but for float rounding,
`reference.assert_same_images_but_rounding`), and on 2 processes x 4 devices (bit-identical to 1 process x 8)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from reference import (
    TINY_CLIP,
    TINY_UNET,
    TINY_VAE,
    assert_same_images_but_rounding,
    build_text_encoder,
    build_unet,
    build_vae,
    save_folder,
)

import sdjax
from sdjax import sharding, testing

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (3, 8)  # a batch padded to the mesh's 8 rows, and a whole one
PROMPTS = ["a red apple", "a (blue:1.2) car", "a green tree", "a yellow boat"]


def generate_all(pipe, mesh) -> dict[str, np.ndarray]:
    """Images of every batch size, a stochastic sampler, seeds 7.. (the prompts cycle)."""
    out = {}
    for batch in BATCHES:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        out[f"b{batch}"] = pipe.generate(prompts, num_inference_steps=4, scheduler="euler_a", seed=7, mesh=mesh)
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    models = build_unet(TINY_UNET), build_vae(TINY_VAE), build_text_encoder(TINY_CLIP)
    return save_folder(tmp_path_factory.mktemp("shard") / "tiny", *models)


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """The one-level MICRO model with random weights: for the checks of how work is split across processes,
    which do not depend on the model's depth (the FSDP split above needs the tiny model's larger tensors)."""
    return testing.random_pipeline(testing.MICRO).save_pretrained(tmp_path_factory.mktemp("shard") / "micro")


def _subprocess_env(devices: int) -> dict[str, str]:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}


_EIGHT_DEVICES = """
import sys
import numpy as np, jax
sys.path.insert(0, {tests!r})
import sdjax
from test_sharding import generate_all
assert jax.device_count() == 8
pipe = sdjax.load_pipeline({folder!r})
results = {{}}
spec = {spec!r}
placed = pipe.on_mesh(spec)
if "fsdp=4" in spec:
    unet = placed.params["unet"]["down_blocks.1"]["resnets.0"]["conv2"]["kernel"]
    assert "fsdp" in tuple(unet.sharding.spec), unet.sharding  # FSDP-split at rest
np.savez({out!r}, **generate_all(placed, spec))
"""


# The batch split in two with the UNet's weights FSDP-split in four (batch 3 padded to 4 rows) in the default
# run; the batch split in eight (batch 3 padded to 8 rows) in the slow set.
@pytest.mark.parametrize("spec", ["data=2,fsdp=4", pytest.param("data=8", marks=pytest.mark.slow)])
def test_one_device_and_eight_give_identical_images(folder, tmp_path, spec):
    out = tmp_path / "eight.npz"
    code = _EIGHT_DEVICES.format(tests=str(ROOT / "tests"), folder=str(folder), out=str(out), spec=spec)
    job = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(8), capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-3000:]
    eight = np.load(out)
    pipe = sdjax.load_pipeline(folder)
    assert jax.device_count() == 1

    ours = generate_all(pipe, None)
    for key, images in ours.items():
        assert_same_images_but_rounding(eight[key], images, err_msg=f"{spec} {key}")
    assert not np.array_equal(ours["b8"][0], ours["b8"][4])  # same prompt, different seeds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_the_images_of_one(micro_folder, tmp_path):
    """2 processes x 4 CPU devices running sample.py --prompts-file write exactly the files (names and
    pixels) of 1 process with 8 devices."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{p}, number {i}" for i, p in enumerate(PROMPTS * 2)) + "\na lone last one\n")
    common = [sys.executable, str(ROOT / "sample.py"), "--model", str(micro_folder), "--prompts-file", str(prompts)]
    common += ["--steps", "3", "-n", "4", "--seed", "50", "--scheduler", "dpmpp_2m_sde_karras", "--cache-dir", "off"]
    single = subprocess.run(
        common + ["--out", str(tmp_path / "one")], env=_subprocess_env(8), capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    jobs = [
        subprocess.Popen(
            common
            + ["--out", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
            + ["--process-id", str(i)],
            env=_subprocess_env(4),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    errors = [job.communicate(timeout=600)[1] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), "\n".join(e[-2000:] for e in errors)
    assert "over 8 devices, 2 process(es)" in errors[0] and "over 8 devices, 1 process(es)" in single.stderr
    one = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    two = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert len(one) == 9 and one == two
    for name in one:
        with Image.open(tmp_path / "one" / name) as a, Image.open(tmp_path / "two" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            assert a.text == b.text


def test_mesh_specs():
    assert sharding.parse_mesh_spec(None, 8) == {"data": 8, "fsdp": 1}
    assert sharding.parse_mesh_spec("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh_spec("fsdp=-1", 8) == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh_spec("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2}
    for spec, message in [
        ("data=3", "has 3 devices but there are 8"),
        ("model=8", "expected comma-separated AXIS=SIZE"),
        ("data=x", "is not an integer"),
        ("data=-1,fsdp=-1", "at most one -1"),
        ("data=-1,fsdp=3", "do not split into 3 x N"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            sharding.parse_mesh_spec(spec, 8)


def test_fsdp_rule_shards_the_largest_divisible_axis():
    mesh = jax.make_mesh((1, 1), sharding.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)

    class FakeMesh:
        shape = {"data": 2, "fsdp": 4}

    params = {"big": np.zeros((3, 3, 64, 320)), "odd": np.zeros((3, 333, 77)), "norm": np.zeros(320)}
    specs = sharding.param_specs(params, FakeMesh())
    P = jax.sharding.PartitionSpec
    assert specs == {"big": P(None, None, None, "fsdp"), "odd": P(), "norm": P()}
    assert sharding.param_specs(params, mesh) == {"big": P(), "odd": P(), "norm": P()}
    replicated = sharding.param_specs(params, FakeMesh(), rules=((r"big", sharding.REPLICATED),))
    assert replicated["big"] == P()
    assert json.dumps(sharding.parse_mesh_spec("", 1)) == '{"data": 1, "fsdp": 1}'
