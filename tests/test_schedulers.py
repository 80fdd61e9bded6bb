"""Schedulers and the compiled sampling loop against diffusers' PyTorch schedulers.

Every scheduler name runs its whole trajectory inside one jitted `loop.sample` (compiled once per
scheduler config and reused for every step count), with a fixed smooth model function applied identically
on both sides, and every intermediate sample is compared with diffusers' (relative L2 error <= 1e-5). The
stochastic samplers are fed the same noise: diffusers' `randn_tensor` is replaced by the loop's draws.

The reference is diffusers' own code run in float64 arithmetic (its tables stay the float32 values it
builds; inside `step` its `torch.float32` casts are redirected to float64). diffusers in float32 is the
noisier side: up to ~3e-5 from that reference in ill-conditioned corners (one-step v-prediction, Heun's
corrector at sigma 0.03, Euler-ancestral's sigma_down), where sdjax stays under 5e-6.
"""

from __future__ import annotations

import functools
import json
import sys

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import SD15, SD21

from sdjax import schedulers
from sdjax.schedulers import brownian, loop

TOL = 1e-5
MAX_STEPS = 50
STEP_COUNTS = (1, 2, 10, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SHAPE = (1, 8, 8, 4)  # NHWC; diffusers sees (1, 4, 8, 8)
SD15_CONFIG = json.loads((SD15 / "scheduler" / "scheduler_config.json").read_text())  # PNDM, epsilon
SD21_CONFIG = json.loads((SD21 / "scheduler" / "scheduler_config.json").read_text())  # DDIM, v_prediction

# The table, kept apart from sdjax's own registry.
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm_prk": ("PNDMScheduler", {"skip_prk_steps": False}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm2_karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": False}),
    "dpm2_a_karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),  # eta 0.3: the default of its step, as sdjax's TCD
}
MAX_ERRORS: dict[str, float] = {}
# these differ from another name in their tables alone (compared in the default run): the Karras variants
# of DPM2, DPM++ 2M SDE (2M SDE Karras) and 3M SDE Karras (3M SDE); and DPM2 a shares DPM2's two-call step
# (its img2img trajectories and tables stay in the default run). Their whole trajectories run in the slow
# set
_SLOW_TRAJECTORIES = ("dpm2_karras", "dpm2_a", "dpm2_a_karras", "dpmpp_2m_sde", "dpmpp_3m_sde_karras")
# A spacing changes only the tables (every spacing's tables are compared in the default run), not the step's
# arithmetic: the default run follows each scheduler's trajectory in one spacing, the three taking turns down
# the table (so each spacing is followed by a third of the schedulers), and the slow set in all three.
TRAJECTORY_CASES = [
    pytest.param(name, spacing, marks=pytest.mark.slow)
    if name in _SLOW_TRAJECTORIES or spacing != SPACINGS[i % len(SPACINGS)]
    else (name, spacing)
    for i, name in enumerate(DIFFUSERS)
    for spacing in SPACINGS
]
# PNDM's PRK warm-up needs the whole schedule: sdjax refuses img2img with it (diffusers' step_prk would
# step from the schedule's first timestep whatever the start); and diffusers raises below 4 steps
IMG2IMG_NAMES = [
    pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TRAJECTORIES and n != "dpm2_a" else n
    for n in DIFFUSERS
    if n != "pndm_prk"
]
MIN_STEPS = {"pndm_prk": 4}
# DPM2 a's tables (diffusers' set_timesteps, float32) take sigma_down = sqrt(s'^2 - sigma_up^2), which cancels
# when s' << s: at 2 "linspace" steps (s = 14.6, s' = 0.029) the one-ulp difference between torch's float32
# sqrt on this CPU (0x1.dde182p-6) and the correctly rounded one (0x1.dde180p-6, sdjax's) of the smallest
# training sigma becomes 1.7% of sigma_down, 0.9% of the intermediate sigma, 0.01 timesteps, and 2.2e-5
# (epsilon) to 1.0e-3 (v-prediction, SD 2.1's schedule) of the trajectory. So for DPM2 a the intermediate
# sigmas are compared to 2%, the timesteps to 0.02, and those two trajectories to 2e-3; every other
# trajectory (every other step count and spacing) holds to TOL.
CANCELLATION = {("dpm2_a", "linspace", 2): 2e-3, ("dpm2_a_karras", "linspace", 2): 2e-3}
CANCELLING = ("dpm2_a", "dpm2_a_karras")


# A smooth function of sample and timestep, elementwise so layouts do not matter. The 0.25 offset keeps the
# fixed point of x = f(x) (where "sample"-prediction trajectories converge) away from 0; with it at 0, the
# last samples' norms vanish and relative errors measure nothing but that.
def model_jax(x, t, scale=1.0):
    return scale * (0.3 * jnp.tanh(x) + jnp.cos(t / 300) * x * 0.1 + 0.25)


def model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return 0.3 * torch.tanh(x) + torch.cos(t / 300) * x * 0.1 + 0.25


def nchw(x):
    return np.moveaxis(np.asarray(x), -1, -3)


def rel_l2(ours, ref) -> float:
    return float(np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref))


def diffusers_scheduler(name: str, config: dict, **overrides):
    """As a diffusers user swaps schedulers: load the model's own, then `Cls.from_config(own.config, ...)`."""
    own = getattr(diffusers, config["_class_name"]).from_config(config)
    cls_name, options = DIFFUSERS[name]
    return getattr(diffusers, cls_name).from_config(own.config, **options, **overrides)


class _Float64Torch:
    """`torch` as a diffusers scheduler module sees it during `step`: its float32 casts become float64."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def diffusers_trajectory(
    scheduler, num_steps, noise, step_noise, monkeypatch, *, init_latents=None, strength=None, step_kwargs=None
) -> np.ndarray:
    """float64 [calls, 1, 8, 8, 4]: diffusers' sample after each model call (a pipeline's loop, in float64).

    noise, step_noise[k], init_latents: NHWC float32 arrays (the same draws sdjax uses).
    """
    scheduler.set_timesteps(num_steps)
    for attr in (
        "sigmas",
        "sigmas_interpol",
        "sigmas_up",
        "sigmas_down",
        "alphas_cumprod",
        "final_alpha_cumprod",
        "one",
    ):
        if isinstance(getattr(scheduler, attr, None), torch.Tensor):
            setattr(scheduler, attr, getattr(scheduler, attr).double())
    as_torch = lambda a: torch.from_numpy(nchw(a).copy()).double()  # noqa: E731
    timesteps = scheduler.timesteps
    if init_latents is None:
        latents = as_torch(noise) * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        t_start = max(num_steps - min(int(num_steps * strength), num_steps), 0)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(as_torch(init_latents), as_torch(noise), timesteps[:1])
    module = sys.modules[type(scheduler).__module__]
    call = {"k": 0}
    out = []
    with monkeypatch.context() as patch:
        patch.setattr(module, "torch", _Float64Torch())
        patch.setattr(module, "randn_tensor", lambda *a, **k: as_torch(step_noise[call["k"]]), raising=False)
        if hasattr(module, "BrownianTreeNoiseSampler"):  # DPM++ SDE: call k's increment is step_noise[k]
            patch.setattr(
                module, "BrownianTreeNoiseSampler", lambda *a, **k: lambda s, s2: as_torch(step_noise[call["k"]])
            )
        for k, t in enumerate(timesteps):
            call["k"] = k
            output = model_torch(scheduler.scale_model_input(latents, t), t)
            kwargs = {"variance_noise": as_torch(step_noise[k])} if "DPMSolverMulti" in type(scheduler).__name__ else {}
            kwargs.update(step_kwargs or {})
            latents = scheduler.step(output, t, latents, **kwargs).prev_sample
            assert latents.dtype == torch.float64
            out.append(np.moveaxis(latents.numpy(), -3, -1))
    return np.stack(out)


@functools.cache
def compiled_loop(scheduler, img2img: bool = False):
    """The jitted loop for one scheduler, returning the trajectory; every other input is traced."""

    def run(noise, key, num_steps, scale, start_step, init_latents):
        return loop.sample(
            scheduler,
            model_jax,
            noise,
            key,
            num_steps,
            (scale,),
            max_steps=MAX_STEPS,
            start_step=start_step,
            init_latents=init_latents if img2img else None,
            return_trajectory=True,
        )

    return jax.jit(run)


def step_noises(key, calls: int) -> np.ndarray:
    """The loop's draws for stochastic schedulers: call k uses normal(fold_in(key, k))."""
    return np.stack([jax.random.normal(jax.random.fold_in(key, k), SHAPE) for k in range(calls)])


NOISE = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
INIT_LATENTS = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
KEY = jax.random.key(7)


def _base_config(prediction: str) -> dict:
    return SD21_CONFIG if prediction == "v_prediction" else SD15_CONFIG


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    yield
    for name, err in MAX_ERRORS.items():
        print(f"max relative L2 error {name:22s} {err:.1e}")


def _diffusers_rejects(name, prediction, spacing) -> bool:
    """Whether diffusers itself refuses this prediction type for this scheduler (at its first step)."""
    sched = diffusers_scheduler(name, _base_config(prediction), prediction_type=prediction, timestep_spacing=spacing)
    sched.set_timesteps(max(2, MIN_STEPS.get(name, 1)))
    x = torch.zeros(1, 4, 8, 8)
    t = sched.timesteps[0]
    try:
        sched.step(x, t, sched.scale_model_input(x, t))
    except (ValueError, NotImplementedError):
        return True
    return False


@pytest.mark.parametrize("name, spacing", TRAJECTORY_CASES)
def test_trajectory_matches_diffusers(name, spacing, monkeypatch):
    for prediction in PREDICTIONS:
        config = _base_config(prediction)
        if _diffusers_rejects(name, prediction, spacing):
            with pytest.raises(ValueError, match=f"prediction_type '{prediction}' is not supported"):
                schedulers.from_name(name, config, timestep_spacing=spacing, prediction_type=prediction)
            continue
        ours = schedulers.from_name(name, config, timestep_spacing=spacing, prediction_type=prediction)
        run = compiled_loop(ours)
        for num_steps in (*STEP_COUNTS, 4):
            if num_steps < MIN_STEPS.get(name, 1) or (num_steps == 4 and name not in MIN_STEPS):
                continue
            calls = ours.num_model_calls(num_steps)
            _, trajectory = run(NOISE, KEY, num_steps, 1.0, 0, None)
            ref_sched = diffusers_scheduler(name, config, timestep_spacing=spacing, prediction_type=prediction)
            ref = diffusers_trajectory(ref_sched, num_steps, NOISE, step_noises(KEY, calls), monkeypatch)
            assert len(ref) == calls  # as many model calls as diffusers (Heun 2n - 1, PNDM n + 1)
            trajectory = np.asarray(trajectory)
            assert not trajectory[calls:].any()
            errors = [rel_l2(trajectory[k], ref[k]) for k in range(calls)]
            tolerance = CANCELLATION.get((name, spacing, num_steps), TOL)
            if tolerance == TOL:
                MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), *errors)
            assert max(errors) <= tolerance, (prediction, num_steps, int(np.argmax(errors)), max(errors))
        assert run._cache_size() == 1  # one program for every step count


@pytest.mark.parametrize("name", IMG2IMG_NAMES)
def test_img2img_matches_diffusers(name, monkeypatch):
    ours = schedulers.from_name(name, SD15_CONFIG)
    run = compiled_loop(ours, img2img=True)
    for num_steps, strength in ((10, 0.75), (25, 0.3), (3, 0.5)):
        start = loop.img2img_start_step(num_steps, strength)
        calls = ours.num_model_calls(num_steps) - start * ours.order
        _, trajectory = run(NOISE, KEY, num_steps, 1.0, start, INIT_LATENTS)
        ref = diffusers_trajectory(
            diffusers_scheduler(name, SD15_CONFIG),
            num_steps,
            NOISE,
            step_noises(KEY, calls),
            monkeypatch,
            init_latents=INIT_LATENTS,
            strength=strength,
        )
        assert len(ref) == calls
        errors = [rel_l2(trajectory[k], ref[k]) for k in range(calls)]
        assert max(errors) <= TOL, (num_steps, strength, max(errors))
    assert run._cache_size() == 1


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_tables_match_diffusers_for_every_step_count(name):
    """Timesteps (what the model sees) and sigmas, for every count up to the maximum and every spacing; the
    count traced (as the pipeline's program takes it), so one compiled `init` serves every count."""
    for spacing in SPACINGS:
        ours = schedulers.from_name(name, SD15_CONFIG, timestep_spacing=spacing)
        ref = diffusers_scheduler(name, SD15_CONFIG, timestep_spacing=spacing)
        init = jax.jit(lambda n, ours=ours: ours.init(n, SHAPE, max_steps=MAX_STEPS))
        for num_steps in range(MIN_STEPS.get(name, 1), MAX_STEPS + 1):
            ref.set_timesteps(num_steps)
            state = jax.device_get(init(np.int32(num_steps)))  # numpy: slicing compiles nothing
            calls = int(state.num_calls)
            assert calls == len(ref.timesteps) == ours.num_model_calls(num_steps)
            atol = 0.02 if name in CANCELLING else 1e-3
            np.testing.assert_allclose(state.timesteps[:calls], ref.timesteps.numpy(), rtol=0, atol=atol)
            if "sigmas" in state.tables and hasattr(ref, "sigmas"):
                sigmas = np.asarray(state.tables["sigmas"][: len(ref.sigmas)])
                np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=2e-6)
                for key in ("sigmas_interpol", "sigmas_up", "sigmas_down"):
                    if key in state.tables:
                        theirs = np.nan_to_num(getattr(ref, key).numpy())
                        rtol = 2e-2 if name in CANCELLING and key != "sigmas_up" else 1e-5
                        np.testing.assert_allclose(state.tables[key][: len(theirs)], theirs, rtol=rtol, atol=1e-7)
                assert float(ours.init_noise_sigma(state)) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_options_resolve_as_in_diffusers(name):
    """Every option of ours equals diffusers' value after its own from_config resolution."""
    for config in (SD15_CONFIG, SD21_CONFIG):
        ours = schedulers.from_name(name, config)
        ref = diffusers_scheduler(name, config).config
        values = {**vars(ours.schedule), **{k: v for k, v in vars(ours).items() if k != "schedule"}}
        compared = [key for key in values if key in ref]
        assert len(compared) >= 9
        for key in compared:
            expected = tuple(ref[key]) if isinstance(ref[key], list) else ref[key]
            assert values[key] == expected, key


def test_models_own_scheduler():
    assert schedulers.from_diffusers_config(SD15_CONFIG) == schedulers.from_name("pndm", SD15_CONFIG)
    own = schedulers.from_diffusers_config(SD21_CONFIG)
    assert isinstance(own, schedulers.DDIM) and own.schedule.prediction_type == "v_prediction"
    euler = {**SD15_CONFIG, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}
    assert schedulers.from_diffusers_config(euler).use_karras_sigmas  # kept: the model's own option
    assert not schedulers.from_name("lms", {**euler, "_class_name": "LMSDiscreteScheduler"}).use_karras_sigmas
    unipc = {**SD15_CONFIG, "_class_name": "UniPCMultistepScheduler", "solver_order": 3, "disable_corrector": [0]}
    assert schedulers.from_diffusers_config(unipc).disable_corrector == (0,)
    dpm2 = {**SD15_CONFIG, "_class_name": "KDPM2DiscreteScheduler", "use_karras_sigmas": True}
    assert schedulers.from_diffusers_config(dpm2) == schedulers.from_name("dpm2_karras", SD15_CONFIG)
    with pytest.raises(ValueError, match="scheduler class 'DEISMultistepScheduler' is not supported"):
        schedulers.from_diffusers_config({**SD15_CONFIG, "_class_name": "DEISMultistepScheduler"})


def test_training_add_noise_matches_diffusers():
    ref = diffusers.DDPMScheduler.from_config(SD15_CONFIG)
    timesteps = np.array([0, 1, 500, 999])
    x0 = np.random.default_rng(2).standard_normal((4, 8, 8, 4)).astype(np.float32)
    noise = np.random.default_rng(3).standard_normal((4, 8, 8, 4)).astype(np.float32)
    ours = schedulers.add_noise(schedulers.from_name("ddpm", SD15_CONFIG).schedule, x0, noise, timesteps)
    theirs = ref.add_noise(torch.from_numpy(nchw(x0)), torch.from_numpy(nchw(noise)), torch.from_numpy(timesteps))
    assert rel_l2(ours, np.moveaxis(theirs.numpy(), 1, -1)) <= 1e-6


@pytest.mark.parametrize("name", ["dpmpp_2m_sde_karras", "heun"])
def test_loop_never_recompiles_for_steps_guidance_seed_prompt(name):
    """Step count (below the maximum), guidance scale, seed and prompt embedding change; the program does not."""
    sched = schedulers.from_name(name, SD15_CONFIG)

    def guided(x, t, context, scale):  # classifier-free guidance shape: two predictions, blended
        uncond, cond = model_jax(x, t), model_jax(x + context, t)
        return uncond + scale * (cond - uncond)

    def generate(noise, key, num_steps, context, scale):
        return loop.sample(sched, guided, noise, key, num_steps, (context, scale), max_steps=MAX_STEPS)

    run = jax.jit(generate)
    prompts = [jnp.asarray(np.random.default_rng(seed).standard_normal(SHAPE), jnp.float32) for seed in (4, 5)]
    settings = [  # (seed, steps, prompt, guidance): the first, then one change at a time
        (0, 20, 0, 7.5),
        (1, 20, 0, 7.5),
        (0, 7, 0, 7.5),
        (0, 20, 0, 3.0),
        (0, 20, 1, 7.5),
        (2, 49, 1, 1.0),
    ]
    calls = [
        (jnp.asarray(NOISE), jax.random.key(seed), jnp.int32(steps), prompts[p], jnp.float32(g))
        for seed, steps, p, g in settings
    ]
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event)  # noqa: E731
    outputs = [np.asarray(run(*calls[0]))]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outputs += [np.asarray(run(*args)) for args in calls[1:]]
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [e for e in compiles if e == "/jax/core/compile/backend_compile_duration"] == []
    assert run._cache_size() == 1
    # and each input does change the result (the seed only matters to the stochastic sampler)
    changed = [rel_l2(out, outputs[0]) > 1e-3 for out in outputs[1:]]
    assert changed == [sched.stochastic, True, True, True, True]


def test_loop_options_keys_init_sample_post_step_on_call():
    sched = schedulers.from_name("euler_a", SD15_CONFIG)
    noise = np.random.default_rng(5).standard_normal((2, 8, 8, 4)).astype(np.float32)
    keys = jax.vmap(jax.random.key)(jnp.array([3, 9]))
    both = loop.sample(sched, model_jax, noise, keys, 10, max_steps=MAX_STEPS)
    alone = loop.sample(sched, model_jax, noise[1:], keys[1:], 10, max_steps=MAX_STEPS)
    np.testing.assert_allclose(both[1:], alone, rtol=1e-6, atol=1e-6)  # image 1 depends on its own key only
    state = sched.init(10, noise.shape, max_steps=MAX_STEPS)
    given = loop.sample(
        sched, model_jax, noise, keys, 10, max_steps=MAX_STEPS, init_sample=noise * sched.init_noise_sigma(state)
    )
    np.testing.assert_allclose(given, both, rtol=1e-6, atol=1e-6)
    progress, states = [], []
    hooked = loop.sample(
        schedulers.from_name("heun", SD15_CONFIG),
        model_jax,
        noise,
        keys,
        4,
        max_steps=MAX_STEPS,
        post_step=lambda x, state: states.append(state) or 0.5 * x,
        on_call=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(k, 7) for k in range(1, 8)]  # Heun: 2n - 1 model calls
    assert np.isfinite(hooked).all() and len(states) == 1  # post_step is traced once, inside the loop


def test_scheduler_arithmetic_is_float32_for_a_bfloat16_model():
    sched = schedulers.from_name("dpmpp_2m", SD21_CONFIG)
    seen = []

    def bf16_model(x, t):
        seen.append(x.dtype)
        return model_jax(x, t).astype(jnp.bfloat16)

    out32 = loop.sample(sched, model_jax, NOISE, KEY, 25, max_steps=MAX_STEPS)
    out16, trajectory = loop.sample(
        sched, bf16_model, NOISE, KEY, 25, max_steps=MAX_STEPS, model_dtype=jnp.bfloat16, return_trajectory=True
    )
    assert seen == [jnp.bfloat16] and trajectory.dtype == jnp.float32 and out16.dtype == jnp.float32
    assert rel_l2(out16, np.asarray(out32, np.float64)) < 2e-2


def test_clear_errors():
    with pytest.raises(ValueError, match="unknown scheduler 'k_euler'; choose one of ddim, pndm, pndm_prk, lms"):
        schedulers.from_name("k_euler", SD15_CONFIG)
    sched = schedulers.from_name("euler", SD15_CONFIG)
    with pytest.raises(ValueError, match="num_steps=51 is above max_steps=50"):
        sched.init(51, SHAPE, max_steps=50)
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        loop.sample(sched, model_jax, NOISE, KEY, 0, max_steps=50)
    for name, prediction in (("pndm", "sample"), ("euler_a", "sample"), ("ddim", "flow_prediction")):
        with pytest.raises(ValueError, match=f"prediction_type '{prediction}' is not supported"):
            schedulers.from_name(name, SD15_CONFIG, prediction_type=prediction)
    with pytest.raises(ValueError, match="euler: unknown scheduler option 'timestep_spaceing'"):
        schedulers.from_name("euler", {**SD15_CONFIG, "timestep_spaceing": "trailing"})
    with pytest.raises(ValueError, match="tcd: scheduler option thresholding=True is not supported"):
        schedulers.from_name("tcd", {**SD15_CONFIG, "thresholding": True})  # TCD's step ignores it in diffusers
    with pytest.raises(ValueError, match="pndm: rescale_betas_zero_snr=True is not supported by PNDMScheduler"):
        schedulers.from_name("pndm", {**SD15_CONFIG, "rescale_betas_zero_snr": True})
    prk = schedulers.from_diffusers_config({**SD15_CONFIG, "skip_prk_steps": False})
    assert prk == schedulers.from_name("pndm_prk", SD15_CONFIG) and not prk.skip_prk_steps
    with pytest.raises(ValueError, match="beta_schedule 'cosine' is not supported"):
        schedulers.from_name("ddim", {**SD15_CONFIG, "beta_schedule": "cosine"})
    with pytest.raises(ValueError, match="needs `noise`"):
        state = schedulers.from_name("ddpm", SD15_CONFIG).init(2, SHAPE, max_steps=2)
        schedulers.from_name("ddpm", SD15_CONFIG).step(state, jnp.zeros(SHAPE), jnp.zeros(SHAPE))
    # traced step counts cannot raise: out of range, the result is NaN rather than a silent wrong image
    run = jax.jit(lambda n: loop.sample(sched, model_jax, NOISE, KEY, n, max_steps=50))
    assert np.isnan(run(51)).all() and np.isnan(run(0)).all() and np.isfinite(run(50)).all()


def test_other_schedule_options_match_diffusers(monkeypatch):
    """Options the SD configs leave at their defaults: cosine/linear betas, zero-SNR rescaling, set_alpha_to_one,
    clip_sample, sigma_min final sigmas, solver orders 1 and 3, disabled corrector, DDIM eta."""
    cases = [
        ("ddim", {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": True, "clip_sample": True}, {}),
        (
            "euler",
            {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
            {},
        ),
        ("euler", {"beta_schedule": "linear", "final_sigmas_type": "sigma_min"}, {}),
        ("dpmpp_2m", {"solver_order": 3, "final_sigmas_type": "sigma_min"}, {}),
        ("dpmpp_3m_sde", {"final_sigmas_type": "sigma_min"}, {}),
        ("dpmpp_2m", {"use_lu_lambdas": True}, {}),
        # dynamic thresholding, its ratio and range set so that it clips here (each changes the trajectory
        # by over 90% against no thresholding)
        ("ddim", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.2}, {}),
        ("dpmpp_2m", {"thresholding": True, "dynamic_thresholding_ratio": 0.8, "sample_max_value": 3.0}, {}),
        ("ddpm", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, {}),
        ("lcm", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}, {}),
        ("dpmpp_2m_sde", {"use_lu_lambdas": True, "prediction_type": "v_prediction"}, {}),
        ("dpmpp_2m", {"solver_order": 1, "euler_at_final": True}, {}),
        ("unipc", {"solver_order": 3, "disable_corrector": [1, 2], "use_karras_sigmas": True}, {}),
        ("unipc", {"solver_type": "bh1", "predict_x0": False, "lower_order_final": False}, {}),
        ("heun", {"use_karras_sigmas": True, "clip_sample": True, "clip_sample_range": 2.0}, {}),
        ("ddpm", {"variance_type": "fixed_large", "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, {}),
        ("ddpm", {"variance_type": "fixed_small_log", "timestep_spacing": "trailing"}, {}),
        ("ddim", {"timestep_spacing": "trailing"}, {"eta": 0.7}),  # eta: a step argument in diffusers
    ]
    for name, options, step_kwargs in cases:
        config = {**SD15_CONFIG, **options}
        ours = schedulers.from_name(name, config, **step_kwargs)
        run = compiled_loop(ours)
        for num_steps in (4, 20):
            calls = ours.num_model_calls(num_steps)
            _, trajectory = run(NOISE, KEY, num_steps, 1.0, 0, None)
            noises = step_noises(KEY, calls)
            ref_sched = diffusers_scheduler(name, config)
            ref = diffusers_trajectory(ref_sched, num_steps, NOISE, noises, monkeypatch, step_kwargs=step_kwargs)
            errors = [rel_l2(trajectory[k], ref[k]) for k in range(calls)]
            assert max(errors) <= TOL, (name, options, num_steps, max(errors))


def test_img2img_start_step_traced_matches_python():
    pairs = [(n, s) for n in (1, 2, 7, 10, 25, 50) for s in (0.0, 0.1, 0.3, 0.5, 0.7, 0.75, 0.9, 1.0)]
    traced = jax.jit(jax.vmap(loop.img2img_start_step))(
        jnp.array([n for n, _ in pairs]), jnp.array([s for _, s in pairs], jnp.float32)
    )
    assert [int(t) for t in traced] == [loop.img2img_start_step(n, s) for n, s in pairs]


def test_a1111_sampler_names_resolve_and_are_written_back():
    """A1111's sampler names (any case, spaces or underscores) name the same schedulers as sdjax's names;
    `a1111_name` gives A1111's name back, also for a model's own scheduler config; others are refused."""
    from sdjax import schedulers

    for key, label in schedulers.A1111_NAMES.items():
        for spelling in (label, label.upper(), label.lower().replace(" ", "_"), key):
            assert schedulers.resolve_name(spelling) == key
        assert schedulers.a1111_name(schedulers.from_name(label, {})) == label
    own = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert schedulers.a1111_name(schedulers.from_diffusers_config(own)) == "DPM++ 2M Karras"
    plms = {"_class_name": "PNDMScheduler", "skip_prk_steps": True}
    assert schedulers.a1111_name(schedulers.from_diffusers_config(plms)) == "PLMS"
    assert schedulers.a1111_name(schedulers.from_diffusers_config({"_class_name": "PNDMScheduler"})) == "pndm_prk"
    third_order = {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}
    assert schedulers.a1111_name(schedulers.from_diffusers_config(third_order)) == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match=r"unknown scheduler 'DPM adaptive'; choose one of ddim.*'Euler a'"):
        schedulers.from_name("DPM adaptive", {})


SDE_CASES = [
    (karras, spacing, prediction)
    for karras in (False, True)
    for spacing in SPACINGS
    for prediction in ("epsilon", "v_prediction")
]


@functools.partial(jax.jit, static_argnums=0)
def call(scheduler, state, x, noise):
    """One model call of the loop, with the given noise."""
    return scheduler.step(state, model_jax(scheduler.scale_model_input(state, x), state.timestep), x, noise)


@pytest.mark.parametrize("karras,spacing,prediction", SDE_CASES)
def test_dpmpp_sde_steps_match_diffusers_given_the_same_increments(karras, spacing, prediction, monkeypatch):
    """DPM++ SDE's arithmetic against DPMSolverSDEScheduler, both given the same noise for each call (in
    place of torchsde's and sdjax's Brownian increments): trajectories <= TOL. Through the whole loop the
    noise is sdjax's Brownian path, whose increments are not torchsde's (see test_brownian_path)."""
    name = "dpmpp_sde_karras" if karras else "dpmpp_sde"
    config = _base_config(prediction)
    ours = schedulers.from_name(name, config, timestep_spacing=spacing, prediction_type=prediction)
    options = {"use_karras_sigmas": karras, "timestep_spacing": spacing, "prediction_type": prediction}
    own = getattr(diffusers, config["_class_name"]).from_config(config)
    for num_steps in (2, 10, 25):
        calls = ours.num_model_calls(num_steps)
        noises = step_noises(KEY, calls)
        state = ours.init(num_steps, SHAPE, max_steps=MAX_STEPS)
        x = jnp.asarray(NOISE) * ours.init_noise_sigma(state)
        trajectory = []
        for k in range(calls):
            x, state = call(ours, state, x, noises[k])
            trajectory.append(np.asarray(x))
        ref_sched = diffusers.DPMSolverSDEScheduler.from_config(own.config, **options)
        ref = diffusers_trajectory(ref_sched, num_steps, NOISE, noises, monkeypatch)
        assert len(ref) == calls == 2 * num_steps - 1
        errors = [rel_l2(trajectory[k], ref[k]) for k in range(calls)]
        MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), *errors)
        assert max(errors) <= TOL, (num_steps, int(np.argmax(errors)), max(errors))


def test_brownian_path():
    """sdjax's Brownian path (`schedulers.brownian`): a function of the key alone, so that increments add up
    over any subdivision (one path whatever the step count); increments are standard normal after
    normalisation and independent over disjoint intervals; paths of different keys differ; and DPM++ SDE
    through the loop is deterministic in its key."""
    increment = jax.jit(brownian.increment, static_argnums=(3, 4))
    sigma_max, shape = 14.6, (4096,)
    key = jax.random.key(11)
    a, b, c = 9.0, 3.5, 0.7
    whole = np.asarray(increment(key, a, c, sigma_max, shape)) * np.sqrt(a - c)
    parts = np.asarray(increment(key, a, b, sigma_max, shape)) * np.sqrt(a - b)
    parts += np.asarray(increment(key, b, c, sigma_max, shape)) * np.sqrt(b - c)
    np.testing.assert_allclose(whole, parts, atol=1e-4)
    first, second = (
        np.asarray(increment(key, a, b, sigma_max, shape)),
        np.asarray(increment(key, b, c, sigma_max, shape)),
    )
    for z in (first, second):
        assert abs(z.mean()) < 0.06 and abs(z.std() - 1) < 0.04
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.06
    small = np.asarray(increment(key, 0.05, 0.03, sigma_max, shape))  # a short interval near sigma_min
    assert abs(small.std() - 1) < 0.06
    other = np.asarray(increment(jax.random.key(12), a, b, sigma_max, shape))
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.06
    ours = schedulers.from_name("dpmpp_sde_karras", SD15_CONFIG)
    run = compiled_loop(ours)
    one, _ = run(NOISE, KEY, 10, 1.0, 0, None)
    two, _ = run(NOISE, KEY, 10, 1.0, 0, None)
    three, _ = run(NOISE, jax.random.key(8), 10, 1.0, 0, None)
    assert np.array_equal(one, two) and not np.allclose(one, three)
