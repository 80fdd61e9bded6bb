"""A Pallas TPU kernel for the transformer block's feed-forward sublayer, bfloat16:
x + net.2(GEGLU(LayerNorm(x))), diffusers' `norm3` followed by its GEGLU `FeedForward` and the residual.

As XLA compiles the sublayer, the norm's output, the GEGLU product's 2F columns and the F-wide GEGLU
output all go to HBM and are read back. Here each grid step (row block i, column block j of the F inner
features) works in VMEM: at j = 0 it LayerNorms its rows with `norms.layer_norm`, the plain path's own
function (the rows are whole in the block, so the statistics are local; float32, one pass in bfloat16),
into a scratch buffer; then it multiplies them by the hidden and gate column blocks of W1, applies
hidden * gelu(gate) (exact erf
GELU, float32), rounds that to bfloat16 (the GEGLU layer's output dtype) and accumulates its product with
the matching row block of W2 in float32. At the last column block it adds net.2's bias, rounds, and adds
the residual x, rounded once more, as the block's bfloat16 addition would. Only x is read and only the
sublayer's output written; the weights are read once per row block.

The declared cost is the two products' FLOPs, one erf per inner feature and row, the norm's arithmetic
and one rsqrt per row, and the bytes of x, the output and the weights (once per row block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import norms, tpu_conv

ROW_BLOCK = 2048  # rows per grid step (at most)
ROW_BUFFER_BYTES = 24 * 2**20  # x (two buffers), its norm, the output (two buffers) and the float32 sum
WEIGHT_BLOCK_BYTES = 8 * 2**20  # the W1 hidden and gate column blocks and the W2 row block
TEMP_BYTES = 12 * 2**20  # float32 hidden, gate and their product for one (rows, columns) block
VMEM_LIMIT_BYTES = 64 * 2**20


def fits(rows: int, in_features: int, features: int, dtype) -> bool:
    """Whether the kernel takes this sublayer: bfloat16, whole sublane tiles of rows, the inner width F in
    128-lane tiles."""
    return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and rows % 8 == 0 and features % 128 == 0 and in_features > 0


def blocks(rows: int, in_features: int, features: int, itemsize: int = 2) -> tuple[int, int]:
    """(rows, inner columns) per grid step: as many rows as the row buffers allow (fewer row blocks read
    the weights fewer times), then as many columns as the weight and float32 temporary budgets allow."""
    k = in_features
    per_row = 5 * k * itemsize + 4 * k  # x twice, its norm, the output twice (C = K), the float32 sum
    block_rows = tpu_conv.largest_divisor(rows, max(8, min(ROW_BLOCK, ROW_BUFFER_BYTES // per_row)), 8)
    cols_limit = min(WEIGHT_BLOCK_BYTES // (3 * k * itemsize), TEMP_BYTES // (3 * 4 * block_rows))
    return block_rows, tpu_conv.largest_divisor(features, max(128, cols_limit), 128)


def _kernel(
    x_ref, scale_ref, shift_ref, wh_ref, wg_ref, bh_ref, bg_ref, w2_ref, b2_ref, out_ref, xn_ref, sum_ref, *, eps
):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        xn_ref[...] = norms.layer_norm(x_ref[...], scale_ref[...], shift_ref[...], eps, xn_ref.dtype)
        sum_ref[...] = jnp.zeros_like(sum_ref)

    x = xn_ref[...]
    hidden = jnp.dot(x, wh_ref[...], preferred_element_type=jnp.float32) + bh_ref[...]
    gate = jnp.dot(x, wg_ref[...], preferred_element_type=jnp.float32) + bg_ref[...]
    geglu = (hidden * (0.5 * gate * (1.0 + jax.lax.erf(gate * (2.0**-0.5))))).astype(x.dtype)
    sum_ref[...] += jnp.dot(geglu, w2_ref[...], preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        y = (sum_ref[...] + b2_ref[...]).astype(out_ref.dtype)
        out_ref[...] = (x_ref[...].astype(jnp.float32) + y.astype(jnp.float32)).astype(out_ref.dtype)


def feed_forward(x_MK, scale_K, shift_K, eps: float, w_KF2, b_F2, w_FK, b_K) -> jax.Array:
    """x + (geglu(LayerNorm(x) @ w_KF2 + b_F2) @ w_FK + b_K) over the rows of x (M, K): (M, K) in x's dtype.
    geglu splits its 2F columns into (hidden, gate) and returns hidden * gelu(gate), rounded to x's dtype
    (see the module docstring). Needs `fits`."""
    m, k = x_MK.shape
    f = w_KF2.shape[1] // 2
    itemsize = x_MK.dtype.itemsize
    rows, cols = blocks(m, k, f, itemsize)
    col_blocks, row_blocks = f // cols, m // rows
    cost = pl.CostEstimate(
        flops=2 * m * k * 2 * f + 2 * m * f * k + 8 * m * k,
        transcendentals=m * f + m,
        bytes_accessed=(2 * x_MK.size + row_blocks * (w_KF2.size + w_FK.size)) * itemsize + (2 * f + 3 * k) * 4,
    )
    as_row = lambda a: a.astype(jnp.float32).reshape(1, -1)  # noqa: E731
    whole = pl.BlockSpec((1, k), lambda i, j: (0, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=float(eps)),
        grid=(row_blocks, col_blocks),
        in_specs=[
            pl.BlockSpec((rows, k), lambda i, j: (i, 0)),
            whole,
            whole,
            pl.BlockSpec((k, cols), lambda i, j: (0, j)),
            pl.BlockSpec((k, cols), lambda i, j: (0, j + col_blocks)),
            pl.BlockSpec((1, cols), lambda i, j: (0, j)),
            pl.BlockSpec((1, cols), lambda i, j: (0, j + col_blocks)),
            pl.BlockSpec((cols, k), lambda i, j: (j, 0)),
            whole,
        ],
        out_specs=pl.BlockSpec((rows, k), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((m, k), x_MK.dtype),
        scratch_shapes=[pltpu.VMEM((rows, k), x_MK.dtype), pltpu.VMEM((rows, k), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        cost_estimate=cost,
    )(x_MK, as_row(scale_K), as_row(shift_K), w_KF2, w_KF2, as_row(b_F2), as_row(b_F2), w_FK, as_row(b_K))
