"""DPM++ 2S a (k-diffusion's sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S a"): ancestral sampling with
second-order single-step DPM-Solver++ (Lu et al. 2022) steps. diffusers has no such scheduler.

Step j goes from sigma_j towards the next level s' split as in Euler a: sigma_up = min(s', eta *
sqrt(s'^2 (sigma_j^2 - s'^2) / sigma_j^2)) of fresh noise and sigma_down = sqrt(s'^2 - sigma_up^2) of
deterministic step. Its first model call (at sigma_j) takes a first-order step to the midpoint in log sigma,
mid_j = sqrt(sigma_j * sigma_down); the second call (at mid_j) gives the x0 with which the step goes from
the step's start to sigma_down: x = x0_2 + (sigma_down / sigma_j) (x_j - x0_2); then sigma_up * noise is
added. Where sigma_down is 0 (the last step) the step is Euler to 0 from its first call, so a schedule makes
2n - 1 model calls; call i belongs to step i // 2 and is its first when i is even.

The sigmas are those of Euler a for the model's scheduler config (its timestep spacing, or Karras sigmas);
the model sees x / sqrt(sigma^2 + 1) at the fractional timestep of each call's sigma (k-diffusion's
CompVis denoisers). Every table is computed in float64 and stored in float32.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, sigma_to_t, train_sigmas
from sdjax.schedulers.euler import (
    K_DIFFUSION_DEFAULTS,
    SigmaScheduler,
    ancestral_split,
    sigma_schedule,
    sigma_x0_derivative,
)


@final
@dataclasses.dataclass(frozen=True)
class DPMPP2SAncestral(SigmaScheduler):
    """k-diffusion's sample_dpmpp_2s_ancestral (A1111's "DPM++ 2S a" and "DPM++ 2S a Karras"); eta scales
    the fresh noise (A1111's "eta for ancestral samplers"; 0 gives the deterministic DPM-Solver++(2S))."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")
    use_karras_sigmas: bool = False
    eta: float = 1.0

    order = 2
    # no diffusers class: named after the reference; built from a model's config like Euler a
    diffusers_class = "k-diffusion sample_dpmpp_2s_ancestral"
    diffusers_defaults = types.MappingProxyType(
        {**K_DIFFUSION_DEFAULTS, "use_karras_sigmas": False, "rescale_betas_zero_snr": False}
    )
    prediction_types = ("epsilon", "v_prediction")

    def __post_init__(self):
        if not self.eta >= 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def tables(self, num_steps):
        """Per call i (2n - 1 of them, step j = i // 2): "timesteps" and "sigmas" (where the model is
        evaluated: sigma_j at a first call, mid_j at a second); per step, repeated for its calls:
        "step_sigma" sigma_j, "step_mid" mid_j (0 on the last step), "step_down" and "step_up"."""
        _, sigmas = sigma_schedule(self.schedule, num_steps, karras=self.use_karras_sigmas)
        sigmas = sigmas.astype(np.float64)
        sigma, sigma_to = sigmas[:-1], sigmas[1:]
        down, up = ancestral_split(sigma, sigma_to, self.eta)
        mid = (sigma * down) ** 0.5
        train = train_sigmas(alphas_cumprod(self.schedule))
        calls = 2 * num_steps - 1

        def per_call(per_step: np.ndarray) -> np.ndarray:
            return np.repeat(per_step, 2)[:calls]

        evaluated = np.stack([sigma, mid], axis=1).reshape(-1)[:calls]
        return {
            "timesteps": sigma_to_t(evaluated, train).astype(np.float32),
            "sigmas": evaluated.astype(np.float32),
            "step_sigma": per_call(sigma),
            "step_mid": per_call(mid),
            "step_down": per_call(down),
            "step_up": per_call(up),
        }

    def init_history(self, sample_shape):
        return {"sample": jnp.zeros(sample_shape, jnp.float32)}

    def step(self, state, model_output, sample, noise=None):
        if self.stochastic and noise is None:
            raise ValueError("DPMPP2SAncestral needs `noise` (standard normal, the shape of `sample`)")
        model_output, i, tables = model_output.astype(jnp.float32), state.index, state.tables
        x0, derivative = sigma_x0_derivative(self.schedule.prediction_type, model_output, sample, tables["sigmas"][i])

        def first(_):  # to the midpoint (the last step: to 0, x0)
            return x0 + tables["step_mid"][i] * derivative, sample

        def second(_):  # from the step's start to sigma_down with the midpoint's x0, then fresh noise
            start = state.history["sample"]
            out = x0 + (tables["step_down"][i] / tables["step_sigma"][i]) * (start - x0)
            if self.stochastic:
                out = out + noise * tables["step_up"][i]
            return out, start

        prev_sample, start = jax.lax.cond(i % 2 == 0, first, second, None)
        return prev_sample, state.advance(sample=start)
