"""Brownian motion noise for SDE samplers (DPM++ SDE): a virtual Brownian tree in JAX, a pure function of a key.

W is a Brownian motion on [0, sigma_max] with W(0) = 0 and W(sigma_max) ~ N(0, sigma_max). W(t) at any t is
found by bisection: each dyadic interval [a, b] of the tree draws its midpoint from the Brownian bridge
between W(a) and W(b) (mean (W(a) + W(b)) / 2, variance (b - a) / 4) with a key fixed by the interval's
place in the tree; after DEPTH halvings W is linear inside the last interval (sigma_max / 2^DEPTH wide, below
a millionth of SD's sigma range). So W depends on the key alone, not on which points a sampler asks for:
one seed gives one Brownian path, whatever the step count (as torchsde's BrownianInterval behind diffusers'
and k-diffusion's samplers does). torchsde's draws themselves are not reproduced: its random numbers come
from its own generator; `increment` for the same path, not the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEPTH = 24


def _point(key: jax.Array, t: jax.Array, sigma_max: float, shape: tuple[int, ...]) -> jax.Array:
    """W(t) (f32[shape]) of the path of `key` on [0, sigma_max], t in [0, sigma_max] (clipped)."""
    t = jnp.clip(t, 0.0, sigma_max).astype(jnp.float32)
    w_b = jnp.sqrt(jnp.float32(sigma_max)) * jax.random.normal(jax.random.fold_in(key, 0), shape)

    def halve(level, carry):
        a, b, w_a, w_b, node = carry
        mid = 0.5 * (a + b)
        noise = jax.random.normal(jax.random.fold_in(node, 0), shape)
        w_mid = 0.5 * (w_a + w_b) + jnp.sqrt(0.25 * (b - a)) * noise
        right = t >= mid
        child = jax.random.fold_in(node, jnp.where(right, 2, 1))
        return (
            jnp.where(right, mid, a),
            jnp.where(right, b, mid),
            jnp.where(right, w_mid, w_a),
            jnp.where(right, w_b, w_mid),
            child,
        )

    start = (jnp.float32(0.0), jnp.float32(sigma_max), jnp.zeros(shape, jnp.float32), w_b, jax.random.fold_in(key, 1))
    a, b, w_a, w_b, _ = jax.lax.fori_loop(0, DEPTH, halve, start)
    weight = (t - a) / jnp.maximum(b - a, 1e-30)
    return w_a + weight * (w_b - w_a)


def increment(key: jax.Array, sigma_a, sigma_b, sigma_max: float, shape: tuple[int, ...]) -> jax.Array:
    """(W(sigma_b) - W(sigma_a)) / sqrt(|sigma_b - sigma_a|): standard normal noise of the path's increment over
    the interval (k-diffusion's BrownianTreeNoiseSampler normalisation), f32[shape]; for a batch of keys
    (B,), one path per row, f32[B, *shape[1:]]."""
    scale = jnp.sqrt(jnp.maximum(jnp.abs(sigma_b - sigma_a), 1e-30))
    if key.ndim == 0:
        return (_point(key, sigma_b, sigma_max, shape) - _point(key, sigma_a, sigma_max, shape)) / scale
    one = lambda k: _point(k, sigma_b, sigma_max, shape[1:]) - _point(k, sigma_a, sigma_max, shape[1:])  # noqa: E731
    return jax.vmap(one)(key) / scale
