"""k-diffusion style samplers on sigmas (Karras et al. 2022): Euler, Euler ancestral and Heun.

Samples live in sigma space, x = x0 + sigma * eps: the initial noise is scaled by `init_noise_sigma` and the
model sees x / sqrt(sigma^2 + 1). Heun evaluates the model twice per step; as in diffusers its per-call tables
repeat every interior sigma and timestep, so one `step` is one model call and the number of calls is 2n - 1.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._base import Scheduler
from sdjax.schedulers._common import (
    NoiseSchedule,
    alphas_cumprod,
    check_final_sigmas_type,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_sigmas,
)

K_DIFFUSION_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


def sigma_schedule(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    karras: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma: str = "zero",
    linspace_dtype=np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps f32[n], sigmas f32[n + 1]) as diffusers' Euler/LMS/Heun `set_timesteps` builds them.

    Sigmas are interpolated at the spaced timesteps, or (karras) respaced between the extreme ones (or
    sigma_min/sigma_max) with the timesteps mapped back; the last sigma is 0 or ("sigma_min") the smallest
    training sigma.
    """
    ac = alphas_cumprod(schedule, zero_snr_floor=True)
    sig_train = train_sigmas(ac)
    timesteps = spaced_timesteps(schedule, num_steps, round_linspace=False, linspace_dtype=linspace_dtype)
    sigmas = interp_sigmas(sig_train, timesteps)
    if karras:
        low = sigma_min if sigma_min is not None else sigmas[-1]
        high = sigma_max if sigma_max is not None else sigmas[0]
        sigmas = karras_sigmas(low, high, num_steps)
        timesteps = sigma_to_t(sigmas, sig_train)
    last = 0.0 if final_sigma == "zero" else np.float32(((1 - ac[0]) / ac[0]) ** 0.5)
    return timesteps.astype(np.float32), np.concatenate([sigmas, [last]]).astype(np.float32)


def sigma_x0_derivative(prediction_type: str, model_output, sample, sigma):
    """(x0, dx/dsigma = (sample - x0) / sigma) from a model output for a sample at noise level sigma.

    x0 is diffusers' formula; the derivative is its closed form (epsilon itself for epsilon prediction)
    rather than diffusers' (sample - x0) / sigma, which loses most float32 digits at small sigma. Updates are
    written x0 + sigma_next * derivative (= sample + derivative * (sigma_next - sigma)), which stays exact
    for the large steps of short schedules.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output, model_output
    if prediction_type == "v_prediction":
        c_out = (sigma**2 + 1) ** 0.5
        x0 = model_output * (-sigma / c_out) + sample / (sigma**2 + 1)
        return x0, sample * (sigma / (sigma**2 + 1)) + model_output / c_out
    return model_output, (sample - model_output) / sigma


def ancestral_split(sigma: np.ndarray, sigma_to: np.ndarray, eta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """float64 (sigma_down, sigma_up) of k-diffusion's `get_ancestral_step` from sigma to sigma_to: fresh
    noise sigma_up = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2)), deterministic part sigma_down =
    sqrt(s'^2 - sigma_up^2) (in float64: it cancels catastrophically in float32)."""
    sigma, sigma_to = sigma.astype(np.float64), sigma_to.astype(np.float64)
    up = np.minimum(sigma_to, eta * (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def sigma_init_noise(schedule: NoiseSchedule, state) -> jax.Array:
    """f32[]: the largest of `state.tables["sigmas"]`, or sqrt(max^2 + 1) with "leading" spacing: diffusers'
    init_noise_sigma of every k-diffusion family (Euler, Heun, LMS, DPM2, DPM++ SDE)."""
    max_sigma = jnp.max(state.tables["sigmas"])
    return max_sigma if schedule.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5


class SigmaScheduler(Scheduler):
    """The k-diffusion families (Euler, Euler a, Heun, LMS): samples in sigma space, x = x0 + sigma * eps,
    over a "sigmas" table. Subclasses are final and implement the rest of `Scheduler`."""

    @final
    def init_noise_sigma(self, state):
        """f32[]: the largest sigma, or sqrt(max^2 + 1) with "leading" spacing (diffusers' init_noise_sigma)."""
        return sigma_init_noise(self.schedule, state)

    @final
    def scale_model_input(self, state, sample):
        """sample / sqrt(sigma^2 + 1) (back to unit variance) at the next call's sigma."""
        sigma = state.tables["sigmas"][state.index]
        return sample / (sigma**2 + 1) ** 0.5

    @final
    def add_noise(self, state, original, noise):
        """original + sigma * noise at the sigma of the next call."""
        return original + noise * state.tables["sigmas"][state.index]


@final
@dataclasses.dataclass(frozen=True)
class Euler(SigmaScheduler):
    """diffusers' EulerDiscreteScheduler (s_churn = 0, as in its pipelines)."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"

    diffusers_class = "EulerDiscreteScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            **K_DIFFUSION_DEFAULTS,
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "sigma_min": None,
            "sigma_max": None,
            "timestep_type": "discrete",
            "rescale_betas_zero_snr": False,
            "final_sigmas_type": "zero",
        }
    )

    def __post_init__(self):
        check_final_sigmas_type(self.final_sigmas_type)

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps):
        timesteps, sigmas = sigma_schedule(
            self.schedule,
            num_steps,
            karras=self.use_karras_sigmas,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            final_sigma=self.final_sigmas_type,
        )
        return {"timesteps": timesteps, "sigmas": sigmas}

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        sigma, sigma_next = state.tables["sigmas"][state.index], state.tables["sigmas"][state.index + 1]
        x0, derivative = sigma_x0_derivative(
            self.schedule.prediction_type, model_output.astype(jnp.float32), sample, sigma
        )
        return x0 + sigma_next * derivative, state.advance()


@final
@dataclasses.dataclass(frozen=True)
class EulerAncestral(SigmaScheduler):
    """diffusers' EulerAncestralDiscreteScheduler: an Euler step to sigma_down, then fresh noise of sigma_up."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")

    diffusers_class = "EulerAncestralDiscreteScheduler"
    diffusers_defaults = types.MappingProxyType({**K_DIFFUSION_DEFAULTS, "rescale_betas_zero_snr": False})
    prediction_types = ("epsilon", "v_prediction")

    @property
    def stochastic(self) -> bool:
        return True

    def tables(self, num_steps):
        """timesteps f32[n], sigmas f32[n + 1], and per step the ancestral split of the next sigma
        (`ancestral_split`): "sigma_up" (fresh noise) and "sigma_down" (deterministic part)."""
        timesteps, sigmas = sigma_schedule(self.schedule, num_steps)
        sigma_down, sigma_up = ancestral_split(sigmas[:-1], sigmas[1:])
        return {"timesteps": timesteps, "sigmas": sigmas, "sigma_up": sigma_up, "sigma_down": sigma_down}

    def init_history(self, sample_shape):
        return {}

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("EulerAncestral needs `noise` (standard normal, the shape of `sample`)")
        i = state.index
        x0, derivative = sigma_x0_derivative(
            self.schedule.prediction_type, model_output.astype(jnp.float32), sample, state.tables["sigmas"][i]
        )
        prev_sample = x0 + state.tables["sigma_down"][i] * derivative
        return prev_sample + noise * state.tables["sigma_up"][i], state.advance()


@final
@dataclasses.dataclass(frozen=True)
class Heun(SigmaScheduler):
    """diffusers' HeunDiscreteScheduler: Euler predictor, trapezoidal corrector; the last step is Euler only."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    use_karras_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    order = 2
    diffusers_class = "HeunDiscreteScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            **K_DIFFUSION_DEFAULTS,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "clip_sample": False,
            "clip_sample_range": 1.0,
        }
    )

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps):
        """timesteps [t0, t1, t1, ..., t_{n-1}, t_{n-1}] (2n - 1) and sigmas [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]."""
        timesteps, sigmas = sigma_schedule(self.schedule, num_steps, karras=self.use_karras_sigmas)
        return {
            "timesteps": np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)]),
            "sigmas": np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]),
        }

    def init_history(self, sample_shape):
        zeros = jnp.zeros(sample_shape, jnp.float32)
        return {"sample": zeros, "derivative": zeros, "dt": jnp.zeros((), jnp.float32)}

    def step(self, state, model_output, sample, noise=None):
        model_output, sigmas, i = model_output.astype(jnp.float32), state.tables["sigmas"], state.index

        def x0_derivative(sigma):
            x0, derivative = sigma_x0_derivative(self.schedule.prediction_type, model_output, sample, sigma)
            if not self.clip_sample:
                return x0, derivative
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
            return x0, (sample - x0) / sigma

        def predictor(_):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x0, derivative = x0_derivative(sigma)
            history = {"sample": sample, "derivative": derivative, "dt": sigma_next - sigma}
            return x0 + sigma_next * derivative, history

        def corrector(_):
            derivative = (state.history["derivative"] + x0_derivative(sigmas[i])[1]) / 2
            return state.history["sample"] + derivative * state.history["dt"], state.history

        prev_sample, history = jax.lax.cond(state.counter % 2 == 0, predictor, corrector, None)
        return prev_sample, state.advance(**history)
