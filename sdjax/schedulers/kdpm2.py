"""DPM2 and DPM2 ancestral (k-diffusion's sample_dpm_2 / sample_dpm_2_ancestral), as diffusers'
KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler.

Each step of n evaluates the model twice: at sigma_j (a first-order half step to an intermediate sigma),
then at that intermediate sigma (the midpoint derivative carries the sample from sigma_j to the next
level). The intermediate sigma is the geometric mean of sigma_j and the next level: sigma_{j+1} for DPM2;
for DPM2 a the ancestral split's sigma_down_j, after which fresh noise of sigma_up_j is added. The last
step is first order only, so a schedule makes 2n - 1 model calls; call i is a step's first evaluation
when i is even.

The tables are diffusers' per-call ones: "sigmas" [s0, s1, s1, ..., s_n, s_n, s_n] (s_n = 0) and
"sigmas_interpol" the same for the intermediate sigmas (DPM2 a: also "sigmas_up", "sigmas_down"), read at
the call's index exactly as diffusers' `step` reads them.
"""

from __future__ import annotations

import dataclasses
import types
from typing import ClassVar, final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._base import Scheduler
from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, sigma_to_t, train_sigmas
from sdjax.schedulers.euler import K_DIFFUSION_DEFAULTS, sigma_init_noise, sigma_schedule, sigma_x0_derivative

KDPM2_DEFAULTS = {
    **K_DIFFUSION_DEFAULTS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}


def _levels(schedule: NoiseSchedule, num_steps: int, karras: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps f32[n], sigmas f64[n + 1] ending in 0, the training sigmas) of diffusers' KDPM2
    `set_timesteps` (Karras timesteps rounded, as it rounds them)."""
    timesteps, sigmas = sigma_schedule(schedule, num_steps, karras=karras)
    if karras:
        timesteps = np.round(timesteps)
    return timesteps, sigmas.astype(np.float64), train_sigmas(alphas_cumprod(schedule))


def _geometric_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp((log a + log b) / 2), 0 where either is 0."""
    with np.errstate(divide="ignore"):
        return np.exp(0.5 * (np.log(a) + np.log(b)))


def _per_call(levels: np.ndarray) -> np.ndarray:
    """diffusers' per-call layout of per-level values v_0..v_n: [v0, v1, v1, ..., v_n, v_n, v_n]."""
    return np.concatenate([levels[:1], np.repeat(levels[1:], 2), levels[-1:]]).astype(np.float32)


def _call_timesteps(timesteps: np.ndarray, mid_timesteps: np.ndarray) -> np.ndarray:
    """f32[2n - 1]: step j's first call at t_j, its second (all steps but the last) at its intermediate t."""
    n = len(timesteps)
    out = np.empty(2 * n - 1, np.float32)
    out[0::2], out[1::2] = timesteps, mid_timesteps[: n - 1]
    return out


class _TwoEvaluationScheduler(Scheduler):
    """What DPM2 and DPM2 a share: samples in sigma space (x = x0 + sigma * eps), the model input scaled
    at the call's sigma (a first call's level, a second call's intermediate sigma) and the stored sample
    of the step's first call."""

    def init_noise_sigma(self, state):
        """f32[]: the largest sigma, or sqrt(max^2 + 1) with "leading" spacing (diffusers' init_noise_sigma)."""
        return sigma_init_noise(self.schedule, state)

    # a second call's input is scaled by sigmas_interpol[i - this] (diffusers: DPM2 its own entry, i; DPM2 a
    # the entry of the step's first call, i - 1)
    _second_input_lag: ClassVar[int] = 0

    def scale_model_input(self, state, sample):
        i = state.index
        mid = state.tables["sigmas_interpol"][i - self._second_input_lag]
        sigma = jnp.where(i % 2 == 0, state.tables["sigmas"][i], mid)
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, state, original, noise):
        return original + noise * state.tables["sigmas"][state.index]

    def init_history(self, sample_shape):
        return {"sample": jnp.zeros(sample_shape, jnp.float32)}

    def _update(self, state, model_output, sample, first_mid, second, noise=None):
        """first_mid: the intermediate sigma of a first call; second: (sigma, intermediate, target, noise
        scale) of a second call; both at call index i."""
        model_output, i = model_output.astype(jnp.float32), state.index
        prediction = self.schedule.prediction_type

        def first(_):
            sigma = state.tables["sigmas"][i]
            derivative = sigma_x0_derivative(prediction, model_output, sample, sigma)[1]
            return sample + derivative * (first_mid - sigma), sample

        def second_call(_):
            sigma, mid, target, up = second
            derivative = sigma_x0_derivative(prediction, model_output, sample, mid)[1]
            out = state.history["sample"] + derivative * (target - sigma)
            if noise is not None:
                out = out + noise * up
            return out, state.history["sample"]

        prev_sample, kept = jax.lax.cond(i % 2 == 0, first, second_call, None)
        return prev_sample, state.advance(sample=kept)


@final
@dataclasses.dataclass(frozen=True)
class KDPM2(_TwoEvaluationScheduler):
    """diffusers' KDPM2DiscreteScheduler (A1111's "DPM2"): the intermediate sigma is the geometric mean of
    sigma_j and sigma_{j+1}."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    use_karras_sigmas: bool = False

    order = 2
    diffusers_class = "KDPM2DiscreteScheduler"
    diffusers_defaults = types.MappingProxyType(KDPM2_DEFAULTS)
    prediction_types = ("epsilon", "v_prediction")

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps):
        timesteps, sigmas, train = _levels(self.schedule, num_steps, self.use_karras_sigmas)
        mid = _geometric_mean(sigmas, np.concatenate([[0.0], sigmas[:-1]]))  # level j: between s_{j-1} and s_j
        return {
            "timesteps": _call_timesteps(timesteps, sigma_to_t(mid, train)[1:]),
            "sigmas": _per_call(sigmas),
            "sigmas_interpol": _per_call(mid),
        }

    def step(self, state, model_output, sample, noise=None):
        i, sigmas, mid = state.index, state.tables["sigmas"], state.tables["sigmas_interpol"]
        second = (sigmas[i - 1], mid[i], sigmas[i], None)
        return self._update(state, model_output, sample, mid[i + 1], second)


@final
@dataclasses.dataclass(frozen=True)
class KDPM2Ancestral(_TwoEvaluationScheduler):
    """diffusers' KDPM2AncestralDiscreteScheduler (A1111's "DPM2 a"): the step's ancestral split of
    sigma_{j+1} into sigma_down (deterministic) and sigma_up (fresh noise, added after the second call);
    the intermediate sigma is the geometric mean of sigma_j and sigma_down. The last step is Euler to 0."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    use_karras_sigmas: bool = False

    order = 2
    _second_input_lag = 1
    diffusers_class = "KDPM2AncestralDiscreteScheduler"
    diffusers_defaults = types.MappingProxyType(KDPM2_DEFAULTS)
    prediction_types = ("epsilon", "v_prediction")

    @property
    def stochastic(self) -> bool:
        return True

    def tables(self, num_steps):
        """Besides the shared tables, per level j the split of the next level s' = s_{j+1}: "sigmas_up"
        sqrt(s'^2 (s^2 - s'^2) / s^2) and "sigmas_down" sqrt(s'^2 - up^2), in float32 as diffusers
        computes them (its sigma_down loses digits to cancellation; matching it keeps trajectories within
        1e-5 of diffusers'); the intermediate sigma is the geometric mean of s_j and its sigma_down (in
        exact arithmetic s_{j+1}), 0 for the last two levels."""
        timesteps, sigmas, train = _levels(self.schedule, num_steps, self.use_karras_sigmas)
        s = sigmas.astype(np.float32)
        s_to = np.concatenate([s[1:], np.zeros(1, np.float32)])
        with np.errstate(invalid="ignore", divide="ignore"):
            up = np.nan_to_num(np.sqrt(s_to**2 * (s**2 - s_to**2) / s**2))
        down = np.sqrt(s_to**2 - up**2)
        down[-1] = 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            log_s, log_down = np.log(s), np.log(down)
            mid = np.exp(log_down - (log_down - log_s) * np.float32(0.5))  # torch.lerp(log s, log down, 0.5)
        mid[-2:] = 0.0
        return {
            "timesteps": _call_timesteps(timesteps, sigma_to_t(mid, train)),
            "sigmas": _per_call(sigmas),
            "sigmas_interpol": _per_call(mid),
            "sigmas_up": _per_call(up),
            "sigmas_down": _per_call(down),
        }

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("KDPM2Ancestral needs `noise` (standard normal, the shape of `sample`)")
        i, tables = state.index, state.tables
        first_mid = tables["sigmas_interpol"][i]
        second = tuple(tables[k][i - 1] for k in ("sigmas", "sigmas_interpol", "sigmas_down", "sigmas_up"))
        return self._update(state, model_output, sample, first_mid, second, noise)
