"""DDIM (Song et al. 2020): deterministic (eta = 0) sampling on the discrete alphas_cumprod schedule.

Reproduces diffusers' DDIMScheduler, including its use of `t - T // n` as the previous timestep whatever the
spacing (with "trailing"/"linspace" this is not the next timestep of the list).
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._base import UnitVarianceScheduler
from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, dynamic_threshold, spaced_timesteps


def discrete_x0_eps(prediction_type: str, model_output, sample, alpha_prod_t):
    """(x0, eps) predicted from a model output at a discrete timestep with alpha_bar_t = alpha_prod_t."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
    return x0, alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample


class DiscreteScheduler(UnitVarianceScheduler):
    """The discrete-time families (DDIM, DDPM, PNDM): an "alpha_t" table of alpha_bar at each call's
    timestep. Subclasses are final and implement the rest of `Scheduler`."""

    @final
    def add_noise(self, state, original, noise):
        """sqrt(alpha_bar) * original + sqrt(1 - alpha_bar) * noise at the next call's timestep."""
        alpha_prod = state.tables["alpha_t"][state.index]
        return alpha_prod**0.5 * original + (1 - alpha_prod) ** 0.5 * noise


@final
@dataclasses.dataclass(frozen=True)
class DDIM(DiscreteScheduler):
    """diffusers' DDIMScheduler. `eta` (a `step` argument in diffusers, 0 in its pipelines) > 0 adds noise."""

    schedule: NoiseSchedule = NoiseSchedule()
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    eta: float = 0.0

    diffusers_class = "DDIMScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "trained_betas": None,
            "clip_sample": True,
            "set_alpha_to_one": True,
            "steps_offset": 0,
            "prediction_type": "epsilon",
            "thresholding": False,
            "dynamic_thresholding_ratio": 0.995,
            "clip_sample_range": 1.0,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "rescale_betas_zero_snr": False,
        }
    )

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """timesteps; alpha_t = alpha_bar at each timestep; alpha_prev at t - T // n (or the final alpha)."""
        t_train = self.schedule.num_train_timesteps
        ac = alphas_cumprod(self.schedule)
        final_alpha = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        timesteps = spaced_timesteps(self.schedule, num_steps).astype(np.int64)
        prev = timesteps - t_train // num_steps
        alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final_alpha)
        return {"timesteps": timesteps, "alpha_t": ac[timesteps], "alpha_prev": alpha_prev}

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        alpha_prod_t = state.tables["alpha_t"][state.index]
        alpha_prod_t_prev = state.tables["alpha_prev"][state.index]
        x0, eps = discrete_x0_eps(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, alpha_prod_t)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        elif self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = self.eta * variance**0.5
        prev_sample = alpha_prod_t_prev**0.5 * x0 + (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
        if self.stochastic:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs `noise`")
            prev_sample = prev_sample + std_dev_t * noise
        return prev_sample, state.advance()
