"""diffusers' own scheduler unit tests' "full loop" cases, run with sdjax's schedulers.

Every case below is a `test_full_loop_*` of diffusers' tests/schedulers/test_scheduler_*.py: its scheduler
config, step count and start step, and the sum and mean of |sample| it asserts, with the tolerance it
asserts them to. Those numbers are diffusers' published expected values (copied as data from the named test;
they are not recomputed here), and the loop reproduces theirs:

- the sample is `SchedulerCommonTest.dummy_sample_deter` (tests/schedulers/test_schedulers.py): arange(N)
  reshaped to (C, H, W, B), divided by N and moved to (B, C, H, W); the img2img cases add
  `dummy_noise_deter` (the same of arange(N) reversed) with the scheduler's `add_noise` at the timestep of
  step `t_start` and run the remaining calls;
- the model is `SchedulerCommonTest.dummy_model`, `sample * t / (t + 1)` with t the call's timestep. It is
  elementwise, so the sums and means do not depend on the layout and the samples keep diffusers' NCHW shape
  (4, 3, 8, 8) (UniPC's 1-D class: (4, 3, 8));
- the k-diffusion tests (LMS, Euler, Euler a, Heun, DPM2, DPM2 a) start from the sample times
  `init_noise_sigma` and overwrite the sample with `scale_model_input(sample, t)` before the step, so that
  `step` is given the scaled sample (a convention of these tests, not of a pipeline): `scaled_step` below;
- the stochastic ones draw their noise from `torch.manual_seed(0)` in `step` (one draw of the sample's
  shape per noise-consuming call: DDPM at t > 0, Euler a at every call, DPM2 a at a step's second call, LCM
  at every call but the last). The same draws, made with torch's generator here, are given to sdjax's
  `step`, so these cases are comparable too (they need torch, else they are skipped).

sdjax computes in float32. The diffusers tests run on torch's CPU (`torch_device == "cpu"` branches).
PNDM's cases leave `skip_prk_steps` at its default False, so they run the PRK warm-up. Full-loop tests
whose loop has no sdjax counterpart are in
NOT_COMPARABLE with the reason. Tests without expected numbers (NaN checks, custom timesteps equal to the
default ones, fp16 dtypes, save/load round trips) are not full-loop cases and are left out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax import schedulers

SHAPE = (4, 3, 8, 8)  # diffusers' dummy sample, NCHW
SHAPE_1D = (4, 3, 8)  # UniPCMultistepScheduler1DTest's

# get_scheduler_config() of each diffusers test class (tests/schedulers/<file>)
DDIM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
}
DDPM_CONFIG = {**DDIM_CONFIG, "variance_type": "fixed_small"}
PNDM_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
K_CONFIG = {"num_train_timesteps": 1100, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
DPM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": False,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "final_sigmas_type": "sigma_min",
}
UNIPC_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "solver_type": "bh2",
    "final_sigmas_type": "sigma_min",
}
LCM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.0120,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One diffusers full-loop test: what it runs and what it asserts (sum None: it asserts the mean only)."""

    source: str  # tests/schedulers/<source>
    test: str  # Class::test_name
    cls: str  # diffusers scheduler class
    config: dict[str, Any]
    steps: int  # num_inference_steps (DDPM: its 1000 training steps, no set_timesteps)
    sum: float | None
    mean: float
    sum_tol: float = 1e-2
    mean_tol: float = 1e-3
    t_start: int | None = None  # img2img: add_noise at timesteps[t_start * order], run from there
    init_sigma: bool = False  # sample = dummy_sample_deter * init_noise_sigma
    scaled_step: bool = False  # sample = scale_model_input(sample, t) before the model and the step
    seeded: bool = False  # step draws noise from torch.manual_seed(0)
    shape: tuple[int, ...] = SHAPE
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # sdjax fields (step arguments there)

    @property
    def id(self) -> str:
        return f"{self.source.removeprefix('test_scheduler_').removesuffix('.py')}::{self.test}"


def _k(source, test, cls, config, sum_, mean, **kw):
    """A k-diffusion style case (LMS/Euler/Heun/DPM2 tests: init_noise_sigma and scale_model_input)."""
    return Case(source, test, cls, {**K_CONFIG, **config}, 10, sum_, mean, init_sigma=True, scaled_step=True, **kw)


# fmt: off
CASES = [
    # test_scheduler_ddim.py (DDIMSchedulerTest.full_loop: 10 steps, eta 0.0)
    Case("test_scheduler_ddim.py", "test_full_loop_no_noise", "DDIMScheduler", DDIM_CONFIG, 10, 172.0067, 0.223967),
    Case("test_scheduler_ddim.py", "test_full_loop_with_v_prediction", "DDIMScheduler",
         {**DDIM_CONFIG, "prediction_type": "v_prediction"}, 10, 52.5302, 0.0684),
    Case("test_scheduler_ddim.py", "test_full_loop_with_set_alpha_to_one", "DDIMScheduler",
         {**DDIM_CONFIG, "set_alpha_to_one": True, "beta_start": 0.01}, 10, 149.8295, 0.1951),
    Case("test_scheduler_ddim.py", "test_full_loop_with_no_set_alpha_to_one", "DDIMScheduler",
         {**DDIM_CONFIG, "set_alpha_to_one": False, "beta_start": 0.01}, 10, 149.0784, 0.1941),
    Case("test_scheduler_ddim.py", "test_full_loop_with_noise", "DDIMScheduler", DDIM_CONFIG, 10, 354.5418, 0.4616,
         t_start=8),
    # test_scheduler_ddpm.py (all 1000 training timesteps, variance noise from torch.manual_seed(0))
    Case("test_scheduler_ddpm.py", "test_full_loop_no_noise", "DDPMScheduler", DDPM_CONFIG, 1000, 258.9606, 0.3372,
         seeded=True),
    Case("test_scheduler_ddpm.py", "test_full_loop_with_v_prediction", "DDPMScheduler",
         {**DDPM_CONFIG, "prediction_type": "v_prediction"}, 1000, 202.0296, 0.2631, seeded=True),
    Case("test_scheduler_ddpm.py", "test_full_loop_with_noise", "DDPMScheduler", DDPM_CONFIG, 1000, 387.9466, 0.5051,
         t_start=998, seeded=True),
    # test_scheduler_lms.py
    _k("test_scheduler_lms.py", "test_full_loop_no_noise", "LMSDiscreteScheduler", {}, 1006.388, 1.31),
    _k("test_scheduler_lms.py", "test_full_loop_with_v_prediction", "LMSDiscreteScheduler",
       {"prediction_type": "v_prediction"}, 0.0017, 2.2676e-06),
    _k("test_scheduler_lms.py", "test_full_loop_device", "LMSDiscreteScheduler", {}, 1006.388, 1.31),
    _k("test_scheduler_lms.py", "test_full_loop_device_karras_sigmas", "LMSDiscreteScheduler",
       {"use_karras_sigmas": True}, 3812.9927, 4.9648, sum_tol=2e-2),
    _k("test_scheduler_lms.py", "test_full_loop_with_noise", "LMSDiscreteScheduler", {}, 27663.6895, 36.0204,
       t_start=8),
    # test_scheduler_euler.py (a generator is passed, but s_churn = 0 leaves its draws unused)
    _k("test_scheduler_euler.py", "test_full_loop_no_noise", "EulerDiscreteScheduler", {}, 10.0807, 0.0131),
    _k("test_scheduler_euler.py", "test_full_loop_with_v_prediction", "EulerDiscreteScheduler",
       {"prediction_type": "v_prediction"}, 0.0002, 2.2676e-06),
    _k("test_scheduler_euler.py", "test_full_loop_device", "EulerDiscreteScheduler", {}, 10.0807, 0.0131),
    _k("test_scheduler_euler.py", "test_full_loop_device_karras_sigmas", "EulerDiscreteScheduler",
       {"use_karras_sigmas": True}, 124.52299499511719, 0.16213932633399963),
    _k("test_scheduler_euler.py", "test_full_loop_with_noise", "EulerDiscreteScheduler", {}, 57062.9297, 74.3007,
       t_start=8),
    # test_scheduler_euler_ancestral.py (noise from torch.manual_seed(0) at every step)
    _k("test_scheduler_euler_ancestral.py", "test_full_loop_no_noise", "EulerAncestralDiscreteScheduler", {},
       152.3192, 0.1983, seeded=True),
    _k("test_scheduler_euler_ancestral.py", "test_full_loop_with_v_prediction", "EulerAncestralDiscreteScheduler",
       {"prediction_type": "v_prediction"}, 108.4439, 0.1412, seeded=True),
    _k("test_scheduler_euler_ancestral.py", "test_full_loop_device", "EulerAncestralDiscreteScheduler", {},
       152.3192, 0.1983, seeded=True),
    _k("test_scheduler_euler_ancestral.py", "test_full_loop_with_noise", "EulerAncestralDiscreteScheduler", {},
       56163.0508, 73.1290, t_start=8, seeded=True),
    # test_scheduler_heun.py (torch_device "cpu" branches)
    _k("test_scheduler_heun.py", "test_full_loop_no_noise", "HeunDiscreteScheduler", {}, 0.1233, 0.0002),
    _k("test_scheduler_heun.py", "test_full_loop_with_v_prediction", "HeunDiscreteScheduler",
       {"prediction_type": "v_prediction"}, 4.6934e-07, 6.1112e-10),
    _k("test_scheduler_heun.py", "test_full_loop_device", "HeunDiscreteScheduler", {}, 0.1233, 0.0002),
    _k("test_scheduler_heun.py", "test_full_loop_device_karras_sigmas", "HeunDiscreteScheduler",
       {"use_karras_sigmas": True}, 0.00015, 1.9869554535034695e-07, mean_tol=1e-2),
    _k("test_scheduler_heun.py", "test_full_loop_with_noise", "HeunDiscreteScheduler", {}, 75074.8906, 97.7538,
       t_start=8),
    # test_scheduler_kdpm2_discrete.py
    _k("test_scheduler_kdpm2_discrete.py", "test_full_loop_with_v_prediction", "KDPM2DiscreteScheduler",
       {"prediction_type": "v_prediction"}, 4.6934e-07, 6.1112e-10),
    _k("test_scheduler_kdpm2_discrete.py", "test_full_loop_no_noise", "KDPM2DiscreteScheduler", {}, 20.4125, 0.0266),
    _k("test_scheduler_kdpm2_discrete.py", "test_full_loop_device", "KDPM2DiscreteScheduler", {}, 20.4125, 0.0266),
    _k("test_scheduler_kdpm2_discrete.py", "test_full_loop_with_noise", "KDPM2DiscreteScheduler", {},
       70408.4062, 91.6776, t_start=8),
    # test_scheduler_kdpm2_ancestral.py (noise from torch.manual_seed(0) at each step's second call)
    _k("test_scheduler_kdpm2_ancestral.py", "test_full_loop_no_noise", "KDPM2AncestralDiscreteScheduler", {},
       13979.9433, 18.2030, mean_tol=5e-3, seeded=True),
    _k("test_scheduler_kdpm2_ancestral.py", "test_full_loop_with_v_prediction", "KDPM2AncestralDiscreteScheduler",
       {"prediction_type": "v_prediction"}, 331.8133, 0.4320, seeded=True),
    _k("test_scheduler_kdpm2_ancestral.py", "test_full_loop_device", "KDPM2AncestralDiscreteScheduler", {},
       13979.9433, 18.2030, sum_tol=1e-1, seeded=True),
    _k("test_scheduler_kdpm2_ancestral.py", "test_full_loop_with_noise", "KDPM2AncestralDiscreteScheduler", {},
       93087.3437, 121.2074, mean_tol=5e-3, t_start=8, seeded=True),
    # test_scheduler_dpm_multi.py (DPMSolverMultistepSchedulerTest.full_loop: 10 steps; mean only)
    Case("test_scheduler_dpm_multi.py", "test_full_loop_no_noise", "DPMSolverMultistepScheduler", DPM_CONFIG, 10,
         None, 0.3301),
    Case("test_scheduler_dpm_multi.py", "test_full_loop_with_noise", "DPMSolverMultistepScheduler", DPM_CONFIG, 10,
         318.4111, 0.4146, t_start=5),
    Case("test_scheduler_dpm_multi.py", "test_full_loop_no_noise_thres", "DPMSolverMultistepScheduler",
         {**DPM_CONFIG, "thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5}, 10,
         None, 1.1364),
    Case("test_scheduler_dpm_multi.py", "test_full_loop_with_v_prediction", "DPMSolverMultistepScheduler",
         {**DPM_CONFIG, "prediction_type": "v_prediction"}, 10, None, 0.2251),
    Case("test_scheduler_dpm_multi.py", "test_full_loop_with_karras_and_v_prediction", "DPMSolverMultistepScheduler",
         {**DPM_CONFIG, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 10, None, 0.2096),
    Case("test_scheduler_dpm_multi.py", "test_full_loop_with_lu_and_v_prediction", "DPMSolverMultistepScheduler",
         {**DPM_CONFIG, "prediction_type": "v_prediction", "use_lu_lambdas": True}, 10, None, 0.1554),
    # test_scheduler_unipc.py, UniPCMultistepSchedulerTest (10 steps)
    Case("test_scheduler_unipc.py", "test_full_loop_no_noise", "UniPCMultistepScheduler", UNIPC_CONFIG, 10,
         None, 0.2464),
    Case("test_scheduler_unipc.py", "test_full_loop_with_karras", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "use_karras_sigmas": True}, 10, None, 0.2925),
    Case("test_scheduler_unipc.py", "test_full_loop_with_v_prediction", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "prediction_type": "v_prediction"}, 10, None, 0.1014),
    Case("test_scheduler_unipc.py", "test_full_loop_with_karras_and_v_prediction", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 10, None, 0.1966),
    Case("test_scheduler_unipc.py", "test_full_loop_with_noise", "UniPCMultistepScheduler", UNIPC_CONFIG, 10,
         315.5757, 0.4109, t_start=8),
    # test_scheduler_unipc.py, UniPCMultistepScheduler1DTest (samples (4, 3, 8))
    Case("test_scheduler_unipc.py", "1D::test_full_loop_no_noise", "UniPCMultistepScheduler", UNIPC_CONFIG, 10,
         None, 0.2441, shape=SHAPE_1D),
    Case("test_scheduler_unipc.py", "1D::test_full_loop_with_karras", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "use_karras_sigmas": True}, 10, None, 0.2898, shape=SHAPE_1D),
    Case("test_scheduler_unipc.py", "1D::test_full_loop_with_v_prediction", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "prediction_type": "v_prediction"}, 10, None, 0.1014, shape=SHAPE_1D),
    Case("test_scheduler_unipc.py", "1D::test_full_loop_with_karras_and_v_prediction", "UniPCMultistepScheduler",
         {**UNIPC_CONFIG, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 10, None, 0.1944,
         shape=SHAPE_1D),
    Case("test_scheduler_unipc.py", "1D::test_full_loop_with_noise", "UniPCMultistepScheduler", UNIPC_CONFIG, 10,
         39.0870, 0.4072, t_start=8, shape=SHAPE_1D),
    # test_scheduler_pndm.py (skip_prk_steps left at diffusers' default False: 12 PRK warm-up calls, then PLMS)
    Case("test_scheduler_pndm.py", "test_full_loop_no_noise", "PNDMScheduler", PNDM_CONFIG, 10, 198.1318, 0.2580),
    Case("test_scheduler_pndm.py", "test_full_loop_with_v_prediction", "PNDMScheduler",
         {**PNDM_CONFIG, "prediction_type": "v_prediction"}, 10, 67.3986, 0.0878),
    Case("test_scheduler_pndm.py", "test_full_loop_with_set_alpha_to_one", "PNDMScheduler",
         {**PNDM_CONFIG, "set_alpha_to_one": True, "beta_start": 0.01}, 10, 230.0399, 0.2995),
    Case("test_scheduler_pndm.py", "test_full_loop_with_no_set_alpha_to_one", "PNDMScheduler",
         {**PNDM_CONFIG, "set_alpha_to_one": False, "beta_start": 0.01}, 10, 186.9482, 0.2434),
    # test_scheduler_lcm.py (LCMSchedulerTest.full_loop: noise from torch.manual_seed(0) at all calls but the last)
    Case("test_scheduler_lcm.py", "test_full_loop_onestep", "LCMScheduler", LCM_CONFIG, 1, 18.7097, 0.0244,
         sum_tol=1e-3, seeded=True),
    Case("test_scheduler_lcm.py", "test_full_loop_multistep", "LCMScheduler", LCM_CONFIG, 10, 197.7616, 0.2575,
         sum_tol=1e-3, seeded=True),
    # test_scheduler_tcd.py (TCDSchedulerTest.full_loop: eta 0.0, deterministic)
    Case("test_scheduler_tcd.py", "test_full_loop_onestep_deter", "TCDScheduler", LCM_CONFIG, 1, 29.8715, 0.0389,
         sum_tol=1e-3, overrides={"eta": 0.0}),
    Case("test_scheduler_tcd.py", "test_full_loop_multistep_deter", "TCDScheduler", LCM_CONFIG, 10, 181.2040, 0.2359,
         sum_tol=1e-3, overrides={"eta": 0.0}),
]

# Full-loop tests with expected numbers whose loop is not one sdjax runs, with the reason.
_SWITCH = ("its second half round-trips the config through DPMSolverSinglestepScheduler / DEISMultistepScheduler "
           "(classes sdjax does not have) and back; the first half is test_full_loop_no_noise, run above")
NOT_COMPARABLE = [
    ("test_scheduler_dpm_multi.py::test_switch", _SWITCH),
    ("test_scheduler_unipc.py::test_switch", _SWITCH),
    ("test_scheduler_unipc.py::1D::test_switch", _SWITCH),
]
# fmt: on


def dummy_sample_deter(shape: tuple[int, ...], reverse: bool = False) -> np.ndarray:
    """diffusers' dummy_sample_deter (reverse: dummy_noise_deter): arange(N) (reversed) laid out as
    (*shape[1:], batch), divided by N, batch moved first. float32, as torch's int / int division."""
    n = int(np.prod(shape))
    values = np.arange(n)[::-1] if reverse else np.arange(n)
    return np.moveaxis((values.reshape(*shape[1:], shape[0]) / n).astype(np.float32), -1, 0)


def dummy_model(sample, t):
    """diffusers' SchedulerCommonTest.dummy_model: sample * t / (t + 1) (t cast to the sample's dtype)."""
    t = t.astype(sample.dtype)
    return sample * t / (t + 1)


def draws_noise(case: Case, index: int, timestep: float, num_calls: int) -> bool:
    """Whether diffusers' `step` draws from the generator at this call (schedule position `index`)."""
    if not case.seeded:
        return False
    if case.cls == "DDPMScheduler":
        return timestep > 0
    if case.cls == "EulerAncestralDiscreteScheduler":
        return True
    if case.cls == "KDPM2AncestralDiscreteScheduler":
        return index % 2 == 1  # a step's second call
    if case.cls == "LCMScheduler":
        return index != num_calls - 1
    raise AssertionError(f"no draw rule for {case.cls}")


@functools.partial(jax.jit, static_argnames=("sched", "scaled_step"))
def _model_call(state, sample, noise, *, sched, scaled_step):
    model_input = sched.scale_model_input(state, sample)
    if scaled_step:
        sample = model_input
    model_output = dummy_model(model_input, state.timestep)
    return sched.step(state, model_output, sample, noise if sched.stochastic else None)


def build(case: Case):
    return schedulers.from_diffusers_config({"_class_name": case.cls, **case.config}, **case.overrides)


def run_sdjax(case: Case) -> np.ndarray:
    """The sample at the end of the case's loop, run with sdjax's scheduler (float32)."""
    sched = build(case)
    start = case.t_start or 0
    state = sched.init(case.steps, case.shape, max_steps=case.steps, start_step=start)
    sample = jnp.asarray(dummy_sample_deter(case.shape))
    if case.init_sigma:
        sample = sample * sched.init_noise_sigma(state)
    if case.t_start is not None:
        sample = sched.add_noise(state, sample, jnp.asarray(dummy_sample_deter(case.shape, reverse=True)))
    num_calls = sched.num_model_calls(case.steps)
    generator = None
    if case.seeded:
        torch = pytest.importorskip("torch")
        generator = torch.Generator().manual_seed(0)
    zeros = jnp.zeros(case.shape, jnp.float32)
    for index in range(start * sched.order, num_calls):
        noise = zeros
        if draws_noise(case, index, float(state.timestep), num_calls):
            noise = jnp.asarray(torch.randn(case.shape, generator=generator, dtype=torch.float32).numpy())
        sample, state = _model_call(state, sample, noise, sched=sched, scaled_step=case.scaled_step)
    return np.asarray(sample)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_full_loop_matches_diffusers_expected_values(case):
    sample = run_sdjax(case)
    assert sample.shape == case.shape and np.isfinite(sample).all()
    result_sum = float(np.sum(np.abs(sample), dtype=np.float64))
    result_mean = float(np.mean(np.abs(sample), dtype=np.float64))
    print(f"{case.id}: sum {result_sum:.6g} (diffusers {case.sum}), mean {result_mean:.6g} (diffusers {case.mean})")
    if case.sum is not None:
        assert abs(result_sum - case.sum) < case.sum_tol, f"sum {result_sum}, diffusers expects {case.sum}"
    assert abs(result_mean - case.mean) < case.mean_tol, f"mean {result_mean}, diffusers expects {case.mean}"


@pytest.mark.parametrize("name, reason", NOT_COMPARABLE, ids=[n for n, _ in NOT_COMPARABLE])
def test_not_comparable_cases(name, reason):
    pytest.skip(f"not comparable: {reason}")
