"""Numeric precision of products, one rule for every kernel: float32 operands multiply at full float32
precision on every backend (the parity mode: GPUs would use TF32 and TPUs bfloat16 passes by default), and
half-precision operands accumulate in float32, as PyTorch's CPU and GPU kernels do."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulator(dtype) -> jnp.dtype | None:
    """The dtype products of `dtype` operands accumulate and come out in: float32 for bfloat16 and float16,
    None (the operands' own) otherwise."""
    return jnp.float32 if jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else None


def precision(dtype) -> jax.lax.Precision:
    """HIGHEST for float32 operands (full float32 products on every backend), DEFAULT otherwise."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else jax.lax.Precision.DEFAULT
