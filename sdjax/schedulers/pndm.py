"""PNDM (Liu et al. 2022), as diffusers' PNDMScheduler: linear multistep (PLMS) steps after a warm-up.

skip_prk_steps=True (the SD checkpoints' setting, sdjax's "pndm", A1111's "PLMS"): diffusers makes n + 1
model calls for n >= 2 steps: the second call re-evaluates the first step with the average of two model
outputs (a Heun-like warm-up), then 2nd-, 3rd- and 4th-order Adams-Bashforth combinations of past model
outputs follow. The combination is chosen by the number of calls since the start, so an img2img run that
starts later in the schedule warms up the same way, as in diffusers.

skip_prk_steps=False (diffusers' default, sdjax's "pndm_prk"): the first three steps are pseudo Runge-Kutta
steps of four model calls each (at t, t - h, t - h, t - 2h with h = T // n // 2; the outputs weighted
1/6, 1/3, 1/3, 1/6), then every step is 4th-order Adams-Bashforth: n + 9 calls for n >= 4 (n = 2, 3: the
one or two RK steps there is room for, 4 or 8 calls). For n = 1 diffusers makes no model call at all and
returns the noise; sdjax makes the single PLMS call instead. The warm-up needs the whole schedule, so it
does not start later (img2img): `sdjax.request` refuses that.
"""

from __future__ import annotations

import dataclasses
import types
from typing import final

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.schedulers._common import NoiseSchedule, alphas_cumprod, spaced_timesteps
from sdjax.schedulers.ddim import DiscreteScheduler


@final
@dataclasses.dataclass(frozen=True)
class PNDM(DiscreteScheduler):
    """diffusers' PNDMScheduler; skip_prk_steps=False runs the pseudo Runge-Kutta warm-up."""

    schedule: NoiseSchedule = NoiseSchedule()
    set_alpha_to_one: bool = False
    skip_prk_steps: bool = True

    diffusers_class = "PNDMScheduler"
    diffusers_defaults = types.MappingProxyType(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "trained_betas": None,
            "skip_prk_steps": False,
            "set_alpha_to_one": False,
            "prediction_type": "epsilon",
            "timestep_spacing": "leading",
            "steps_offset": 0,
        }
    )
    prediction_types = ("epsilon", "v_prediction")

    @property
    def stochastic(self) -> bool:
        return False

    def tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """Per call: timesteps and the coefficients of x_prev = x_coef * x + out_coef * (combined output).

        "x_coef"/"out_coef" step from t to t - T // n (the final alpha below 0); "x_coef_redo"/"out_coef_redo"
        from t + T // n to t (the second call re-does the first step). Computed in float64 from diffusers'
        float32 alphas_cumprod, v_prediction folded in (diffusers converts v to epsilon with the sample first;
        doing that in float32 loses digits at high noise). With the PRK warm-up: `_prk_tables`.
        """
        if not self.skip_prk_steps:
            return self._prk_tables(num_steps)
        ratio = self.schedule.num_train_timesteps // num_steps
        ac = alphas_cumprod(self.schedule)
        ascending = spaced_timesteps(self.schedule, num_steps)[::-1].astype(np.int64)
        timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        prev = timesteps - ratio
        alpha_t = ac[timesteps]
        alpha_prev = self._alpha_before(ac, prev)
        alpha_up = ac[np.minimum(timesteps + ratio, len(ac) - 1)]
        x_coef, out_coef = self._coefficients(alpha_t, alpha_prev)
        x_coef_redo, out_coef_redo = self._coefficients(alpha_up, alpha_t)
        return {
            "timesteps": timesteps,
            "alpha_t": alpha_t,
            "x_coef": x_coef,
            "out_coef": out_coef,
            "x_coef_redo": x_coef_redo,
            "out_coef_redo": out_coef_redo,
        }

    def _prk_tables(self, num_steps: int) -> dict[str, np.ndarray]:
        """Per call, as diffusers' `set_timesteps` and `step_prk`/`step_plms` index them: "timesteps" (the
        model's), "prk" (1 for a warm-up call), "alpha_t" and "x_coef"/"out_coef" of the update. A warm-up
        call at position k of its RK step steps from the RK step's first timestep to its own timestep minus
        h (k even) or to its own timestep (k odd); a PLMS call steps from t to t - T // n (4th order; first
        order for the single call of n = 1)."""
        total = self.schedule.num_train_timesteps
        half = total // num_steps // 2
        levels = spaced_timesteps(self.schedule, num_steps)[::-1].astype(np.int64)  # ascending
        if num_steps == 1:  # diffusers: no call; here one first-order PLMS call
            prk, plms = np.zeros(0, np.int64), levels
        else:
            last = np.repeat(levels[-4:], 2) + np.tile([0, half], len(levels[-4:]))
            prk, plms = np.repeat(last[:-1], 2)[1:-1][::-1], levels[:-3][::-1]
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        calls = np.arange(len(prk))
        start = np.concatenate([prk[calls // 4 * 4], plms])
        prev = np.concatenate([prk - np.where(calls % 2 == 0, half, 0), plms - total // num_steps])
        ac = alphas_cumprod(self.schedule)
        x_coef, out_coef = self._coefficients(ac[start], self._alpha_before(ac, prev))
        return {
            "timesteps": timesteps,
            "prk": np.concatenate([np.ones(len(prk)), np.zeros(len(plms))]),
            "alpha_t": ac[timesteps],
            "x_coef": x_coef,
            "out_coef": out_coef,
        }

    def _alpha_before(self, ac: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """alpha_bar at the previous timesteps `prev`; below 0 the final alpha (1 with set_alpha_to_one)."""
        final_alpha = np.float32(1.0) if self.set_alpha_to_one else ac[0]
        return np.where(prev >= 0, ac[np.maximum(prev, 0)], final_alpha)

    def _coefficients(self, alpha_prod_t, alpha_prod_t_prev) -> tuple[np.ndarray, np.ndarray]:
        """float64 (x_coef, out_coef) of formula (9) of the PNDM paper, from alpha_bar at t and t_prev."""
        a_t, a_prev = alpha_prod_t.astype(np.float64), alpha_prod_t_prev.astype(np.float64)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        x_coef, eps_coef = (a_prev / a_t) ** 0.5, -(a_prev - a_t) / denom
        if self.schedule.prediction_type == "v_prediction":  # eps = sqrt(a_t) * v + sqrt(b_t) * x
            return x_coef + eps_coef * b_t**0.5, eps_coef * a_t**0.5
        return x_coef, eps_coef

    def init_history(self, sample_shape):
        history = {
            "ets": jnp.zeros((4, *sample_shape), jnp.float32),
            "cur_sample": jnp.zeros(sample_shape, jnp.float32),
        }
        if not self.skip_prk_steps:  # the RK step's weighted sum of model outputs so far
            history["cur_output"] = jnp.zeros(sample_shape, jnp.float32)
        return history

    def step(self, state, model_output, sample, noise=None):
        if not self.skip_prk_steps:
            return self._prk_step(state, model_output, sample)
        model_output = model_output.astype(jnp.float32)
        ets, cur_sample = state.history["ets"], state.history["cur_sample"]
        pushed = jnp.concatenate([ets[1:], model_output[None]])  # the 4 most recent outputs, newest last
        tables, i = state.tables, state.index
        coefs = (tables["x_coef"][i], tables["out_coef"][i])

        # each branch: (ets, cur_sample, combined output, sample stepped from, its coefficients)
        def first(_):
            return pushed, sample, model_output, sample, coefs

        def redo_first(_):  # the second call: average, and step again from the first call's sample
            redo = (tables["x_coef_redo"][i], tables["out_coef_redo"][i])
            return ets, cur_sample, (model_output + ets[-1]) / 2, cur_sample, redo

        def adams_bashforth(combine):
            return lambda _: (pushed, cur_sample, combine(pushed), sample, coefs)

        branches = [
            first,
            redo_first,
            adams_bashforth(lambda e: (3 * e[-1] - e[-2]) / 2),
            adams_bashforth(lambda e: (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12),
            adams_bashforth(lambda e: (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])),
        ]
        which = jnp.where(state.counter < 2, state.counter, jnp.minimum(state.counter, 4))
        ets, cur_sample, output, from_sample, (x_coef, out_coef) = jax.lax.switch(which, branches, None)
        return x_coef * from_sample + out_coef * output, state.advance(ets=ets, cur_sample=cur_sample)

    def _prk_step(self, state, model_output, sample):
        """A call of the schedule with the PRK warm-up: RK position counter % 4 while "prk" is set (its
        first call keeps the sample and pushes the output to the multistep memory), then 4th-order PLMS
        (first order for a one-step schedule)."""
        e = model_output.astype(jnp.float32)
        history, tables, i = state.history, state.tables, state.index
        ets, cur_sample, cur_output = history["ets"], history["cur_sample"], history["cur_output"]
        pushed = jnp.concatenate([ets[1:], e[None]])

        # each branch: (ets, cur_sample, cur_output, output the update uses, sample stepped from)
        branches = [
            lambda _: (pushed, sample, e / 6, e, sample),
            lambda _: (ets, cur_sample, cur_output + e / 3, e, cur_sample),
            lambda _: (ets, cur_sample, cur_output + e / 3, e, cur_sample),
            lambda _: (ets, cur_sample, jnp.zeros_like(e), cur_output + e / 6, cur_sample),
            lambda _: (
                pushed,
                cur_sample,
                cur_output,
                (1 / 24) * (55 * pushed[-1] - 59 * pushed[-2] + 37 * pushed[-3] - 9 * pushed[-4]),
                sample,
            ),
            lambda _: (pushed, cur_sample, cur_output, e, sample),
        ]
        plms = jnp.where(state.num_steps == 1, 5, 4)  # one step: a single first-order call
        which = jnp.where(tables["prk"][i] > 0, state.counter % 4, plms)
        ets, cur_sample, cur_output, output, from_sample = jax.lax.switch(which, branches, None)
        prev_sample = tables["x_coef"][i] * from_sample + tables["out_coef"][i] * output
        return prev_sample, state.advance(ets=ets, cur_sample=cur_sample, cur_output=cur_output)
