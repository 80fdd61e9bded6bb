"""Per-row randomness: every image of a generation call, and every row of a training batch, draws from a
key of its own, so its random numbers do not depend on the batch it is part of or how it was split."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def seed_keys(seeds_B: jax.Array) -> jax.Array:
    """(B,) keys, `jax.random.key(seed)` of each row's uint32 seed."""
    return jax.vmap(jax.random.key)(seeds_B.astype(jnp.uint32))


def keys_for_rows(key: jax.Array, rows_B: jax.Array) -> jax.Array:
    """(B,) keys, one key folded with each row's id (an int32 unique within a run)."""
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(rows_B)


def split_rows(keys_B: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """n independent (B,) key batches from one: batch i holds fold_in(key_b, i) for every row b."""
    return tuple(jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys_B) for i in range(n))


def normal_rows(keys_B: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """(B, *shape) standard normal draws, row b from keys_B[b] alone."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys_B)
