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

The declared cost is that of the attention itself, as JAX's flash kernel declares it and as the TPU cost
model prices XLA's own products (checked: scores over 40-wide heads cost 0.31x those over 128-wide heads):
4 B H Tq Tk D FLOPs, the exponentials, and the packed tensors' bytes read and written once. On the chip
every head costs a full 128-lane pass, in this kernel as in JAX's.
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


def _attention_kernel(q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, p, d, scale, key_len, block_k, masked):
    """One (image, lane group, query block, key block) step of the online softmax over the group's p heads.

    m_ref, l_ref (p, tq, 128) float32: each head's running row maximum and sum (the same in every lane);
    acc_ref (tq, 128) float32: the unnormalised output, each head in its own lanes."""
    kb = pl.program_id(3)

    @pl.when(kb == 0)
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
        real_key = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < key_len
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

    @pl.when(kb == pl.num_programs(3) - 1)
    def _():
        total = jnp.ones_like(acc)
        for j in range(p):
            total = jnp.where((lane >= j * d) & (lane < (j + 1) * d), l_ref[j], total)
        o_ref[0] = (acc_ref[...] / total).astype(o_ref.dtype)


def packed_attention(q_BQL, k_BKL, v_BKL, *, heads: int, head_dim: int, key_len: int | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v per head on packed tensors (`pack`): (B, Tq, G * 128), (B, Tk, G * 128) x 2
    -> (B, Tq, G * 128) in q's dtype (packed the same way, zeros in the padding lanes), softmax in float32.
    Tq must be a multiple of 8 and Tk a multiple of 128 (pad the keys and pass the real count as `key_len`:
    the padded keys are masked out)."""
    b, q_len, lanes = q_BQL.shape
    k_len = k_BKL.shape[1]
    key_len = k_len if key_len is None else key_len
    if q_len % 8 or k_len % LANES or lanes % LANES:
        raise ValueError(f"packed_attention: token counts {q_len}, {k_len} or lanes {lanes} not tileable")
    p = heads_per_group(head_dim)
    groups = lanes // LANES
    block_q = tpu_conv.largest_divisor(q_len, BLOCK, 8)
    block_k = tpu_conv.largest_divisor(k_len, BLOCK, 8)
    itemsize = q_BQL.dtype.itemsize
    cost = pl.CostEstimate(
        flops=4 * b * heads * q_len * key_len * head_dim,
        transcendentals=b * heads * q_len * key_len,
        bytes_accessed=(2 * q_BQL.size + k_BKL.size + v_BKL.size) * itemsize,
    )
    kernel = functools.partial(
        _attention_kernel,
        p=p,
        d=head_dim,
        scale=head_dim**-0.5,
        key_len=key_len,
        block_k=block_k,
        masked=key_len < k_len,
    )
    return pl.pallas_call(
        kernel,
        grid=(b, groups, q_len // block_q, k_len // block_k),
        in_specs=[
            pl.BlockSpec((1, block_q, LANES), lambda n, g, i, j: (n, i, g)),
            pl.BlockSpec((1, block_k, LANES), lambda n, g, i, j: (n, j, g)),
            pl.BlockSpec((1, block_k, LANES), lambda n, g, i, j: (n, j, g)),
        ],
        out_specs=pl.BlockSpec((1, block_q, LANES), lambda n, g, i, j: (n, i, g)),
        out_shape=jax.ShapeDtypeStruct(q_BQL.shape, q_BQL.dtype),
        scratch_shapes=[
            pltpu.VMEM((p, block_q, LANES), jnp.float32),
            pltpu.VMEM((p, block_q, LANES), jnp.float32),
            pltpu.VMEM((block_q, LANES), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=cost,
    )(q_BQL, k_BKL, v_BKL)
