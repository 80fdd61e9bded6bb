"""UniPC (Zhao et al. 2023): a multistep predictor plus a corrector that reuses the next model call, as diffusers'
UniPCMultistepScheduler (bh1/bh2 variants, data or noise prediction form, orders 1-3).

At every call after the first, the corrector first refines the sample the previous predictor produced using
the new model output (no extra model call); the predictor then steps to the next sigma.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import final

import jax
import jax.numpy as jnp

from sdjax.schedulers._common import NoiseSchedule, check_final_sigmas_type
from sdjax.schedulers.dpm_solver import (
    MULTISTEP_DEFAULTS,
    VPSigmaScheduler,
    alpha_sigma,
    log_snr,
    multistep_sigma_schedule,
    vp_x0,
)

SOLVER_TYPES = ("bh1", "bh2")


@final
@dataclasses.dataclass(frozen=True)
class UniPC(VPSigmaScheduler):
    """diffusers' UniPCMultistepScheduler (without solver_p, thresholding or flow sigmas)."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")
    solver_order: int = 2
    solver_type: str = "bh2"
    predict_x0: bool = True
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    sigma_min: float | None = None
    sigma_max: float | None = None

    diffusers_class = "UniPCMultistepScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            **MULTISTEP_DEFAULTS,
            "predict_x0": True,
            "solver_type": "bh2",
            "disable_corrector": (),
            "solver_p": None,
            "sigma_min": None,
            "sigma_max": None,
            "shift_terminal": None,
        }
    )

    def __post_init__(self):
        if self.solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type {self.solver_type!r} is not supported; choose one of {SOLVER_TYPES}")
        if self.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {self.solver_order!r}")
        check_final_sigmas_type(self.final_sigmas_type)

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps):
        timesteps, sigmas = multistep_sigma_schedule(
            self.schedule,
            num_steps,
            karras=self.use_karras_sigmas,
            final_sigma=self.final_sigmas_type,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            final_is_karras_min=True,
        )
        return {"timesteps": timesteps, "sigmas": sigmas}

    def init_history(self, sample_shape):
        zeros = jnp.zeros(sample_shape, jnp.float32)
        return {
            "model_outputs": jnp.zeros((self.solver_order, *sample_shape), jnp.float32),
            "last_sample": zeros,
            "last_order": jnp.ones((), jnp.int32),
        }

    def step(self, state, model_output, sample, noise=None):
        i, n, sigmas, history = state.index, state.num_calls, state.tables["sigmas"], state.history
        converted = self._convert(model_output.astype(jnp.float32), sample, sigmas[i])

        use_corrector = state.counter > 0
        if self.disable_corrector:
            use_corrector &= ~jnp.isin(i - 1, jnp.asarray(self.disable_corrector))
        correctors = [lambda ops, k=k: self._correct(k, *ops) for k in range(1, self.solver_order + 1)]
        operands = (sigmas, i, history["model_outputs"], history["last_sample"], converted)

        def correct(ops):
            return jax.lax.switch(history["last_order"] - 1, correctors, ops)

        sample = jax.lax.cond(use_corrector, correct, lambda _: sample, operands)

        outputs = jnp.concatenate([history["model_outputs"][1:], converted[None]])  # newest last
        order = jnp.minimum(self.solver_order, n - i) if self.lower_order_final else jnp.int32(self.solver_order)
        order = jnp.minimum(order, jnp.minimum(state.counter, self.solver_order) + 1)
        predictors = [lambda ops, k=k: self._predict(k, *ops) for k in range(1, self.solver_order + 1)]
        prev_sample = jax.lax.switch(order - 1, predictors, (sigmas, i, outputs, sample))
        return prev_sample, state.advance(model_outputs=outputs, last_sample=sample, last_order=order)

    def _convert(self, model_output, sample, sigma):
        """The model output as x0 (predict_x0) or as epsilon."""
        if self.predict_x0:
            return vp_x0(self.schedule.prediction_type, model_output, sample, sigma)
        alpha_t, sigma_t = alpha_sigma(sigma)
        if self.schedule.prediction_type == "epsilon":
            return model_output
        if self.schedule.prediction_type == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample

    def _bh(self, order: int, h, rks):
        """(h_phi_1, B(h), R f32[order, order], b f32[order]): the UniPC order conditions at step size h."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = jnp.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.solver_type == "bh1" else jnp.expm1(hh)
        rows, b = [], []
        for k in range(1, order + 1):
            rows.append(rks ** (k - 1))
            b.append(h_phi_k * math.factorial(k) / b_h)
            h_phi_k = h_phi_k / hh - 1 / math.factorial(k + 1)
        return h_phi_1, b_h, jnp.stack(rows), jnp.stack(b)

    def _base_update(self, sigma_t, sigma_s0, x, m0, h_phi_1):
        """The first-order part: (alpha_t or sigma_t, x at sigma_t from x at sigma_s0 and m0)."""
        alpha_t, sigma_t_vp = alpha_sigma(sigma_t)
        alpha_s0, sigma_s0_vp = alpha_sigma(sigma_s0)
        if self.predict_x0:
            return alpha_t, sigma_t_vp / sigma_s0_vp * x - alpha_t * h_phi_1 * m0
        return sigma_t_vp, alpha_t / alpha_s0 * x - sigma_t_vp * h_phi_1 * m0

    def _predict(self, order: int, sigmas, i, outputs, sample):
        """UniP: x at sigmas[i + 1] from `sample` at sigmas[i] and the last `order` converted outputs."""
        lambda_s0 = log_snr(sigmas[i])
        h = log_snr(sigmas[i + 1]) - lambda_s0
        m0 = outputs[-1]
        rks = [(log_snr(sigmas[i - k]) - lambda_s0) / h for k in range(1, order)]
        d1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, order), rks, strict=True)]
        h_phi_1, b_h, r, b = self._bh(order, h, jnp.stack(rks + [jnp.ones((), jnp.float32)]))
        scale, x_t = self._base_update(sigmas[i + 1], sigmas[i], sample, m0, h_phi_1)
        if order == 1:
            return x_t
        rhos = jnp.full((1,), 0.5, jnp.float32) if order == 2 else jnp.linalg.solve(r[:-1, :-1], b[:-1])
        return x_t - scale * b_h * _weighted_sum(rhos, d1s)

    def _correct(self, order: int, sigmas, i, outputs, last_sample, model_t):
        """UniC: the sample at sigmas[i], recomputed from `last_sample` at sigmas[i - 1] using `model_t`."""
        lambda_s0 = log_snr(sigmas[i - 1])
        h = log_snr(sigmas[i]) - lambda_s0
        m0 = outputs[-1]
        rks = [(log_snr(sigmas[i - (k + 1)]) - lambda_s0) / h for k in range(1, order)]
        d1s = [(outputs[-(k + 1)] - m0) / rk for k, rk in zip(range(1, order), rks, strict=True)]
        h_phi_1, b_h, r, b = self._bh(order, h, jnp.stack(rks + [jnp.ones((), jnp.float32)]))
        scale, x_t = self._base_update(sigmas[i], sigmas[i - 1], last_sample, m0, h_phi_1)
        rhos = jnp.full((1,), 0.5, jnp.float32) if order == 1 else jnp.linalg.solve(r, b)
        correction = rhos[-1] * (model_t - m0)
        if order > 1:
            correction = _weighted_sum(rhos[:-1], d1s) + correction
        return x_t - scale * b_h * correction


def _weighted_sum(weights, arrays):
    """sum_k weights[k] * arrays[k] (diffusers' einsum over the history axis)."""
    out = weights[0] * arrays[0]
    for k in range(1, len(arrays)):
        out = out + weights[k] * arrays[k]
    return out
