"""A Pallas TPU flash-attention kernel over heads packed in lanes, as the projections can write them.

JAX's Pallas flash kernel wants (B, H, T, D): for SD 1.5's 40-wide heads that layout pads every row from 40
to 128 lanes, and the transposes to and from it cost copies around every call (README "Accelerators: TPU
and GPU"). This kernel reads q, k and v as (B, T, G * 128) with `128 // D` whole heads side by side in each
128-lane group ("packed", `pack`). SD 2's 64-wide heads are packed as the projections write them; for
others `kernels.projected_attention` regroups the projection weights' columns (and the output
projection's rows) instead of the activations, so the products write the packed layout themselves. A grid
step (image, lane group, query block, key block) runs the online softmax of each head of its group: the
scores of head j are q's lanes of head j (the others masked to zero) against all 128 lanes of k, so no
lane is ever shifted; head j's output lanes take its probabilities times v.

`packed_attention_out` also applies the attention's output projection and the transformer block's
residual: its grid runs the lane groups innermost but one, and each group's normalised output, rounded
as `packed_attention` returns it, is multiplied by that group's rows of to_out's weights into a float32
sum; the bias and the residual follow after the last group. The attention output (64x64 latents at batch
2: 6.3 MB per layer) is never written and read back.

The declared cost is that of the attention itself, as JAX's flash kernel declares it and as the TPU cost
model prices XLA's own products (checked: scores over 40-wide heads cost 0.31x those over 128-wide heads):
4 B H Tq Tk D FLOPs, the exponentials, and the packed tensors' bytes read and written once (with the
output projection: its product's FLOPs over the packed lanes, the residual's and the output's bytes, and
the weights' once per query block). On the chip every head costs a full 128-lane pass, in this kernel as
in JAX's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import tpu_conv

LANES = 128  # a lane group: the TPU's vector and matrix-unit width
BLOCK = 512  # tokens per query or key block (at most)
_NEG = -1e30  # the running maximum's start and masked scores: exp() of it is 0, and no inf - inf


def heads_per_group(head_dim: int) -> int:
    """Whole heads in one 128-lane group (head_dim <= 128)."""
    return LANES // head_dim


def _packing(lanes: int, head_dim: int) -> np.ndarray | None:
    """The 0/1 matrix (H * D, G * 128) that moves input lane l to its place in its head's lane group
    (`pack`); None when D divides 128 and H * D is a multiple of 128 (the layout is already packed)."""
    width = heads_per_group(head_dim) * head_dim
    if width == LANES and lanes % LANES == 0:
        return None
    lane = np.arange(lanes)
    moves = np.zeros((lanes, -(-lanes // width) * LANES), np.float32)
    moves[lane, lane // width * LANES + lane % width] = 1.0
    return moves


def pack(x_BTC: jax.Array, head_dim: int) -> jax.Array:
    """(..., H * D) -> (..., G * 128): lane group g holds the `p = 128 // D` heads p * g .. p * g + p - 1
    (the input's lanes [g * p * D, (g + 1) * p * D)), zeros after them and after the last head. The input
    itself when D divides 128 and H * D is a multiple of 128. Done as one product with a 0/1 matrix: on a
    TPU one instruction, where slices and a concatenation were four to eight (SD 1.5's UNet step, one v5e,
    cost model: 14.73 -> 14.29 ms for its 128 packed weights). A non-finite value spreads along its row
    (0 x inf is NaN); such weights give non-finite images either way."""
    moves = _packing(x_BTC.shape[-1], head_dim)
    if moves is None:
        return x_BTC
    exact = None if x_BTC.dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST  # one product per output
    moved = jnp.matmul(x_BTC, moves.astype(x_BTC.dtype), precision=exact, preferred_element_type=jnp.float32)
    return moved.astype(x_BTC.dtype)


def _online_softmax_step(
    q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, *, key_block, p, d, scale, key_len, block_k, masked
):
    """Key block `key_block` of the online softmax over a lane group's p heads (the first one resets the
    running state).

    m_ref, l_ref (p, tq, 128) float32: each head's running row maximum and sum (the same in every lane);
    acc_ref (tq, 128) float32: the unnormalised output, each head in its own lanes."""

    @pl.when(key_block == 0)
    def _():
        m_ref[...] = jnp.full(m_ref.shape, _NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    q = q_ref[0]
    k = k_ref[0]
    v = v_ref[0]
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    real_key = None
    if masked:
        real_key = key_block * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < key_len
    acc = acc_ref[...]
    for j in range(p):
        in_head = (lane >= j * d) & (lane < (j + 1) * d)
        q_j = jnp.where(in_head, q, jnp.zeros_like(q))
        s = jax.lax.dot_general(q_j, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if real_key is not None:
            s = jnp.where(real_key, s, _NEG)
        m_prev = m_ref[j]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        e = jnp.exp(s - m_next[:, :1])
        l_ref[j] = alpha * l_ref[j] + jnp.sum(e, axis=1, keepdims=True)
        m_ref[j] = m_next
        pv = jnp.dot(e.astype(v.dtype), v, preferred_element_type=jnp.float32)
        acc = jnp.where(in_head, acc * alpha + pv, acc)
    acc_ref[...] = acc


def _normalised(acc_ref, l_ref, *, p, d) -> jax.Array:
    """The group's attention output (tq, 128) float32: each head's lanes divided by its softmax sum."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    acc = acc_ref[...]
    total = jnp.ones_like(acc)
    for j in range(p):
        total = jnp.where((lane >= j * d) & (lane < (j + 1) * d), l_ref[j], total)
    return acc / total


def _attention_kernel(q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, p, d, **softmax):
    """One (image, lane group, query block, key block) grid step: the group's heads' attention output."""
    kb = pl.program_id(3)
    _online_softmax_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, key_block=kb, p=p, d=d, **softmax)

    @pl.when(kb == pl.num_programs(3) - 1)
    def _():
        o_ref[0] = _normalised(acc_ref, l_ref, p=p, d=d).astype(o_ref.dtype)


def _attention_out_kernel(
    q_ref, k_ref, v_ref, wo_ref, bo_ref, x_ref, o_ref, m_ref, l_ref, acc_ref, sum_ref, *, p, d, **softmax
):
    """One (image, query block, lane group, key block) grid step of x + to_out(attention): at a group's last
    key block its output, rounded to the attention's dtype, times the group's rows of to_out's weights joins
    the float32 sum; after the last group the bias, then the residual x, each rounded as the layer would."""
    g, kb = pl.program_id(2), pl.program_id(3)

    @pl.when((g == 0) & (kb == 0))
    def _():
        sum_ref[...] = jnp.zeros_like(sum_ref)

    _online_softmax_step(q_ref, k_ref, v_ref, m_ref, l_ref, acc_ref, key_block=kb, p=p, d=d, **softmax)

    @pl.when(kb == pl.num_programs(3) - 1)
    def _():
        heads = _normalised(acc_ref, l_ref, p=p, d=d).astype(q_ref.dtype)
        sum_ref[...] += jnp.dot(heads, wo_ref[...], preferred_element_type=jnp.float32)

        @pl.when(g == pl.num_programs(2) - 1)
        def _():
            y = (sum_ref[...] + bo_ref[...]).astype(q_ref.dtype)
            o_ref[0] = (x_ref[0].astype(jnp.float32) + y.astype(jnp.float32)).astype(o_ref.dtype)


def groups(heads: int, head_dim: int) -> int:
    """Lane groups of `heads` packed heads of `head_dim`: packed tensors are `groups * 128` lanes wide."""
    return -(-heads // heads_per_group(head_dim))


def _tiling(q_BQL, k_BKL, heads: int, head_dim: int, key_len: int | None, offsets: tuple[int, int, int]):
    """(real key count, lanes G * 128 of the packed heads, query block, key block) for packed q (B, Tq,
    >= G * 128) and k (B, Tk, >= G * 128) whose heads start at the lane groups `offsets` (q, k, v); a one-line
    ValueError when they cannot be tiled."""
    q_len, k_len = q_BQL.shape[1], k_BKL.shape[1]
    lanes = groups(heads, head_dim) * LANES
    widths = (q_BQL.shape[2], k_BKL.shape[2], k_BKL.shape[2])
    if q_len % 8 or k_len % LANES or any(w % LANES for w in widths):
        raise ValueError(f"packed_attention: token counts {q_len}, {k_len} or lanes {widths} not tileable")
    if any(o * LANES + lanes > w for o, w in zip(offsets, widths, strict=True)):
        raise ValueError(f"packed_attention: lane groups from {offsets} overrun the tensors' {widths} lanes")
    blocks = tpu_conv.largest_divisor(q_len, BLOCK, 8), tpu_conv.largest_divisor(k_len, BLOCK, 8)
    return (k_len if key_len is None else key_len), lanes, *blocks


def packed_attention(
    q_BQL,
    k_BKL,
    v_BKL,
    *,
    heads: int,
    head_dim: int,
    key_len: int | None = None,
    offsets: tuple[int, int, int] = (0, 0, 0),
) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per head on packed tensors (`pack`): (B, Tq, G * 128), (B, Tk, G * 128) x 2
    -> (B, Tq, G * 128) in q's dtype (packed the same way, zeros in the padding lanes), softmax in float32.
    Tq must be a multiple of 8 and Tk a multiple of 128 (pad the keys and pass the real count as `key_len`:
    the padded keys are masked out). `offsets`: the lane groups at which q's, k's and v's heads start, so
    that one tensor can hold several of them side by side (a self-attention's q, k and v as one product's
    output, (B, T, 3 G * 128), offsets (0, G, 2 G)); the tensors are read nowhere else."""
    b, q_len = q_BQL.shape[:2]
    k_len = k_BKL.shape[1]
    key_len, lanes, block_q, block_k = _tiling(q_BQL, k_BKL, heads, head_dim, key_len, offsets)
    p = heads_per_group(head_dim)
    itemsize = q_BQL.dtype.itemsize
    cost = pl.CostEstimate(
        flops=4 * b * heads * q_len * key_len * head_dim,
        transcendentals=b * heads * q_len * key_len,
        bytes_accessed=2 * b * (q_len + k_len) * lanes * itemsize,
    )
    oq, ok, ov = offsets
    softmax = _softmax_args(head_dim, key_len, k_len, block_k)
    return pl.pallas_call(
        functools.partial(_attention_kernel, p=p, d=head_dim, **softmax),
        grid=(b, lanes // LANES, q_len // block_q, k_len // block_k),
        in_specs=[
            pl.BlockSpec((1, block_q, LANES), lambda n, g, i, j: (n, i, g + oq)),
            pl.BlockSpec((1, block_k, LANES), lambda n, g, i, j: (n, j, g + ok)),
            pl.BlockSpec((1, block_k, LANES), lambda n, g, i, j: (n, j, g + ov)),
        ],
        out_specs=pl.BlockSpec((1, block_q, LANES), lambda n, g, i, j: (n, i, g)),
        out_shape=jax.ShapeDtypeStruct((b, q_len, lanes), q_BQL.dtype),
        scratch_shapes=_softmax_scratch(p, block_q),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
    )(q_BQL, k_BKL, v_BKL)


def _softmax_args(head_dim: int, key_len: int, k_len: int, block_k: int) -> dict:
    """`_online_softmax_step`'s static arguments: the score scale, the real key count and the key block."""
    return dict(scale=head_dim**-0.5, key_len=key_len, block_k=block_k, masked=key_len < k_len)


def _softmax_scratch(p: int, block_q: int) -> list:
    """The running maxima and sums of the group's p heads, and the unnormalised output (float32)."""
    return [
        pltpu.VMEM((p, block_q, LANES), jnp.float32),
        pltpu.VMEM((p, block_q, LANES), jnp.float32),
        pltpu.VMEM((block_q, LANES), jnp.float32),
    ]


def packed_attention_out(
    q_BQL,
    k_BKL,
    v_BKL,
    wo_LC,
    bo_C,
    x_BQC,
    *,
    heads: int,
    head_dim: int,
    key_len: int | None = None,
    offsets: tuple[int, int, int] = (0, 0, 0),
) -> jax.Array:
    """x + (packed_attention(q, k, v) @ wo + bo): the attention sublayer's output projection (to_out.0, its
    rows packed as q's lanes: (G * 128, C), zero rows for the padding lanes) and its residual x (B, Tq, C),
    in one kernel: (B, Tq, C) in x's dtype. The attention output is rounded to q's dtype before the product
    (as `packed_attention` returns it), the product accumulated in float32, the bias added and the result
    rounded to q's dtype, then the residual added and rounded to x's, as the layers compute it. The
    attention output is never written out. Same token and `offsets` rules as `packed_attention`."""
    b, q_len = q_BQL.shape[:2]
    k_len, channels = k_BKL.shape[1], wo_LC.shape[1]
    key_len, lanes, block_q, block_k = _tiling(q_BQL, k_BKL, heads, head_dim, key_len, offsets)
    p = heads_per_group(head_dim)
    itemsize = q_BQL.dtype.itemsize
    q_blocks = q_len // block_q
    cost = pl.CostEstimate(
        flops=4 * b * heads * q_len * key_len * head_dim + 2 * b * q_len * lanes * channels,
        transcendentals=b * heads * q_len * key_len,
        bytes_accessed=(b * (q_len + 2 * k_len) * lanes + 2 * x_BQC.size + b * q_blocks * wo_LC.size) * itemsize
        + 4 * channels,
    )
    oq, ok, ov = offsets
    softmax = _softmax_args(head_dim, key_len, k_len, block_k)
    rows = pl.BlockSpec((1, block_q, channels), lambda n, i, g, j: (n, i, 0))
    return pl.pallas_call(
        functools.partial(_attention_out_kernel, p=p, d=head_dim, **softmax),
        grid=(b, q_blocks, lanes // LANES, k_len // block_k),
        in_specs=[
            pl.BlockSpec((1, block_q, LANES), lambda n, i, g, j: (n, i, g + oq)),
            pl.BlockSpec((1, block_k, LANES), lambda n, i, g, j: (n, j, g + ok)),
            pl.BlockSpec((1, block_k, LANES), lambda n, i, g, j: (n, j, g + ov)),
            pl.BlockSpec((LANES, channels), lambda n, i, g, j: (g, 0)),
            pl.BlockSpec((1, channels), lambda n, i, g, j: (0, 0)),
            rows,
        ],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(x_BQC.shape, x_BQC.dtype),
        scratch_shapes=[*_softmax_scratch(p, block_q), pltpu.VMEM((block_q, channels), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        cost_estimate=cost,
    )(q_BQL, k_BKL, v_BKL, wo_LC, bo_C.astype(jnp.float32).reshape(1, channels), x_BQC)
