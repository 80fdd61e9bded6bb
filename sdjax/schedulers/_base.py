"""The interface every scheduler implements, and the state pytree they all share.

A scheduler is a frozen dataclass (its config, hashable, so it can be a static argument of `jax.jit`) whose
methods are pure functions. Its abstract methods are the whole interface; the concrete ones here (`init`,
`num_model_calls`) are final and built on them. `init` turns a step count into a state of fixed shape: the
per-call tables of *every* step count up to `max_steps` are built on the host once and the state holds the
row for `num_steps`, padded to the longest. So `num_steps` may be a traced value and one compiled program
serves every count up to the maximum.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import types
from collections.abc import Mapping
from typing import Any, ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import PREDICTION_TYPES, NoiseSchedule, pad


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """Where a sampling run is, as a pytree of arrays (a `lax.fori_loop`/`scan` carry).

    timesteps: f32[C]  model timestep (training-step units) of each model call; C = calls for max_steps.
    tables:    per-call tables of the family, e.g. "sigmas" f32[C + 1]; fixed by `init`, never updated.
    num_steps: i32[]   inference steps requested (diffusers' num_inference_steps).
    num_calls: i32[]   model calls of the full schedule for num_steps (len(diffusers' scheduler.timesteps)).
    index:     i32[]   table position of the next model call (starts at start_step * order for img2img).
    counter:   i32[]   model calls made since `init` (multistep warm-up, Heun's stage).
    history:   the family's multistep memory, e.g. "model_outputs" f32[order, *sample_shape].
    """

    timesteps: jax.Array
    tables: dict[str, jax.Array]
    num_steps: jax.Array
    num_calls: jax.Array
    index: jax.Array
    counter: jax.Array
    history: dict[str, jax.Array]

    @property
    def timestep(self) -> jax.Array:
        """f32[]: the timestep to give the model at the next call."""
        return self.timesteps[self.index]

    def advance(self, **history: jax.Array) -> SchedulerState:
        """The state after one model call, with the given history entries replaced."""
        return dataclasses.replace(
            self, index=self.index + 1, counter=self.counter + 1, history={**self.history, **history}
        )


class Scheduler(abc.ABC):
    """A diffusion sampler: a frozen config (`schedule` plus family options) and pure functions over a state.

    Each family has an abstract base that implements the noise-level methods for its kind of sample
    (`SigmaScheduler`; on `UnitVarianceScheduler`, `VPSigmaScheduler` and `DiscreteScheduler`), its
    methods marked `typing.final`; the schedulers are
    frozen dataclasses decorated with `typing.final` that implement the remaining abstract members and
    override nothing concrete.
    """

    schedule: NoiseSchedule
    order: ClassVar[int] = 1  # model calls per inference step, as diffusers' `scheduler.order` (Heun: 2)
    diffusers_class: ClassVar[str]  # the diffusers class this family reproduces
    diffusers_defaults: ClassVar[Mapping[str, Any]]  # its __init__ defaults (every option diffusers has)
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES  # those diffusers supports for it
    # the one value sdjax accepts for a diffusers option it does not implement, when not its default
    supported_values: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})
    # stochastic with Brownian noise: `step` takes the path's increment over `noise_interval(state)` (a
    # method of such schedulers) instead of fresh draws (`sdjax.schedulers.loop` passes it)
    brownian: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def stochastic(self) -> bool:
        """Whether `step` consumes fresh standard normal noise."""

    @abc.abstractmethod
    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """Host-side tables for a step count, as diffusers' `set_timesteps(num_steps)` builds them.

        Returns numpy arrays, at least "timesteps" (one entry per model call, in call order); other keys are
        the family's (e.g. "sigmas"). Unpadded: `init` pads every key to its longest length over step counts.
        """

    @abc.abstractmethod
    def init_history(self, sample_shape: tuple[int, ...]) -> dict[str, jax.Array]:
        """The empty multistep memory for samples of `sample_shape` (an empty dict when there is none)."""

    @abc.abstractmethod
    def init_noise_sigma(self, state: SchedulerState) -> jax.Array:
        """f32[]: standard deviation of the initial latent noise (txt2img), diffusers' `init_noise_sigma`."""

    @abc.abstractmethod
    def scale_model_input(self, state: SchedulerState, sample: jax.Array) -> jax.Array:
        """The model input for the next call: `sample` divided by sqrt(sigma^2 + 1) for sigma-based families."""

    @abc.abstractmethod
    def add_noise(self, state: SchedulerState, original: jax.Array, noise: jax.Array) -> jax.Array:
        """`original` noised to the level of the next call (img2img start), as diffusers' `add_noise`."""

    @abc.abstractmethod
    def step(
        self, state: SchedulerState, model_output: jax.Array, sample: jax.Array, noise: jax.Array | None = None
    ) -> tuple[jax.Array, SchedulerState]:
        """One model call's update: (model output at `state.timestep`, current sample) -> (next sample, state).

        Args:
          model_output: the model's prediction for `scale_model_input(state, sample)`, any float dtype;
            arithmetic is float32.
          sample: f32[*sample_shape], e.g. latents BHWC.
          noise: f32[*sample_shape] standard normal draws, required when `stochastic` (ignored otherwise).
        """

    @final
    def num_model_calls(self, num_steps: int) -> int:
        """Model evaluations diffusers makes for `num_steps` inference steps (Heun 2n-1, PNDM n+1)."""
        return len(self.tables(num_steps)["timesteps"])

    @final
    def init(self, num_steps, sample_shape: tuple[int, ...], *, max_steps: int, start_step=0) -> SchedulerState:
        """The state before the first model call of a `num_steps` schedule.

        Args:
          num_steps: int or traced i32[] in [1, max_steps]. A Python int out of range raises ValueError; a
            traced one cannot, and `sdjax.schedulers.loop.sample` turns its result into NaN instead.
          sample_shape: shape of the samples (e.g. (B, H, W, 4)), for the multistep memory.
          max_steps: static bound; tables are padded to it.
          start_step: int or traced i32[]: inference steps to skip (img2img; see `loop.img2img_start_step`).
        """
        check_steps(num_steps, max_steps, self.schedule.num_train_timesteps)
        stacked = _stacked_tables(self, max_steps)
        row = jnp.clip(jnp.asarray(num_steps, jnp.int32), 1, max_steps) - 1
        tables = {key: jnp.asarray(value)[row] for key, value in stacked.items()}
        timesteps = tables.pop("timesteps")
        num_calls = tables.pop("num_calls")
        start = jnp.asarray(start_step, jnp.int32) * self.order
        return SchedulerState(
            timesteps=timesteps,
            tables=tables,
            num_steps=jnp.asarray(num_steps, jnp.int32),
            num_calls=num_calls,
            index=start,
            counter=jnp.zeros((), jnp.int32),
            history=self.init_history(tuple(sample_shape)),
        )


class UnitVarianceScheduler(Scheduler):
    """Families whose samples keep unit variance (variance preserving): the initial noise is used as drawn
    and the model sees the sample itself. Its subclasses add `add_noise` for their tables."""

    @final
    def init_noise_sigma(self, state):
        return jnp.float32(1.0)

    @final
    def scale_model_input(self, state, sample):
        return sample


def check_steps(num_steps, max_steps: int, num_train_timesteps: int) -> None:
    """Raises a one-line ValueError for a concrete step count out of [1, max_steps] or a bad max_steps."""
    if not isinstance(max_steps, int) or not 1 <= max_steps <= num_train_timesteps:
        raise ValueError(f"max_steps must be an int in [1, {num_train_timesteps}], got {max_steps!r}")
    if isinstance(num_steps, jax.core.Tracer):
        return
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {n}")
    if n > max_steps:
        raise ValueError(f"num_steps={n} is above max_steps={max_steps}; raise max_steps (it is static)")


@functools.lru_cache(maxsize=64)
def _stacked_tables(scheduler: Scheduler, max_steps: int) -> dict[str, np.ndarray]:
    """Every table of `scheduler.tables(n)` for n = 1..max_steps, padded and stacked: {key: [max_steps, L]}."""
    rows = [scheduler.tables(n) for n in range(1, max_steps + 1)]
    out = {}
    for key in rows[0]:
        length = max(len(row[key]) for row in rows)
        out[key] = np.stack([pad(np.asarray(row[key], np.float32), length) for row in rows])
    out["num_calls"] = np.array([len(row["timesteps"]) for row in rows], np.int32)
    return out
