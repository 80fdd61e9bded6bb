"""The per-backend kernels (sdjax.nn.kernels) against the plain reference on this CPU: the Pallas TPU
flash attention in interpret mode, XLA's convolution gradients against the CPU's per-tap products, and
which kernel each platform's lowering actually gets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import kernels
from sdjax.nn.attention import dot_product_attention


def _qkv(q_len, k_len, heads, dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, q_len, heads, dim), dtype)
    k = jax.random.normal(keys[1], (2, k_len, heads, dim), dtype)
    v = jax.random.normal(keys[2], (2, k_len, heads, dim), dtype)
    return q, k, v


@pytest.mark.parametrize(
    "q_len, k_len, heads, dim",
    [(64, 64, 2, 40), (128, 77, 2, 80), (256, 256, 1, 160)],  # SD's 8x8 map, cross-attention, a wide head
)
def test_tpu_flash_attention_equals_the_reference(q_len, k_len, heads, dim):
    q, k, v = _qkv(q_len, k_len, heads, dim)
    with pltpu.force_tpu_interpret_mode():
        ours = kernels.flash_attention_tpu(q, k, v, block=128)
    np.testing.assert_allclose(ours, dot_product_attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_tpu_flash_attention_in_bfloat16():
    q, k, v = _qkv(128, 77, 2, 40, jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        ours = kernels.flash_attention_tpu(q, k, v).astype(jnp.float32)
    reference = dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(ours, reference, rtol=0.03, atol=0.03)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_xla_and_product_convolution_gradients_agree(stride, padding):
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 6))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 6, 5))
    y = kernels._conv_nhwc(x, kernel, stride, padding)
    dy = jax.random.normal(jax.random.key(3), y.shape)
    xla = kernels._conv2d_bwd_xla(stride, padding, x, kernel, dy)
    products = kernels._conv2d_bwd_products(stride, padding, x, kernel, dy)
    for a, b in zip(xla, products, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_each_platform_lowers_its_own_kernels():
    """TPU lowering gets the Pallas kernel (a tpu_custom_call) and XLA's convolution for a small 3x3 map;
    CUDA lowering neither the TPU kernel nor the CPU's products; CPU the products (no convolution)."""

    def block(q, k, v, x, kernel):
        return kernels.attention(q, k, v), kernels.conv(x, kernel, 1, 1)

    q, k, v = _qkv(64, 77, 2, 40)
    x, kernel = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    text = {
        p: jax.export.export(jax.jit(block), platforms=(p,))(q, k, v, x, kernel).mlir_module()
        for p in ("tpu", "cuda", "cpu")
    }
    assert "tpu_custom_call" in text["tpu"] and "convolution" in text["tpu"]
    assert "tpu_custom_call" not in text["cuda"] and "convolution" in text["cuda"]
    assert "tpu_custom_call" not in text["cpu"] and "convolution" not in text["cpu"]
