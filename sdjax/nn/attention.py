"""Scaled dot-product attention whose memory stays linear in the number of query tokens.

At 1024x1024 the first SD 1.5 self-attention has 16,384 tokens: its full score matrix for a CFG batch of
2 with 8 heads would take 17 GB in fp32. When the scores of one call would exceed a byte budget, the
queries are processed in chunks under `lax.map`, so only one chunk of scores lives at a time; the keys
and values stay whole (they are small next to the scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sdjax.nn.precision import precision

# Score matrices up to this size are computed in one piece. Above it, queries are chunked so that one
# chunk's scores stay at or below it.
SCORE_BUDGET_BYTES = 256 * 2**20


def _largest_divisor_at_most(n: int, limit: int) -> int:
    limit = max(1, min(n, limit))
    for d in range(limit, 0, -1):
        if n % d == 0:
            return d
    return 1


def _attend(q_BHQD, k_BHKD, v_BHKD, scale: float, upcast: bool, mask_QK):
    """Softmax(q k^T * scale) v for one block of queries, heads-first; the softmax is computed in fp32.

    The normalisation is deferred: exp(s - max) goes unnormalised into the product with v and the (Q, D)
    result is divided by the row sums, which saves a pass over the (Q, K) scores (measured faster on XLA:CPU,
    together with the heads-first layout that gives the two products leading batch dimensions: README,
    "Kernel choices on XLA:CPU").
    """
    if upcast:
        q_BHQD = q_BHQD.astype(jnp.float32)
        k_BHKD = k_BHKD.astype(jnp.float32)
    scaled_BHQD = q_BHQD * jnp.asarray(scale, q_BHQD.dtype)
    # Half-precision products accumulate in float32 (see sdjax.nn.precision).
    scores_BHQK = jnp.einsum(
        "bhqd,bhkd->bhqk", scaled_BHQD, k_BHKD, precision=precision(k_BHKD.dtype), preferred_element_type=jnp.float32
    )
    if mask_QK is not None:
        scores_BHQK = jnp.where(mask_QK, scores_BHQK, jnp.finfo(jnp.float32).min)
    weights_BHQK = jnp.exp(scores_BHQK - scores_BHQK.max(axis=-1, keepdims=True))
    total_BHQ1 = weights_BHQK.sum(axis=-1, keepdims=True)
    out_BHQD = jnp.einsum(
        "bhqk,bhkd->bhqd",
        weights_BHQK.astype(v_BHKD.dtype),
        v_BHKD,
        precision=precision(v_BHKD.dtype),
        preferred_element_type=jnp.float32,
    )
    return (out_BHQD / total_BHQ1).astype(v_BHKD.dtype)


def dot_product_attention(
    q_BQHD: jax.Array,
    k_BKHD: jax.Array,
    v_BKHD: jax.Array,
    *,
    upcast: bool = False,
    causal: bool = False,
    score_budget_bytes: int = SCORE_BUDGET_BYTES,
) -> jax.Array:
    """Multi-head attention softmax(q k^T / sqrt(D)) v.

    Args:
      q_BQHD: queries (batch, query tokens, heads, head dim).
      k_BKHD, v_BKHD: keys and values (batch, key tokens, heads, head dim).
      upcast: compute q k^T in fp32 (diffusers' `upcast_attention`, needed by SD 2.x in half precision).
      causal: query i attends to keys 0..i only (CLIP's text encoder).
      score_budget_bytes: largest fp32 score block computed at once; larger ones are chunked over queries.
    Returns:
      (batch, query tokens, heads, head dim) in the dtype of `v`.
    """
    b, q_len, h, d = q_BQHD.shape
    k_len = k_BKHD.shape[1]
    scale = d**-0.5
    mask_QK = jnp.tril(jnp.ones((q_len, k_len), bool)) if causal else None
    q_BHQD, k_BHKD, v_BHKD = (x.transpose(0, 2, 1, 3) for x in (q_BQHD, k_BKHD, v_BKHD))
    score_bytes = b * h * q_len * k_len * 4
    if score_bytes <= score_budget_bytes or causal:
        out_BHQD = _attend(q_BHQD, k_BHKD, v_BHKD, scale, upcast, mask_QK)
    else:
        chunk = _largest_divisor_at_most(q_len, score_budget_bytes // (b * h * k_len * 4))
        q_NBHCD = q_BHQD.reshape(b, h, q_len // chunk, chunk, d).transpose(2, 0, 1, 3, 4)
        out_NBHCD = jax.lax.map(lambda q: _attend(q, k_BHKD, v_BHKD, scale, upcast, None), q_NBHCD)
        out_BHQD = out_NBHCD.transpose(1, 2, 0, 3, 4).reshape(b, h, q_len, d)
    return out_BHQD.transpose(0, 2, 1, 3)
