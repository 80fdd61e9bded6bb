"""A Pallas TPU kernel for the GEGLU feed-forward's first half: x @ W + b split into (hidden, gate), then
hidden * gelu(gate) (exact erf GELU), bfloat16.

As XLA compiles it, the product writes both halves (2F columns) to HBM and the GEGLU fusion reads them back;
this kernel keeps the two halves' sums in VMEM and writes only the F-wide result, rounded once. A grid
step (column block j, row block i) multiplies a (rows, K) block of x by the hidden and the gate column
blocks of W; the column blocks are the outer loop, so each weight block is read once and x once per
column block.

Optionally the transformer block's LayerNorm before the feed-forward (`norm3`) runs here too: each (rows, K)
block holds whole rows, so the kernel normalises them in float32 as it reads them (once per column block)
and rounds them to x's dtype, as the norm's own output would be. The normalised rows are then never
written out.

The declared cost is the product's FLOPs, one erf per output, and the bytes of x (once per column block),
W and the output; with the norm, its arithmetic and one rsqrt per row and column block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import tpu_conv

ROW_BLOCK = 512  # rows of x per grid step (at most)
WEIGHT_BLOCK_BYTES = 8 * 2**20  # hidden + gate column blocks held in VMEM
VMEM_LIMIT_BYTES = 64 * 2**20


def fits(rows: int, in_features: int, features: int, dtype) -> bool:
    """Whether the kernel takes this GEGLU: bfloat16, whole sublane tiles of rows, F in 128-lane tiles."""
    return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and rows % 8 == 0 and features % 128 == 0 and in_features > 0


def _layer_norm_rows(x, scale, bias, eps: float, dtype):
    """The rows of x (rows, K) LayerNormed in float32 (one-pass variance), rounded to `dtype`."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(x32 * x32, axis=-1, keepdims=True) - mean * mean, 0.0)
    return ((x32 - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias).astype(dtype)


def _geglu_kernel(x_ref, wh_ref, wg_ref, bh_ref, bg_ref, *rest, eps=None):
    out_ref = rest[-1]
    x = x_ref[...]
    if eps is not None:
        scale_ref, shift_ref = rest[:2]
        x = _layer_norm_rows(x, scale_ref[...], shift_ref[...], eps, x.dtype)
    hidden = jnp.dot(x, wh_ref[...], preferred_element_type=jnp.float32) + bh_ref[...]
    gate = jnp.dot(x, wg_ref[...], preferred_element_type=jnp.float32) + bg_ref[...]
    gelu = 0.5 * gate * (1.0 + jax.lax.erf(gate * (2.0**-0.5)))
    out_ref[...] = (hidden * gelu).astype(out_ref.dtype)


def geglu(x_MK: jax.Array, w_KF2: jax.Array, b_F2: jax.Array, norm=None) -> jax.Array:
    """(M, K) @ (K, 2F) + (2F,) -> hidden (first F columns) * gelu(gate) (last F): (M, F) in x's dtype,
    summed and activated in float32, rounded once. With `norm` (scale (K,), bias (K,), eps), each row of x
    is LayerNormed first (float32 statistics, one pass, rounded to x's dtype). Needs `fits`."""
    m, k = x_MK.shape
    f = w_KF2.shape[1] // 2
    itemsize = x_MK.dtype.itemsize
    cols = tpu_conv.largest_divisor(f, max(128, WEIGHT_BLOCK_BYTES // (2 * 2 * k * itemsize)), 128)
    rows = tpu_conv.largest_divisor(m, ROW_BLOCK, 8)
    col_blocks = f // cols
    cost = pl.CostEstimate(
        flops=2 * m * k * 2 * f,
        transcendentals=m * f,
        bytes_accessed=(x_MK.size * col_blocks + w_KF2.size + m * f) * itemsize + 2 * f * 4,
    )
    bias = b_F2.astype(jnp.float32).reshape(1, 2 * f)
    operands = [x_MK, w_KF2, w_KF2, bias, bias]
    norm_specs = []
    if norm is not None:
        scale, shift, eps = norm
        operands += [scale.astype(jnp.float32).reshape(1, k), shift.astype(jnp.float32).reshape(1, k)]
        norm_specs = [pl.BlockSpec((1, k), lambda j, i: (0, 0))] * 2
        cost = pl.CostEstimate(
            flops=cost.flops + 8 * m * k * col_blocks,
            transcendentals=cost.transcendentals + m * col_blocks,
            bytes_accessed=cost.bytes_accessed + 2 * k * 4,
        )
    kernel = _geglu_kernel if norm is None else functools.partial(_geglu_kernel, eps=float(norm[2]))
    return pl.pallas_call(
        kernel,
        grid=(col_blocks, m // rows),
        in_specs=[
            pl.BlockSpec((rows, k), lambda j, i: (i, 0)),
            pl.BlockSpec((k, cols), lambda j, i: (0, j)),
            pl.BlockSpec((k, cols), lambda j, i: (0, j + col_blocks)),
            pl.BlockSpec((1, cols), lambda j, i: (0, j)),
            pl.BlockSpec((1, cols), lambda j, i: (0, j + col_blocks)),
            *norm_specs,
        ],
        out_specs=pl.BlockSpec((rows, cols), lambda j, i: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, f), x_MK.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        cost_estimate=cost,
    )(*operands)
