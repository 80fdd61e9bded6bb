"""DPM++ SDE (k-diffusion's sample_dpmpp_sde, A1111's "DPM++ SDE"), as diffusers' DPMSolverSDEScheduler.

Each step from sigma s to s' evaluates the model twice: at s, then at the midpoint sigma_m = sqrt(s s')
(midpoint in t = -log sigma). Each evaluation makes an ancestral DPM-Solver++ step from s (to sigma_m,
then, with the second evaluation's x0, to s'), adding Brownian noise of the path's increment over the
step's interval (`sdjax.schedulers.brownian`): the two increments of a step are parts of the same path,
as with torchsde's Brownian tree in diffusers. The last step (to 0) is Euler, one evaluation: 2n - 1 calls.

Tables (diffusers' per-call layout): "sigmas" [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]; a call's model
input is scaled at its sigma, a second call's at the step's sigma_m ("mid").
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
from sdjax.schedulers.euler import sigma_init_noise, sigma_schedule, sigma_x0_derivative
from sdjax.schedulers.kdpm2 import KDPM2_DEFAULTS


@final
@dataclasses.dataclass(frozen=True)
class DPMSolverSDE(Scheduler):
    """diffusers' DPMSolverSDEScheduler (s_noise 1). Its Brownian noise comes from the image's key (the
    loop passes `noise_interval`'s increment, see `sdjax.schedulers.loop`), not from torchsde."""

    schedule: NoiseSchedule = NoiseSchedule(beta_start=0.00085, beta_end=0.012, timestep_spacing="linspace")
    use_karras_sigmas: bool = False

    order = 2
    brownian: ClassVar[bool] = True
    diffusers_class = "DPMSolverSDEScheduler"
    diffusers_defaults = types.MappingProxyType({**KDPM2_DEFAULTS, "noise_sampler_seed": None})
    prediction_types = ("epsilon", "v_prediction")

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def sigma_max(self) -> float:
        """The top of the Brownian path's interval: the largest training sigma."""
        return float(train_sigmas(alphas_cumprod(self.schedule)).max())

    def tables(self, num_steps):
        # diffusers spaces this scheduler's "linspace" timesteps in float64 (Euler's in float32)
        timesteps, sigmas = sigma_schedule(
            self.schedule, num_steps, karras=self.use_karras_sigmas, linspace_dtype=np.float64
        )
        levels = sigmas[:-1].astype(np.float64)
        mid = np.exp(-(-np.log(levels[:-1]) + 0.5 * np.diff(-np.log(levels))))
        calls = np.empty(2 * num_steps - 1, np.float32)
        calls[0::2], calls[1::2] = timesteps, sigma_to_t(mid, train_sigmas(alphas_cumprod(self.schedule)))
        per_call_mid = np.zeros(2 * num_steps, np.float32)
        per_call_mid[1:-1:2] = mid  # call 2j + 1: step j's midpoint
        return {
            "timesteps": calls,
            "sigmas": np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]).astype(np.float32),
            "mid": per_call_mid,
        }

    def init_history(self, sample_shape):
        return {"sample": jnp.zeros(sample_shape, jnp.float32)}

    def init_noise_sigma(self, state):
        return sigma_init_noise(self.schedule, state)

    def scale_model_input(self, state, sample):
        i = state.index
        sigma = jnp.where(i % 2 == 0, state.tables["sigmas"][i], state.tables["mid"][i])
        return sample / (sigma**2 + 1) ** 0.5

    def add_noise(self, state, original, noise):
        return original + noise * state.tables["sigmas"][state.index]

    def noise_interval(self, state):
        """(sigma the step starts from, sigma this call's update ends at): (s, sigma_m) for a step's first
        call, (s, s') for its second, (s, 0) for the last step; the Brownian increment of this call's update
        is the path's over it."""
        i, sigmas, mid = state.index, state.tables["sigmas"], state.tables["mid"]
        first = i % 2 == 0
        start = jnp.where(first, sigmas[i], sigmas[i - 1])
        target = jnp.where(first, jnp.where(sigmas[i + 1] == 0, 0.0, mid[i + 1]), sigmas[i])
        return start, target

    def step(self, state, model_output, sample, noise=None):
        if noise is None:
            raise ValueError("DPMSolverSDE needs `noise`: the Brownian increment over `noise_interval(state)`")
        i, sigmas, mid = state.index, state.tables["sigmas"], state.tables["mid"]
        first = i % 2 == 0
        sigma, target = self.noise_interval(state)
        sigma_input = jnp.where(first, sigma, mid[i])
        x0 = sigma_x0_derivative(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, sigma_input)[
            0
        ]
        base = jnp.where(first, sample, state.history["sample"])

        def euler(_):
            return x0  # sigma_next == 0: sample + (sample - x0) / s * (0 - s)

        def ancestral(_):
            up = jnp.minimum(target, (target**2 * (sigma**2 - target**2) / sigma**2) ** 0.5)
            down = (target**2 - up**2) ** 0.5
            # (sigma_down / s) * base - expm1(t - t_down) * x0, t = -log sigma
            out = (down / sigma) * base - jnp.expm1(jnp.log(down) - jnp.log(sigma)) * x0
            return out + noise * up

        last = first & (sigmas[i + 1] == 0)
        prev_sample = jax.lax.cond(last, euler, ancestral, None)
        return prev_sample, state.advance(sample=jnp.where(first, sample, state.history["sample"]))
