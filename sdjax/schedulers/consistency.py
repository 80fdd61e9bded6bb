"""Consistency samplers for distilled models and LoRAs (2-8 steps, guidance off): LCM (Luo et al. 2023) and
TCD (Zheng et al. 2024), as diffusers' LCMScheduler and TCDScheduler.

Both take n of the `original_inference_steps` evenly spaced distillation timesteps (T // original - 1,
2 T // original - 1, ..., T - 1), at evenly spaced indices from the top (`consistency_timesteps`).
LCM: at each one the model's x0 prediction passes through the consistency boundary condition, denoised =
c_out x0 + c_skip x (c_skip = s^2 / (t'^2 + s^2), c_out = t' / sqrt(t'^2 + s^2), t' = t *
timestep_scaling, s = sigma_data = 0.5), and is noised afresh to the next timestep; the last step returns
it as it is. TCD: x0 and eps are re-noised to s = floor((1 - eta) t_next) (strategic stochastic
sampling, gamma = eta) and, for eta > 0, carried from s to t_next with fresh noise (all but the last step).
Above `original_inference_steps` steps there is no schedule: the tables are NaN (requests refuse it).
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, dynamic_threshold
from sdjax.schedulers.ddim import DiscreteScheduler, discrete_x0_eps

SIGMA_DATA = 0.5
CONSISTENCY_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}


def consistency_timesteps(num_train_timesteps: int, original: int, num_steps: int) -> np.ndarray | None:
    """int64[num_steps]: diffusers' LCM/TCD `set_timesteps`, or None above `original` steps."""
    if num_steps > original:
        return None
    step = num_train_timesteps // original
    origin = (np.arange(1, original + 1) * step - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(np.int64)]


def _nan_tables(num_steps: int, keys) -> dict[str, np.ndarray]:
    nan = np.full(num_steps, np.nan, np.float32)
    return {"timesteps": np.zeros(num_steps, np.int64), **{k: nan for k in keys}}


def _check_original_steps(scheduler) -> None:
    if not 1 <= scheduler.original_inference_steps <= scheduler.schedule.num_train_timesteps:
        raise ValueError(
            f"original_inference_steps must be in [1, {scheduler.schedule.num_train_timesteps}], "
            f"got {scheduler.original_inference_steps}"
        )


@final
@dataclasses.dataclass(frozen=True)
class LCM(DiscreteScheduler):
    """diffusers' LCMScheduler."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0

    diffusers_class = "LCMScheduler"
    diffusers_defaults = types.MappingProxyType(CONSISTENCY_DEFAULTS)

    def __post_init__(self):
        _check_original_steps(self)

    @property
    def stochastic(self) -> bool:
        return True

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """timesteps; alpha_t and alpha_next = alpha_bar at each timestep and at the next (the last: its own);
        c_skip and c_out of each timestep."""
        timesteps = consistency_timesteps(self.schedule.num_train_timesteps, self.original_inference_steps, num_steps)
        if timesteps is None:
            return _nan_tables(num_steps, ("alpha_t", "alpha_next", "c_skip", "c_out"))
        following = np.concatenate([timesteps[1:], timesteps[-1:]])
        ac = alphas_cumprod(self.schedule)
        scaled = timesteps.astype(np.float64) * self.timestep_scaling
        return {
            "timesteps": timesteps,
            "alpha_t": ac[timesteps],
            "alpha_next": ac[following],
            "c_skip": (SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)).astype(np.float32),
            "c_out": (scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5).astype(np.float32),
        }

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("LCM needs `noise` (standard normal, the shape of `sample`) for every step but the last")
        i, tables = state.index, state.tables
        alpha_t, alpha_next = tables["alpha_t"][i], tables["alpha_next"][i]
        x0 = discrete_x0_eps(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, alpha_t)[0]
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = tables["c_out"][i] * x0 + tables["c_skip"][i] * sample
        renoised = alpha_next**0.5 * denoised + (1 - alpha_next) ** 0.5 * noise
        return jnp.where(i == state.num_calls - 1, denoised, renoised), state.advance()


@final
@dataclasses.dataclass(frozen=True)
class TCD(DiscreteScheduler):
    """diffusers' TCDScheduler with `eta` (its step argument, "gamma": 0 deterministic, 1 all fresh noise)
    as a field: 0.3, as diffusers' TCD documentation and its `step` default use it (its pipelines pass
    eta=0 unless told)."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0
    eta: float = 0.3

    diffusers_class = "TCDScheduler"
    diffusers_defaults = types.MappingProxyType(CONSISTENCY_DEFAULTS)

    def __post_init__(self):
        _check_original_steps(self)
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"TCD's eta (gamma) must be in [0, 1], got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """timesteps; alpha_t, alpha_next (at the next timestep; 0 after the last) and alpha_s (at
        s = floor((1 - eta) * next))."""
        timesteps = consistency_timesteps(self.schedule.num_train_timesteps, self.original_inference_steps, num_steps)
        if timesteps is None:
            return _nan_tables(num_steps, ("alpha_t", "alpha_next", "alpha_s"))
        following = np.concatenate([timesteps[1:], [0]])
        s = np.floor((1 - np.float32(self.eta)) * following.astype(np.float32)).astype(np.int64)
        ac = alphas_cumprod(self.schedule)
        return {"timesteps": timesteps, "alpha_t": ac[timesteps], "alpha_next": ac[following], "alpha_s": ac[s]}

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        i, tables = state.index, state.tables
        alpha_t, alpha_next, alpha_s = tables["alpha_t"][i], tables["alpha_next"][i], tables["alpha_s"][i]
        x0, eps = discrete_x0_eps(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, alpha_t)
        noised = alpha_s**0.5 * x0 + (1 - alpha_s) ** 0.5 * eps
        if not self.stochastic:
            return noised, state.advance()
        if noise is None:
            raise ValueError("TCD with eta > 0 needs `noise` (standard normal, the shape of `sample`)")
        ratio = alpha_next / alpha_s
        carried = ratio**0.5 * noised + (1 - ratio) ** 0.5 * noise
        return jnp.where(i == state.num_calls - 1, noised, carried), state.advance()
