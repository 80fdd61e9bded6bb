"""Group and layer normalisation as plain functions over their parameters: the `GroupNorm` layer applies
the group norm, and `kernels.norm_act_conv` either applies it too or folds it into a TPU convolution's
input; `kernels.feed_forward` applies the layer norm (the transformer blocks' norm3), or its TPU kernel
does.

Statistics are taken in float32 whatever the input dtype. In float32 (the parity mode) the variance takes a
second pass over x - mean, as PyTorch; in half precision one pass (E[x^2] - E[x]^2, in float32), which XLA
fuses into the op that produces x (`fast_variance`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fast_variance(dtype) -> bool:
    """Whether norms of a `dtype` model take their variance in one pass: in half precision (the speed modes).
    On one TPU v5e chip (cost model, SD 1.5 at 512x512, bf16) the one-pass statistics fuse into the op
    before the norm and take ResNet blocks from 0.66 to 0.61 ms (64x64x320) and 1.20 to 1.12 ms (64x64x960);
    float32 keeps PyTorch's two passes for parity."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_groups(channels: int, groups: int) -> None:
    """Refuses, in one line, a GroupNorm whose channels do not split into its groups."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")


def group_statistics(x_BHWC: jax.Array, groups: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(x in float32 as (B, H*W, G, C/G), mean, variance (B, 1, G, 1)) of each sample's channel groups; the
    variance in one pass when `fast_variance(dtype)`, else in two."""
    channels = x_BHWC.shape[-1]
    check_groups(channels, groups)
    x32 = x_BHWC.astype(jnp.float32).reshape(x_BHWC.shape[0], -1, groups, channels // groups)
    mean = x32.mean(axis=(1, 3), keepdims=True)
    if fast_variance(dtype):
        var = jnp.maximum(jnp.square(x32).mean(axis=(1, 3), keepdims=True) - jnp.square(mean), 0.0)
    else:
        var = jnp.square(x32 - mean).mean(axis=(1, 3), keepdims=True)
    return x32, mean, var


def group_norm(x_BHWC: jax.Array, scale_C: jax.Array, bias_C: jax.Array, groups: int, eps: float, dtype) -> jax.Array:
    """GroupNorm of x (B, ..., C) in `groups` groups, each group of each sample normalised over all its
    positions and channels, then scaled and shifted per channel; returned in `dtype`."""
    x32, mean, var = group_statistics(x_BHWC, groups, dtype)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).reshape(x_BHWC.shape)
    return (y * scale_C.astype(jnp.float32) + bias_C.astype(jnp.float32)).astype(dtype)


def layer_norm(x: jax.Array, scale_C: jax.Array, bias_C: jax.Array, eps: float, dtype) -> jax.Array:
    """LayerNorm of x (..., C) over its last axis, as flax's `nn.LayerNorm`: mean and variance in float32
    (one pass when `fast_variance(dtype)`, else two), (x - mean) * rsqrt(var + eps) * scale + bias; in `dtype`."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    if fast_variance(dtype):
        var = jnp.maximum(jnp.square(x32).mean(axis=-1, keepdims=True) - jnp.square(mean), 0.0)
    else:
        var = jnp.square(x32 - mean).mean(axis=-1, keepdims=True)
    mul = jax.lax.rsqrt(var + eps) * scale_C.astype(jnp.float32)
    return ((x32 - mean) * mul + bias_C.astype(jnp.float32)).astype(dtype)
