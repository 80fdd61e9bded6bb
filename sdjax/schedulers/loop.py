"""The denoising loop: every model call of a schedule inside one `lax.fori_loop`, usable under one `jax.jit`.

The step count, start step (img2img), random key, initial noise and model arguments (prompt embeddings,
guidance scale, ...) are all traced: the loop bound is the traced number of model calls, and the scheduler
tables are padded to the static `max_steps`. Only the scheduler (its config), the model function and the
optional hooks, `max_steps`, the sample shape/dtype and `return_trajectory` are compile-time constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.schedulers import brownian
from sdjax.schedulers._base import Scheduler, SchedulerState


def calls_from(state, cutoff) -> jax.Array:
    """i32[]: the model calls of `state`'s schedule whose timestep is >= cutoff (diffusers' `denoising_end`:
    the truncated `timesteps` list keeps those)."""
    live = jnp.arange(state.timesteps.shape[0]) < state.num_calls
    return jnp.sum(live & (state.timesteps >= cutoff)).astype(jnp.int32)


def start_step_below(scheduler, state, cutoff) -> jax.Array:
    """i32[]: inference steps to skip so that the run starts at the first timestep below `cutoff`, as
    diffusers' img2img `get_timesteps` with `denoising_start` (second-order schedulers keep an odd number
    of calls, so that a run never starts inside a step)."""
    live = jnp.arange(state.timesteps.shape[0]) < state.num_calls
    remaining = jnp.sum(live & (state.timesteps < cutoff)).astype(jnp.int32)
    if scheduler.order == 2:
        remaining = remaining + (remaining % 2 == 0)
    return (state.num_calls - remaining) // scheduler.order


def img2img_start_step(num_steps, strength):
    """Inference steps an img2img run skips, as diffusers' `get_timesteps`: n - min(int(n * strength), n).

    Exact for Python numbers; for traced values int(n * strength) is evaluated in float32.
    """
    if isinstance(num_steps, int) and isinstance(strength, int | float):
        return max(num_steps - min(int(num_steps * strength), num_steps), 0)
    n = jnp.asarray(num_steps, jnp.int32)
    kept = jnp.minimum(jnp.floor(n * jnp.asarray(strength, jnp.float32)).astype(jnp.int32), n)
    return jnp.maximum(n - kept, 0)


def sample(
    scheduler: Scheduler,
    model_fn: Callable[..., jax.Array],
    noise: jax.Array,
    key: jax.Array,
    num_steps,
    model_args: tuple[Any, ...] = (),
    *,
    max_steps: int,
    start_step=0,
    init_latents: jax.Array | None = None,
    init_sample: jax.Array | None = None,
    post_step: Callable[[jax.Array, SchedulerState], jax.Array] | None = None,
    on_call: Callable[[int, int], None] | None = None,
    model_dtype=None,
    return_trajectory: bool = False,
    pass_call: bool = False,
    end_call=None,
):
    """Runs a whole schedule: txt2img from `noise`, or img2img from `init_latents` noised to `start_step`.

    Args:
      scheduler: any `Scheduler` (static: hashable config).
      model_fn: `model_fn(sample_BHWC, timestep, *model_args) -> output_BHWC`; timestep is an f32[] in
        training-step units; the output is read as float32 whatever its dtype. Put classifier-free guidance
        inside it (the guidance scale is then one of the traced `model_args`).
      noise: [B, H, W, C] standard normal draws: the initial latents before scaling by the scheduler's
        `init_noise_sigma` (txt2img), or the noise added to `init_latents` (img2img). Its dtype is the
        dtype of the result.
      key: PRNG key for the noise of stochastic schedulers: model call k draws normal(fold_in(key, k)) of
        noise's shape; or a batch of B keys, one per image, image b drawing normal(fold_in(key[b], k)).
        Brownian schedulers (DPM++ SDE) take increments of one Brownian path per key (`_brownian_key`).
      num_steps: int or traced i32[] in [1, max_steps]: inference steps (diffusers' num_inference_steps).
      model_args: pytree of extra `model_fn` arguments (traced).
      max_steps: static upper bound on num_steps.
      start_step: int or traced i32[] in [0, num_steps): steps to skip (img2img, see img2img_start_step).
      init_latents: [B, H, W, C] clean latents for img2img (noised with `noise` to the start step).
      init_sample: [B, H, W, C] the initial sample itself (already scaled or noised by the caller); takes
        precedence over `noise` and `init_latents` as the starting point.
      post_step: `post_step(sample, state) -> sample`, applied after every step (e.g. inpainting's
        re-noised known region); `state` is the scheduler state after the step.
      on_call: host callback `on_call(calls_done, calls_total)` after every model call (progress display);
        runs through `jax.debug.callback` (once per device under shard_map).
      model_dtype: dtype of the model input (default: noise's dtype). Scheduler arithmetic is float32.
      return_trajectory: also return f32[C, B, H, W, C] with the sample after each model call (C = calls of
        the max_steps schedule; rows past the calls made are 0).
      pass_call: also pass `call=(k, calls)` to model_fn: this call's index among the `calls` model calls
        the run makes (from the start step; diffusers' `i` over `timesteps`), traced i32[]s.
      end_call: int or traced i32[]: stop before this model call of the full schedule (diffusers'
        `denoising_end` truncation of `timesteps`); default: run to the end.

    Returns the final latents [B, H, W, C] in noise's dtype (and the trajectory). A traced num_steps or
    start_step out of range gives NaN latents (Python ints raise ValueError instead).
    """
    state = scheduler.init(num_steps, noise.shape, max_steps=max_steps, start_step=start_step)  # checks num_steps
    concrete = not isinstance(start_step, jax.core.Tracer) and not isinstance(num_steps, jax.core.Tracer)
    if concrete and not 0 <= int(start_step) < int(num_steps):
        raise ValueError(f"start_step must be in [0, num_steps={int(num_steps)}), got {int(start_step)}")
    if concrete and int(start_step) > 0 and init_latents is None and init_sample is None:
        raise ValueError("start_step > 0 needs init_latents or init_sample (img2img)")
    model_dtype = noise.dtype if model_dtype is None else model_dtype
    noise32 = noise.astype(jnp.float32)
    if init_sample is not None:
        x = init_sample.astype(jnp.float32)
    elif init_latents is not None:
        x = scheduler.add_noise(state, init_latents.astype(jnp.float32), noise32)
    else:
        x = noise32 * scheduler.init_noise_sigma(state)
    draw = _noise_drawer(key, noise.shape)
    if scheduler.brownian:
        brownian_key = _brownian_key(key)
        draw_path = lambda a, b: brownian.increment(brownian_key, a, b, scheduler.sigma_max, noise.shape)  # noqa: E731
    trajectory = jnp.zeros((state.timesteps.shape[0], *noise.shape), jnp.float32) if return_trajectory else None

    last = state.num_calls if end_call is None else jnp.minimum(state.num_calls, end_call)
    calls = jnp.maximum(last - state.index, 0)

    def body(i, carry):
        x, state, trajectory = carry
        model_input = scheduler.scale_model_input(state, x).astype(model_dtype)
        extra = {"call": (i, calls)} if pass_call else {}
        output = model_fn(model_input, state.timestep, *model_args, **extra)
        if scheduler.brownian:
            step_noise = draw_path(*scheduler.noise_interval(state))
        else:
            step_noise = draw(state.counter) if scheduler.stochastic else None
        x, state = scheduler.step(state, output, x, step_noise)
        if post_step is not None:
            x = post_step(x, state).astype(jnp.float32)
        if trajectory is not None:
            trajectory = trajectory.at[i].set(x)
        if on_call is not None:
            # Unordered: ordered effects are refused under shard_map; the loop is sequential anyway.
            jax.debug.callback(lambda done, total: on_call(int(done), int(total)), i + 1, calls)
        return x, state, trajectory

    x, state, trajectory = jax.lax.fori_loop(0, calls, body, (x, state, trajectory))
    n, start = jnp.asarray(num_steps), jnp.asarray(start_step)
    valid = (n >= 1) & (n <= max_steps) & (start >= 0) & (start < n)
    x = jnp.where(valid, x, jnp.nan).astype(noise.dtype)
    return (x, trajectory) if return_trajectory else x


def _brownian_key(key: jax.Array) -> jax.Array:
    """The Brownian path's key (or keys, one per image) of a sampler key: fold_in(key, 2**31 - 1), apart
    from the per-call keys fold_in(key, k) of other stochastic schedulers."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    fold = lambda k: jax.random.fold_in(k, 2**31 - 1)  # noqa: E731
    return fold(key) if key.ndim == 0 else jax.vmap(fold)(key)


def _noise_drawer(key: jax.Array, shape: tuple[int, ...]) -> Callable[[jax.Array], jax.Array]:
    """counter -> f32[shape] standard normal noise from one key, or per image from a batch of keys."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return lambda k: jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32)
    if key.shape != shape[:1]:
        raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]} samples")
    return lambda k: jax.vmap(lambda kb: jax.random.normal(jax.random.fold_in(kb, k), shape[1:], jnp.float32))(key)
