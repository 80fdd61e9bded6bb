"""Samplers diffusers has no class for, against k-diffusion's own functions (the samplers A1111 runs).

DPM++ 2S a (`sample_dpmpp_2s_ancestral`): k-diffusion's function, run in float64 with A1111's model wrapper
(k-diffusion's DiscreteEpsDDPMDenoiser / DiscreteVDDPMDenoiser: the model sees x / sqrt(sigma^2 + 1) at the
fractional timestep of sigma) on the sigmas of sdjax's table and with sdjax's noise draws (its noise_sampler
returns the draw of the step's second call), gives the same sample after every step as sdjax's loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from test_generate import model, torch_models  # noqa: F401 (fixtures)
from test_schedulers import KEY, NOISE, PREDICTIONS, SPACINGS, _base_config, compiled_loop, model_torch, rel_l2

from sdjax import schedulers

TOL = 1e-5


def k_diffusion() -> types.ModuleType:
    """k-diffusion's `external` module (its `sampling` as `.sampling`), loaded without the package's
    __init__, which imports torchvision, kornia, wandb and more: its `utils` is replaced by the one helper
    these two modules call (append_dims), and torchdiffeq (used only by the adaptive ODE sampler) by a stub
    when it is missing. `make install-test` installs k-diffusion==0.1.1.post1 without its requirements."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise RuntimeError("k-diffusion is missing: pip install --no-deps k-diffusion==0.1.1.post1 (make install-test)")
    if "_k_diffusion" not in sys.modules:
        package = types.ModuleType("_k_diffusion")
        package.__path__ = [str(Path(spec.origin).parent)]
        utils = types.ModuleType("_k_diffusion.utils")
        utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
        sys.modules.update({"_k_diffusion": package, "_k_diffusion.utils": utils})
        if importlib.util.find_spec("torchdiffeq") is None:
            sys.modules["torchdiffeq"] = types.SimpleNamespace(odeint=None)
    return importlib.import_module("_k_diffusion.external")


class _Model(torch.nn.Module):
    """test_schedulers' model function on (scaled input, timestep), as the inner model of a k-diffusion
    denoiser."""

    def forward(self, x, t):
        return model_torch(x, t[0])


def reference_trajectory(sched, num_steps: int, prediction: str, draws: np.ndarray) -> np.ndarray:
    """float64 [n, 1, 8, 8, 4]: k-diffusion's sample_dpmpp_2s_ancestral after each step, on sdjax's sigmas;
    step j's fresh noise is draws[2j + 1] (the draw sdjax's loop makes at the step's second call)."""
    external = k_diffusion()
    alphas = torch.from_numpy(schedulers.alphas_cumprod(sched.schedule).astype(np.float64))
    wrapper = external.DiscreteEpsDDPMDenoiser if prediction == "epsilon" else external.DiscreteVDDPMDenoiser
    denoiser = wrapper(_Model(), alphas, quantize=False)
    levels = np.asarray(sched.tables(num_steps)["step_sigma"][::2], np.float64)
    sigmas = torch.from_numpy(np.concatenate([levels, [0.0]]))
    as_torch = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a, np.float64), -1, -3).copy())  # noqa: E731
    step = {"j": 0}
    out = []

    def noise_sampler(sigma, sigma_next):
        return as_torch(draws[2 * step["j"] + 1])

    # the initial sample as sdjax's loop makes it: diffusers' init_noise_sigma (sqrt(sigma_0^2 + 1) with
    # "leading" spacing, as its Euler a; k-diffusion itself starts at sigma_0)
    x = as_torch(NOISE) * float(sched.init_noise_sigma(sched.init(num_steps, NOISE.shape, max_steps=num_steps)))
    for j in range(num_steps):  # one step at a time, to record the sample after each
        step["j"] = j
        x = external.sampling.sample_dpmpp_2s_ancestral(
            denoiser, x, sigmas[j : j + 2], noise_sampler=noise_sampler, eta=sched.eta, disable=True
        )
        out.append(np.moveaxis(x.numpy(), -3, -1))
    return np.stack(out)


# Two of the six spacing x sigma cases in the default run (plain "leading", Karras "linspace"); every case in
# the slow set. Each compiles four loops; the spacings' tables are held to diffusers' for every scheduler in
# tests/test_schedulers.py.
_DEFAULT_CASES = {("leading", False), ("linspace", True)}


@pytest.mark.parametrize(
    ("spacing", "karras"),
    [
        pytest.param(s, k, id=f"{s}-{name}", marks=() if (s, k) in _DEFAULT_CASES else pytest.mark.slow)
        for s in SPACINGS
        for k, name in ((False, "dpmpp_2s_a"), (True, "dpmpp_2s_a_karras"))
    ],
)
def test_dpmpp_2s_a_matches_k_diffusion(spacing, karras):
    """Every step's sample within 1e-5 (relative L2) of k-diffusion's, for both prediction types, 1, 2, 10
    and 25 steps and eta 1 and 0.5, in one compiled program per scheduler."""
    worst = 0.0
    for prediction in PREDICTIONS[:2]:
        for eta in (1.0, 0.5):
            name = "dpmpp_2s_a_karras" if karras else "dpmpp_2s_a"
            sched = schedulers.from_name(
                name, _base_config(prediction), timestep_spacing=spacing, prediction_type=prediction, eta=eta
            )
            run = compiled_loop(sched)
            for num_steps in (1, 2, 10, 25):
                calls = sched.num_model_calls(num_steps)
                assert calls == 2 * num_steps - 1
                _, trajectory = run(NOISE, KEY, num_steps, 1.0, 0, None)
                draws = np.stack([jax.random.normal(jax.random.fold_in(KEY, k), NOISE.shape) for k in range(calls)])
                ref = reference_trajectory(sched, num_steps, prediction, draws)
                ends = [2 * j + 1 for j in range(num_steps - 1)] + [calls - 1]  # each step's last call
                ours = np.asarray(trajectory)[ends]
                errors = [rel_l2(ours[j], ref[j]) for j in range(num_steps)]
                worst = max(worst, *errors)
                assert max(errors) <= TOL, (prediction, eta, num_steps, int(np.argmax(errors)), max(errors))
            assert run._cache_size() == 1
    print(f"DPM++ 2S a ({spacing}, karras={karras}): worst relative L2 against k-diffusion {worst:.1e}")


@pytest.mark.parametrize("model", ["epsilon"], indirect=True)
def test_dpmpp_2s_a_images_match_k_diffusion_driving_the_torch_models(model):  # noqa: F811
    """A1111's path: k-diffusion's sample_dpmpp_2s_ancestral over the torch UNet (classifier-free guidance
    inside the model wrapper, as A1111's CFG denoiser), given sdjax's sigmas and noise draws (image b, call
    k: normal(fold_in(sampler key of seed_b, k)), one per step's second call), then the torch VAE: the
    images equal sdjax's within the pipelines' tolerance (uint8 max 3, mean 0.25)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from test_generate import NEGATIVES, PROMPTS, assert_close_images, diffusers_pipeline, nchw, noise_for, to_uint8

    from sdjax.keys import seed_keys, split_rows

    folder, unet, vae, text, pipe = model
    noise = noise_for(pipe, 2, seed=5)
    seed, steps, guidance = 3, 6, 7.5
    ours = pipe.generate(
        PROMPTS, NEGATIVES, scheduler="DPM++ 2S a", seed=seed, latents=noise, num_inference_steps=steps
    )

    sched = schedulers.from_name("dpmpp_2s_a", pipe.scheduler_config)
    calls = sched.num_model_calls(steps)
    sampler_keys = split_rows(seed_keys(jax.numpy.asarray([seed, seed + 1])), 3)[1]
    draws = []
    for c in range(calls):
        per_image = [jax.random.normal(jax.random.fold_in(k, c), noise.shape[1:]) for k in sampler_keys]
        draws.append(torch.from_numpy(np.moveaxis(np.stack(per_image), -1, 1)))
    reference = diffusers_pipeline(
        StableDiffusionPipeline,
        folder,
        unet,
        vae,
        text,
        EulerAncestralDiscreteScheduler.from_config(pipe.scheduler_config),
    )
    with torch.no_grad():
        cond, uncond = reference.encode_prompt(PROMPTS, "cpu", 1, True, NEGATIVES)

    class GuidedUNet(torch.nn.Module):
        def forward(self, x, t):
            eps = unet(torch.cat([x, x]), t.repeat(2), encoder_hidden_states=torch.cat([uncond, cond])).sample
            eps_uncond, eps_cond = eps.chunk(2)
            return eps_uncond + guidance * (eps_cond - eps_uncond)

    external = k_diffusion()
    alphas = torch.from_numpy(np.array(schedulers.alphas_cumprod(sched.schedule)))  # a writable copy
    denoiser = external.DiscreteEpsDDPMDenoiser(GuidedUNet(), alphas, quantize=False)
    levels = sched.tables(steps)["step_sigma"][::2]
    sigmas = torch.from_numpy(np.concatenate([levels, [0.0]]).astype(np.float32))
    init_sigma = float(sched.init_noise_sigma(sched.init(steps, noise.shape, max_steps=steps)))
    x = nchw(noise) * init_sigma
    with torch.no_grad():
        for j in range(steps):
            x = external.sampling.sample_dpmpp_2s_ancestral(
                denoiser, x, sigmas[j : j + 2], noise_sampler=lambda s, s2, j=j: draws[2 * j + 1], disable=True
            )
        decoded = vae.decode(x / vae.config.scaling_factor).sample
    theirs = to_uint8(np.moveaxis(((decoded / 2 + 0.5).clamp(0, 1)).numpy(), 1, -1))
    assert_close_images(ours, theirs)
