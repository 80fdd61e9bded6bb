"""Linear multistep (LMS, order 4) on sigmas, as diffusers' LMSDiscreteScheduler.

The step integrates the Lagrange polynomial through the last (up to) four derivatives dx/dsigma over
[sigma_i, sigma_{i+1}]. diffusers integrates numerically (scipy quad); the integrand is a polynomial of degree
<= 3, so here a 3-point Gauss-Legendre rule gives the integral exactly, once per (step count, step) on the host.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule
from sdjax.schedulers.euler import K_DIFFUSION_DEFAULTS, SigmaScheduler, sigma_schedule, sigma_x0_derivative

LMS_ORDER = 4


def lms_coefficients(sigmas: np.ndarray, order: int = LMS_ORDER) -> np.ndarray:
    """float64[n, order]: coefficient c[i, k] multiplies the derivative from k calls before call i.

    c[i, k] = integral over [sigma_i, sigma_{i+1}] of prod_{j != k, j < m} (tau - sigma_{i-j}) /
    (sigma_{i-k} - sigma_{i-j}), with m = min(i + 1, order) (zero for k >= m). `sigmas` is f32[n + 1].
    diffusers' update is sample + sum_k c[i, k] * d_k.
    """
    s = sigmas.astype(np.float64)
    n = len(s) - 1
    i = np.arange(n)
    used = np.minimum(i + 1, order)  # m for each step
    a, b = s[:-1], s[1:]
    nodes, weights = np.polynomial.legendre.leggauss(3)
    tau = (b - a) / 2 * nodes[:, None] + (a + b) / 2  # [3, n] quadrature points of each interval
    out = np.zeros((n, order))
    for k in range(order):
        basis = np.ones_like(tau)
        for j in range(order):
            if j == k:
                continue
            active = (j < used) & (k < used)
            s_j, s_k = s[np.maximum(i - j, 0)], s[np.maximum(i - k, 0)]
            basis *= np.where(active, (tau - s_j) / np.where(active, s_k - s_j, 1.0), 1.0)
        out[:, k] = np.where(k < used, (b - a) / 2 * (weights @ basis), 0.0)
    return out


@final
@dataclasses.dataclass(frozen=True)
class LMS(SigmaScheduler):
    """diffusers' LMSDiscreteScheduler (order 4, its `step` default)."""

    schedule: NoiseSchedule = NoiseSchedule(timestep_spacing="linspace")
    use_karras_sigmas: bool = False

    diffusers_class = "LMSDiscreteScheduler"
    diffusers_defaults = types.MappingProxyType(
        {**K_DIFFUSION_DEFAULTS, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
    )

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps):
        """timesteps f32[n], sigmas f32[n + 1], coefficients f32[n * 4] (row-major [n, 4]).

        The first coefficient of each row is sigma_i + c[i, 0]: the step is written x0 + (sigma_i + c[i, 0]) d_0
        + sum_{k>0} c[i, k] d_k (= sample + sum_k c[i, k] d_k), exact in float32 for large steps.
        """
        timesteps, sigmas = sigma_schedule(self.schedule, num_steps, karras=self.use_karras_sigmas)
        coefficients = lms_coefficients(sigmas)
        coefficients[:, 0] += sigmas[:-1].astype(np.float64)
        return {"timesteps": timesteps, "sigmas": sigmas, "coefficients": coefficients.reshape(-1)}

    def init_history(self, sample_shape):
        return {"derivatives": jnp.zeros((LMS_ORDER, *sample_shape), jnp.float32)}

    def step(self, state, model_output, sample, noise=None):
        i = state.index
        x0, derivative = sigma_x0_derivative(
            self.schedule.prediction_type, model_output.astype(jnp.float32), sample, state.tables["sigmas"][i]
        )
        # newest first; slots not yet filled are zeros (diffusers sums over the derivatives it has)
        derivatives = jnp.concatenate([derivative[None], state.history["derivatives"][:-1]])
        coefficients = jnp.reshape(state.tables["coefficients"], (-1, LMS_ORDER))[i]
        prev_sample = x0 + coefficients[0] * derivatives[0]
        for k in range(1, LMS_ORDER):
            prev_sample = prev_sample + coefficients[k] * derivatives[k]
        return prev_sample, state.advance(derivatives=derivatives)
