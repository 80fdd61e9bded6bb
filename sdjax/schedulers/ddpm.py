"""DDPM ancestral sampling (Ho et al. 2020) on a subset of the training timesteps, as diffusers' DDPMScheduler."""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, dynamic_threshold, spaced_timesteps
from sdjax.schedulers.ddim import DiscreteScheduler, discrete_x0_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@final
@dataclasses.dataclass(frozen=True)
class DDPM(DiscreteScheduler):
    """diffusers' DDPMScheduler; adds noise at every step whose timestep is > 0."""

    schedule: NoiseSchedule = NoiseSchedule()
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    diffusers_class = "DDPMScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "trained_betas": None,
            "variance_type": "fixed_small",
            "clip_sample": True,
            "prediction_type": "epsilon",
            "thresholding": False,
            "dynamic_thresholding_ratio": 0.995,
            "clip_sample_range": 1.0,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "steps_offset": 0,
            "rescale_betas_zero_snr": False,
        }
    )

    def __post_init__(self):
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {self.variance_type!r} is not supported; choose one of {VARIANCE_TYPES}")

    @property
    def stochastic(self) -> bool:
        return True

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """timesteps; alpha_t = alpha_bar at each; alpha_prev at the next timestep of the list (1 after the last)."""
        ac = alphas_cumprod(self.schedule)
        timesteps = spaced_timesteps(self.schedule, num_steps).astype(np.int64)
        alpha_prev = np.concatenate([ac[timesteps[1:]], np.ones(1, np.float32)])
        return {"timesteps": timesteps, "alpha_t": ac[timesteps], "alpha_prev": alpha_prev}

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("DDPM needs `noise` (standard normal, the shape of `sample`)")
        alpha_prod_t = state.tables["alpha_t"][state.index]
        alpha_prod_t_prev = state.tables["alpha_prev"][state.index]
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0, _ = discrete_x0_eps(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, alpha_prod_t)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample

        variance = jnp.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
        if self.variance_type == "fixed_small":
            std = variance**0.5
        elif self.variance_type == "fixed_small_log":
            std = jnp.exp(0.5 * jnp.log(variance))
        else:
            std = current_beta_t**0.5
        std = jnp.where(state.timestep > 0, std, 0.0)
        return prev_sample + std * noise, state.advance()
