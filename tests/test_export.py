"""The programs users run on accelerators lower for them from this CPU host (`jax.export`, tiny
architecture): the whole-image program and the fine-tuning step, for CUDA and TPU, with no CPU-only custom
call (LAPACK, DUCC FFT, CPU host callbacks, XLA:CPU library fusions) left in them."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import testing
from sdjax.generate import modules, place_inputs, program
from sdjax.request import prepare

KERNEL_PLATFORMS = "all"  # lowers for the TPU and CUDA: every platform's kernels traced (conftest.py)

PLATFORMS = ("cuda", "tpu")
CPU_ONLY = re.compile(r"lapack|ducc|cpu|ynn|onednn|eigen", re.IGNORECASE)


def custom_call_targets(exported: jax.export.Exported) -> set[str]:
    """Every custom-call target named in an exported module's StableHLO."""
    text = exported.mlir_module()
    return set(re.findall(r"stablehlo\.custom_call @([\w.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text)
    )


@pytest.fixture(scope="module")
def pipe():
    return testing.random_pipeline("tiny")


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("mode", ["txt2img", "inpaint"])
def test_whole_image_program_exports(pipe, platform, mode):
    options = dict(num_inference_steps=3, max_steps=3, height=64, width=64, mesh=None, scheduler="euler_a")
    if mode == "inpaint":
        image = np.full((64, 64, 3), 128, np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        options.update(image=image, mask_image=mask, strength=0.7)
    plan, inputs = prepare(pipe, ["a red cube", "a cat"], **options)
    assert plan.mode == mode
    jitted = program(platform)
    static = dict(plan=plan, **modules(pipe))
    exported = jax.export.export(jitted, platforms=(platform,))(pipe.params, place_inputs(inputs, None), **static)
    targets = custom_call_targets(exported)
    assert not {t for t in targets if CPU_ONLY.search(t)}, targets
    assert exported.out_avals[0].shape == (2, 64, 64, 3)
    if platform == "tpu":
        assert "tpu_custom_call" in targets  # the Pallas flash attention


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_exports(pipe, platform):
    from train import model
    from train.config import Images, Optim, TrainConfig
    from train.step import init_state, make_optimizer, train_step

    config = TrainConfig(model="random:tiny", mode="lora", dtype="bfloat16", remat="full").replace(
        optim=Optim(batch_size=2), images=Images(resolution=64), lora_text_encoder=True
    )
    setup = model.make_setup(config, pipe)
    optimizer = make_optimizer(config.optim)
    trainable, frozen = model.split_params(setup, jax.random.key(0))
    state = init_state(trainable, jax.random.key_data(jax.random.key(0)), optimizer=optimizer, ema=False)
    batch = {
        "pixels": jnp.zeros((1, 2, 64, 64, 3), jnp.float32),
        "ids": jnp.zeros((1, 2, 77), jnp.int32),
        "row": jnp.arange(2, dtype=jnp.int32)[None],
        "weight": jnp.ones((1, 2), jnp.float32),
        "count": jnp.ones((1, 2), jnp.float32),
    }
    step = jax.jit(functools.partial(train_step, setup=setup, optimizer=optimizer))
    exported = jax.export.export(step, platforms=(platform,))(state, frozen, batch)
    targets = custom_call_targets(exported)
    assert not {t for t in targets if CPU_ONLY.search(t)}, targets
