"""LCM (Luo et al. 2023): multistep consistency sampling for latent consistency models and LCM-LoRAs, as
diffusers' LCMScheduler.

The timesteps are n of the `original_inference_steps` evenly spaced distillation timesteps
(T // original - 1, 2 T // original - 1, ..., T - 1), taken at evenly spaced indices from the top. At each
one the model's x0 prediction passes through the consistency boundary condition, denoised = c_out x0 +
c_skip x (c_skip = s^2 / (t'^2 + s^2), c_out = t' / sqrt(t'^2 + s^2), t' = t * timestep_scaling,
s = sigma_data = 0.5), and is noised afresh to the next timestep; the last step returns it as it is. So
every step but the last draws new noise: 2-8 steps, guidance off (guidance_scale <= 1) for LCM-LoRAs.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod
from sdjax.schedulers.ddim import DiscreteScheduler, discrete_x0_eps

SIGMA_DATA = 0.5


@final
@dataclasses.dataclass(frozen=True)
class LCM(DiscreteScheduler):
    """diffusers' LCMScheduler. At most `original_inference_steps` steps: above it the tables are NaN (the
    request refuses such a step count first)."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0

    diffusers_class = "LCMScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
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
    )

    def __post_init__(self):
        if not 1 <= self.original_inference_steps <= self.schedule.num_train_timesteps:
            raise ValueError(
                f"original_inference_steps must be in [1, {self.schedule.num_train_timesteps}], "
                f"got {self.original_inference_steps}"
            )

    @property
    def stochastic(self) -> bool:
        return True

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """timesteps; alpha_t and alpha_next = alpha_bar at each timestep and at the next (the last: its own);
        c_skip and c_out of each timestep (float32, as diffusers' float tensor arithmetic)."""
        original = self.original_inference_steps
        if num_steps > original:  # no schedule: NaN
            nan = np.full(num_steps, np.nan, np.float32)
            return {
                "timesteps": np.zeros(num_steps, np.int64),
                "alpha_t": nan,
                "alpha_next": nan,
                "c_skip": nan,
                "c_out": nan,
            }
        step = self.schedule.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * step - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(np.int64)
        timesteps = origin[indices]
        following = np.concatenate([timesteps[1:], timesteps[-1:]])
        ac = alphas_cumprod(self.schedule)
        scaled = timesteps.astype(np.float64) * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return {
            "timesteps": timesteps,
            "alpha_t": ac[timesteps],
            "alpha_next": ac[following],
            "c_skip": c_skip.astype(np.float32),
            "c_out": c_out.astype(np.float32),
        }

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("LCM needs `noise` (standard normal, the shape of `sample`) for every step but the last")
        i, tables = state.index, state.tables
        alpha_t, alpha_next = tables["alpha_t"][i], tables["alpha_next"][i]
        x0 = discrete_x0_eps(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, alpha_t)[0]
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = tables["c_out"][i] * x0 + tables["c_skip"][i] * sample
        renoised = alpha_next**0.5 * denoised + (1 - alpha_next) ** 0.5 * noise
        return jnp.where(i == state.num_calls - 1, denoised, renoised), state.advance()
