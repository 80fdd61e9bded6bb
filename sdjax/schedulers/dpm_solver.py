"""DPM-Solver++ multistep (Lu et al. 2022), ODE and SDE variants, as diffusers' DPMSolverMultistepScheduler.

Works in data-prediction form: every model output is converted to x0, and x at the next sigma is a
combination of the current sample and the last `solver_order` x0 predictions, with the log-SNR
lambda = log(alpha_t / sigma_t) as the time variable. The order used at each step follows diffusers: first
order at the start (warm-up) and, with lower_order_final, at the end of short schedules.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._base import UnitVarianceScheduler
from sdjax.schedulers._common import (
    NoiseSchedule,
    alphas_cumprod,
    check_final_sigmas_type,
    dynamic_threshold,
    interp_sigmas,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps_multistep,
    train_sigmas,
)

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")
SOLVER_TYPES = ("midpoint", "heun")


def multistep_sigma_schedule(
    schedule: NoiseSchedule,
    num_steps: int,
    *,
    karras: bool,
    final_sigma: str,
    lambda_min_clipped: float = -np.inf,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_is_karras_min: bool = False,
    lu_lambdas: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps f32[n] (integers), sigmas f32[n + 1]) as DPM-Solver/UniPC `set_timesteps` builds them.

    Karras sigmas span the whole training range (or sigma_min/sigma_max) whatever the spacing; their
    timesteps are rounded (except for squaredcos_cap_v2, truncated). `lu_lambdas` (Lu et al. 2022; used
    when not karras): log sigma evenly spaced from the largest training sigma to the smallest, timesteps
    mapped back and rounded as for Karras. The final sigma is 0, or ("sigma_min") the smallest training
    sigma -- the smallest Karras sigma for UniPC (`final_is_karras_min`).
    """
    ac = alphas_cumprod(schedule, zero_snr_floor=True)
    sig_train = train_sigmas(ac)
    t_train = schedule.num_train_timesteps
    lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(1 - ac))
    last_timestep = t_train - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
    timesteps = spaced_timesteps_multistep(schedule, num_steps, last_timestep)
    if karras:
        low = sigma_min if sigma_min is not None else float(sig_train[0])
        high = sigma_max if sigma_max is not None else float(sig_train[-1])
        sigmas = karras_sigmas(low, high, num_steps)
        timesteps = sigma_to_t(sigmas, sig_train)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    elif lu_lambdas:
        log_sigmas = np.log(sig_train).astype(np.float64)  # float32 logs, as diffusers'
        ramp = np.linspace(0, 1, num_steps)
        sigmas = np.exp(log_sigmas[-1] + ramp * (log_sigmas[0] - log_sigmas[-1]))
        timesteps = sigma_to_t(sigmas, sig_train)
        if schedule.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = interp_sigmas(sig_train, timesteps)
    if final_sigma == "zero":
        last = 0.0
    elif karras and final_is_karras_min:
        last = sigmas[-1]
    else:
        last = np.float32(((1 - ac[0]) / ac[0]) ** 0.5)
    timesteps = timesteps.astype(np.int64).astype(np.float32)
    return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)


def alpha_sigma(sigma):
    """(alpha_t, sigma_t) of the variance-preserving process at noise-to-signal ratio sigma."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def log_snr(sigma):
    """lambda = log(alpha_t) - log(sigma_t) at noise-to-signal ratio sigma (+inf at sigma = 0)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    return jnp.log(alpha_t) - jnp.log(sigma_t)


def vp_x0(prediction_type: str, model_output, sample, sigma):
    """x0 predicted from a model output at noise-to-signal ratio sigma (sample in variance-preserving form)."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    return model_output


class VPSigmaScheduler(UnitVarianceScheduler):
    """The multistep solvers (DPM-Solver++, UniPC): a "sigmas" table of noise-to-signal ratios of the
    variance-preserving process. Subclasses are final and implement the rest of `Scheduler`."""

    @final
    def add_noise(self, state, original, noise):
        """alpha_t * original + sigma_t * noise at the sigma of the next call."""
        alpha_t, sigma_t = alpha_sigma(state.tables["sigmas"][state.index])
        return alpha_t * original + sigma_t * noise


MULTISTEP_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}


@final
@dataclasses.dataclass(frozen=True)
class DPMSolverMultistep(VPSigmaScheduler):
    """diffusers' DPMSolverMultistepScheduler for algorithm_type dpmsolver++ / sde-dpmsolver++, orders 1-3."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")
    algorithm_type: str = "dpmsolver++"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -float("inf")
    use_lu_lambdas: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    diffusers_class = "DPMSolverMultistepScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            **MULTISTEP_DEFAULTS,
            "algorithm_type": "dpmsolver++",
            "solver_type": "midpoint",
            "euler_at_final": False,
            "use_lu_lambdas": False,
            "lambda_min_clipped": -float("inf"),
            "variance_type": None,
        }
    )

    def __post_init__(self):
        if self.algorithm_type not in ALGORITHMS:
            raise ValueError(f"algorithm_type {self.algorithm_type!r} is not supported; choose one of {ALGORITHMS}")
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type {self.solver_type!r} is not supported; choose one of {SOLVER_TYPES}")
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        check_final_sigmas_type(self.final_sigmas_type)

    @property
    def stochastic(self) -> bool:
        return self.algorithm_type == "sde-dpmsolver++"

    def tables(self, num_steps):
        timesteps, sigmas = multistep_sigma_schedule(
            self.schedule,
            num_steps,
            karras=self.use_karras_sigmas,
            final_sigma=self.final_sigmas_type,
            lambda_min_clipped=self.lambda_min_clipped,
            lu_lambdas=self.use_lu_lambdas,
        )
        return {"timesteps": timesteps, "sigmas": sigmas}

    def init_history(self, sample_shape):
        return {"model_outputs": jnp.zeros((self.solver_order, *sample_shape), jnp.float32)}

    def step(self, state, model_output, sample, noise=None):
        if self.stochastic and noise is None:
            raise ValueError("sde-dpmsolver++ needs `noise` (standard normal, the shape of `sample`)")
        i, n, sigmas = state.index, state.num_calls, state.tables["sigmas"]
        x0 = vp_x0(self.schedule.prediction_type, model_output.astype(jnp.float32), sample, sigmas[i])
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        outputs = jnp.concatenate([state.history["model_outputs"][1:], x0[None]])  # newest last

        short = self.lower_order_final & (n < 15)
        final_first = (i == n - 1) & (self.euler_at_final | short | (self.final_sigmas_type == "zero"))
        second_last = (i == n - 2) & short
        warm = jnp.minimum(state.counter, self.solver_order)  # diffusers' lower_order_nums
        order = jnp.where(
            (self.solver_order == 1) | (warm < 1) | final_first,
            1,
            jnp.where((self.solver_order == 2) | (warm < 2) | second_last, 2, 3),
        )
        branches = [lambda ops, k=k: self._update(k, *ops) for k in range(1, self.solver_order + 1)]
        noise = jnp.zeros_like(sample) if noise is None else noise
        prev_sample = jax.lax.switch(order - 1, branches, (sigmas, i, outputs, sample, noise))
        return prev_sample, state.advance(model_outputs=outputs)

    def _update(self, order: int, sigmas, i, outputs, sample, noise):
        """x at sigmas[i + 1] by the `order`-step multistep formula (diffusers' *_order_update)."""
        alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
        _, sigma_s0 = alpha_sigma(sigmas[i])
        lambda_t, lambda_s0 = jnp.log(alpha_t) - jnp.log(sigma_t), log_snr(sigmas[i])
        h = lambda_t - lambda_s0
        sde = self.algorithm_type == "sde-dpmsolver++"
        if sde:
            x = (sigma_t / sigma_s0 * jnp.exp(-h)) * sample
            phi = alpha_t * (1 - jnp.exp(-2.0 * h))  # weight of x0 (the ODE's -alpha_t * (exp(-h) - 1) below)
            noise_term = sigma_t * jnp.sqrt(1.0 - jnp.exp(-2 * h)) * noise
        else:
            x = (sigma_t / sigma_s0) * sample
            phi = -(alpha_t * (jnp.exp(-h) - 1.0))
            noise_term = 0.0
        m0 = outputs[-1]
        if order == 1:
            return x + phi * m0 + noise_term
        m1, lambda_s1 = outputs[-2], log_snr(sigmas[i - 1])
        r0 = (lambda_s0 - lambda_s1) / h
        d1_0 = (1.0 / r0) * (m0 - m1)
        if order == 2:
            if self.solver_type == "midpoint":
                return x + phi * m0 + 0.5 * phi * d1_0 + noise_term
            if sde:
                return x + phi * m0 + (alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1_0 + noise_term
            return x + phi * m0 + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1_0
        m2, lambda_s2 = outputs[-3], log_snr(sigmas[i - 2])
        r1 = (lambda_s1 - lambda_s2) / h
        d1_1 = (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if sde:
            c1 = alpha_t * ((1.0 - jnp.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            c2 = alpha_t * ((1.0 - jnp.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            return x + phi * m0 + c1 * d1 + c2 * d2 + noise_term
        c1 = alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)
        c2 = alpha_t * ((jnp.exp(-h) - 1.0 + h) / h**2 - 0.5)
        return x + phi * m0 + c1 * d1 - c2 * d2
