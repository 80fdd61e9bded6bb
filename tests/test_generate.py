"""End-to-end parity of `pipe.generate` with diffusers' Stable Diffusion pipelines on a tiny random model:
the one-level MICRO_UNET (what is checked here does not depend on the UNet's levels; the two-level TINY_UNET's
parity is tests/test_models.py's), the 8x TINY_VAE and the two-layer TINY_CLIP (clip skip needs two).

Same folder, prompts, negative prompts and initial noise on both sides; images must differ by at most 3 and
on average at most 0.25 per uint8 channel. The VAE's posterior std is made negligible (quant_conv bias
of the log-variance at -100, clamped to -30 -> std 3e-7), so that img2img/inpainting do not depend on
the two frameworks' different VAE sampling noise.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from reference import (
    MICRO_UNET,
    SD15,
    SD21,
    TINY_CLIP,
    TINY_VAE,
    build_text_encoder,
    build_unet,
    build_vae,
    nchw,
    save_folder,
)

import sdjax
from sdjax import schedulers

PROMPTS = ["a photo of an astronaut riding a horse", "a red apple on a wooden table"]
NEGATIVES = ["blurry", ""]
DETERMINISTIC = [
    "ddim",
    "pndm",
    "pndm_prk",
    "lms",
    "lms_karras",
    "euler",
    "heun",
    "dpm2",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
]

_DIFFUSERS_OPTIONS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "pndm_prk": ("PNDMScheduler", {"skip_prk_steps": False}),
    "lms": ("LMSDiscreteScheduler", {"use_karras_sigmas": False}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": False}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def diffusers_scheduler(name: str, config: dict):
    import diffusers

    cls_name, options = _DIFFUSERS_OPTIONS[name]
    return getattr(diffusers, cls_name).from_config(config, **options)


def _tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder / "tokenizer")


def _quiet_vae(vae):
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels :] = -100.0
    return vae


@pytest.fixture(scope="module")
def torch_models():
    return build_unet(MICRO_UNET), _quiet_vae(build_vae(TINY_VAE)), build_text_encoder(TINY_CLIP)


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model(request, torch_models, tmp_path_factory):
    """(folder, torch unet, vae, text encoder, sdjax pipeline) with an SD 1.5 (epsilon) or SD 2.1 (v) scheduler."""
    unet, vae, text = torch_models
    source = SD15 if request.param == "epsilon" else SD21
    folder = save_folder(tmp_path_factory.mktemp(request.param), unet, vae, text, scheduler_from=source)
    return folder, unet, vae, text, sdjax.load_pipeline(folder)


def noise_for(pipe, batch, seed=0, size=64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, size // 8, size // 8, 4)).astype(np.float32)


def to_uint8(images01):
    return (np.asarray(images01) * 255).round().astype(np.uint8)


def assert_close_images(ours, theirs):
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    assert ours.shape == theirs.shape
    print(f"uint8 difference from diffusers: max {diff.max()}, mean {diff.mean():.4f}")
    assert diff.max() <= 3 and diff.mean() <= 0.25, (diff.max(), diff.mean())


def diffusers_pipeline(pipeline_cls, folder, unet, vae, text, scheduler):
    """A diffusers SD pipeline over the torch models (no safety checker, no progress bar)."""
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=_tokenizer(folder),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipeline_cls, folder, unet, vae, text, scheduler, **kwargs):
    pipe = diffusers_pipeline(pipeline_cls, folder, unet, vae, text, scheduler)
    with torch.no_grad():
        return to_uint8(pipe(output_type="np", **kwargs).images)


# The pipeline's part of a scheduler (timesteps, input scaling, calls per step, the decode) for each kind of
# step in the default suite: one-call (DDIM, Euler), two-call (Heun) and multistep (DPM++ 2M), both
# prediction types; every scheduler's own arithmetic is held to diffusers' in tests/test_schedulers.py. Every
# scheduler with each prediction type runs in the `slow` set (make test-slow).
_TXT2IMG_DEFAULT = {"epsilon": ("ddim", "euler"), "v_prediction": ("heun", "dpmpp_2m")}
EPSILON = pytest.mark.parametrize("model", ["epsilon"], indirect=True)
V_PREDICTION = pytest.mark.parametrize("model", ["v_prediction"], indirect=True)


def _matrix(names_by_type, *more):
    """(prediction type, *values) cases, those not in `names_by_type` marked slow."""
    cases = []
    for prediction in ("epsilon", "v_prediction"):
        for values in more[0] if more else ():
            values = values if isinstance(values, tuple) else (values,)
            fast = values in names_by_type.get(prediction, ()) or values[0] in names_by_type.get(prediction, ())
            cases.append(pytest.param(prediction, *values, marks=() if fast else pytest.mark.slow))
    return cases


def diffusers_txt2img(folder, unet, vae, text, name, scheduler_config, noise, steps, guidance_scale=7.5):
    """diffusers' StableDiffusionPipeline images of PROMPTS and NEGATIVES from the NHWC `noise` latents."""
    from diffusers import StableDiffusionPipeline

    scheduler = diffusers_scheduler(name, scheduler_config)
    return run_diffusers(
        StableDiffusionPipeline,
        folder,
        unet,
        vae,
        text,
        scheduler,
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=nchw(noise),
    )


@pytest.mark.parametrize("model,name", _matrix(_TXT2IMG_DEFAULT, DETERMINISTIC), indirect=["model"])
def test_txt2img_matches_diffusers(model, name):
    folder, unet, vae, text, pipe = model
    noise = noise_for(pipe, 2)
    steps = 7
    ours = pipe.generate(PROMPTS, NEGATIVES, num_inference_steps=steps, scheduler=name, latents=noise)
    assert_close_images(ours, diffusers_txt2img(folder, unet, vae, text, name, pipe.scheduler_config, noise, steps))


# SD 1.5's own scheduler (PNDM, what most users draw with) in the default run; SD 2.1's (DDIM, drawn in the
# default run's img2img test) in the slow set.
@pytest.mark.parametrize("model", ["epsilon", pytest.param("v_prediction", marks=pytest.mark.slow)], indirect=True)
def test_model_scheduler_guidance_rescale_and_clip_skip(model, monkeypatch):
    """The model's own scheduler (PNDM / DDIM), guidance_rescale and clip_skip as diffusers."""
    from diffusers import StableDiffusionPipeline

    folder, unet, vae, text, pipe = model
    # diffusers' clip_skip reads text_encoder.text_model.final_layer_norm, a transformers 4 path; give it
    # the transformers 5 layer (not a submodule: torch would recurse on a module that contains itself).
    monkeypatch.setattr(text, "text_model", SimpleNamespace(final_layer_norm=text.final_layer_norm), raising=False)
    noise = noise_for(pipe, 2, seed=1)
    kwargs = dict(num_inference_steps=6, guidance_rescale=0.7, clip_skip=1)
    ours = pipe.generate(PROMPTS, NEGATIVES, latents=noise, **kwargs)
    scheduler = schedulers_from_config(pipe.scheduler_config)
    theirs = run_diffusers(
        StableDiffusionPipeline,
        folder,
        unet,
        vae,
        text,
        scheduler,
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        latents=nchw(noise),
        guidance_scale=7.5,
        **kwargs,
    )
    assert_close_images(ours, theirs)


def schedulers_from_config(config):
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def _init_image(size=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, size, dtype=np.float32)
    img = np.stack([base[None, :].repeat(size, 0), base[:, None].repeat(size, 1), np.full((size, size), 90.0)], -1)
    img = img + rng.normal(0, 20, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _mask(size=64):
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 8:40] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize(
    "model,name", _matrix({"epsilon": ("euler",), "v_prediction": ("ddim",)}, ["ddim", "euler"]), indirect=["model"]
)
def test_img2img_matches_diffusers(model, name, monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img
    from diffusers import StableDiffusionImg2ImgPipeline

    folder, unet, vae, text, pipe = model
    noise = noise_for(pipe, 1, seed=2)
    monkeypatch.setattr(img2img, "randn_tensor", lambda *a, **k: nchw(noise))
    image = _init_image()
    kwargs = dict(num_inference_steps=10, strength=0.6)
    ours = pipe.generate(PROMPTS[0], scheduler=name, image=image, latents=noise, **kwargs)
    theirs = run_diffusers(
        StableDiffusionImg2ImgPipeline,
        folder,
        unet,
        vae,
        text,
        diffusers_scheduler(name, pipe.scheduler_config),
        prompt=PROMPTS[0],
        image=image,
        guidance_scale=7.5,
        **kwargs,
    )
    assert_close_images(ours, theirs)


@pytest.fixture(scope="module")
def inpaint_model(torch_models, tmp_path_factory):
    _, vae, text = torch_models
    unet = build_unet({**MICRO_UNET, "in_channels": 9})
    folder = save_folder(tmp_path_factory.mktemp("inpaint"), unet, vae, text)
    return folder, unet, vae, text, sdjax.load_pipeline(folder)


@pytest.mark.parametrize(
    "model,channels,strength",
    _matrix({"epsilon": ((9, 1.0), (4, 0.7)), "v_prediction": ((9, 0.7),)}, [(9, 1.0), (9, 0.7), (4, 1.0), (4, 0.7)]),
    indirect=["model"],
)
def test_inpainting_matches_diffusers(model, inpaint_model, channels, strength, monkeypatch):
    """9-channel inpainting UNets, and latent blending for regular ones, as StableDiffusionInpaintPipeline."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint
    from diffusers import StableDiffusionInpaintPipeline

    folder, unet, vae, text, pipe = inpaint_model if channels == 9 else model
    noise = noise_for(pipe, 1, seed=3)
    monkeypatch.setattr(inpaint, "randn_tensor", lambda *a, **k: nchw(noise))
    image, mask = _init_image(seed=4), _mask()
    kwargs = dict(num_inference_steps=8, strength=strength)
    ours = pipe.generate(PROMPTS[1], scheduler="ddim", image=image, mask_image=mask, latents=noise, **kwargs)
    theirs = run_diffusers(
        StableDiffusionInpaintPipeline,
        folder,
        unet,
        vae,
        text,
        diffusers_scheduler("ddim", pipe.scheduler_config),
        prompt=PROMPTS[1],
        image=image,
        mask_image=mask,
        guidance_scale=7.5,
        **kwargs,
    )
    assert_close_images(ours, theirs)


@pytest.mark.fusion_emitters
@EPSILON
def test_image_depends_on_its_seed_only(model):
    """Image k of a call with seed s equals the single image of seed s + k (stochastic sampler included)."""
    _, _, _, _, pipe = model
    batch = pipe.generate("a red cube", num_images_per_prompt=4, seed=10, num_inference_steps=5, scheduler="euler_a")
    for k in (0, 3):
        single = pipe.generate("a red cube", seed=10 + k, num_inference_steps=5, scheduler="euler_a")
        np.testing.assert_array_equal(batch[k], single[0])
    assert not np.array_equal(batch[0], batch[1])


@EPSILON
def test_one_init_image_and_mask_per_prompt(model):
    """A list of init images (and masks) gives prompt k its own: each row equals that prompt drawn alone."""
    _, _, _, _, pipe = model
    prompts = ["a red cube", "a blue ball"]
    images = [_init_image(seed=1), _init_image(seed=2)]
    masks = [_mask(), Image.fromarray(255 - np.asarray(_mask()))]
    kwargs = dict(num_inference_steps=5, strength=0.7, scheduler="euler", seed=4)
    both = pipe.generate(prompts, image=images, mask_image=masks, num_images_per_prompt=2, **kwargs)
    for k in range(2):  # rows 2k, 2k + 1 have seeds 4 + 2k, 5 + 2k
        alone = pipe.generate(
            prompts[k], image=images[k], mask_image=masks[k], num_images_per_prompt=2, **{**kwargs, "seed": 4 + 2 * k}
        )
        np.testing.assert_array_equal(both[2 * k : 2 * k + 2], alone)
    # the init images as one (B, H, W, 3) array are the list (the program of `both`: two programs here, not three)
    stacked = np.stack([np.asarray(im) for im in images])
    again = pipe.generate(prompts, image=stacked, mask_image=masks, num_images_per_prompt=2, **kwargs)
    np.testing.assert_array_equal(again, both)
    with pytest.raises(ValueError, match="3 init images for 2 prompts"):
        pipe.generate(prompts, image=images + images[:1], **kwargs)
    with pytest.raises(ValueError, match="different sizes"):
        pipe.generate(prompts, image=[images[0], _init_image(size=32)], **kwargs)


@V_PREDICTION
def test_no_recompile_for_traced_inputs(model):
    """Prompts, negative prompts, seed, guidance, rescale, strength and steps below the maximum are traced."""
    from sdjax.generate import program

    run = program()

    _, _, _, _, pipe = model
    before = run._cache_size()
    pipe.generate("a cat", num_inference_steps=4, scheduler="dpmpp_2m", seed=1, guidance_scale=3.0)
    after_first = run._cache_size()
    pipe.generate("a dog on the moon", "ugly", num_inference_steps=9, scheduler="dpmpp_2m", seed=7, guidance_scale=9.0)
    pipe.generate("(a:1.2) bird", num_inference_steps=50, scheduler="dpmpp_2m", guidance_rescale=0.3)
    assert after_first == before + 1
    assert run._cache_size() == after_first


@V_PREDICTION
def test_prompt_changes_the_image(model):
    _, _, _, _, pipe = model
    a = pipe.generate("a red apple", num_inference_steps=4, seed=3)
    b = pipe.generate("a blue car", num_inference_steps=4, seed=3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=60), "multiples of 8"),
        (dict(scheduler="euler_x"), "unknown scheduler 'euler_x'; choose one of ddim"),
        (dict(strength=1.5, image=np.zeros((64, 64, 3), np.uint8)), "strength must be in [0, 1]"),
        (dict(image="/nonexistent.png"), "init image file /nonexistent.png does not exist"),
        (dict(mask_image=np.zeros((64, 64), np.uint8)), "mask_image needs an init image"),
        (
            dict(image=np.zeros((64, 64, 3), np.uint8), mask_image=np.zeros((32, 64), np.uint8)),
            "mask is 64x32 but the init image is 64x64",
        ),
        (dict(latents=np.zeros((1, 4, 8, 8), np.float32)), "latents must have shape (1, 8, 8, 4) (NHWC)"),
        (dict(scheduler="PNDM PRK"), "pndm_prk needs at least 4 steps (3 Runge-Kutta warm-up steps, then PLMS), got 2"),
    ],
)
@EPSILON
def test_bad_arguments(model, kwargs, message):
    _, _, _, _, pipe = model
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        pipe.generate("x", num_inference_steps=2, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@EPSILON
def test_pndm_prk_refuses_a_late_start(model):
    """PNDM's PRK warm-up needs the whole schedule: img2img below strength 1 is refused, strength 1 (the
    whole schedule from the noised image) is accepted."""
    from sdjax.request import prepare

    _, _, _, _, pipe = model
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"pndm_prk cannot start part-way \(img2img"):
        pipe.generate("x", scheduler="pndm_prk", num_inference_steps=5, image=image, strength=0.5)
    plan, _ = prepare(pipe, "x", scheduler="pndm_prk", num_inference_steps=4, image=image, strength=1.0)
    assert plan.mode == "img2img"


def test_scheduler_names_are_documented():
    readme = (SD15.parents[3] / "README.md").read_text()
    for name in schedulers.NAMES:
        assert f"`{name}`" in readme
    assert json.loads((SD21 / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


@EPSILON
def test_float16_vae_overflow_is_decoded_in_float32(model):
    """The SD VAE's known fp16 overflow, provoked by a huge decoder conv_in: the program re-decodes in fp32."""
    import jax
    import jax.numpy as jnp

    from sdjax.generate import _decode

    folder = model[0]
    pipe16 = sdjax.load_pipeline(folder, dtype="float16")
    params = jax.tree.map(lambda p: p, pipe16.params["vae"])
    conv_in = params["decoder"]["conv_in"]
    params["decoder"] = {**params["decoder"], "conv_in": {**conv_in, "kernel": conv_in["kernel"] * 2e4}}
    latents = noise_for(pipe16, 2, seed=5)
    sf = pipe16.vae.config.scaling_factor
    # jitted, each a program of its own (op by op, every layer's operations compiled one by one)
    raw16 = jax.jit(pipe16.vae.apply, static_argnames="method")(
        {"params": params}, (latents / sf).astype(jnp.float16), method="decode"
    )
    assert not np.isfinite(np.asarray(raw16, np.float32)).all()  # the overflow really happens in fp16

    decode = jax.jit(_decode, static_argnums=(0, 3))
    images, finite = decode(pipe16.vae, params, latents, sf)
    images = np.asarray(images)
    assert np.asarray(finite).all()  # the float32 re-decode is finite
    vae32 = pipe16.vae.clone(dtype=jnp.float32)
    params32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    expected = np.asarray(decode(vae32, params32, jnp.asarray(latents), sf)[0])
    np.testing.assert_array_equal(images, expected)
    assert images.std() > 5  # a real image, not a flat one


@EPSILON
def test_a_batch_is_decoded_one_image_at_a_time(model):
    """A group of several images is decoded image by image (diffusers' `enable_slicing`): the same pixels as
    decoding each alone, and only one image's activations in the program's temporary memory."""
    import jax

    from sdjax.generate import _decode

    pipe = model[4]
    sf = pipe.vae.config.scaling_factor
    decode = jax.jit(_decode, static_argnums=(0, 3))
    latents = noise_for(pipe, 4, seed=3, size=128)
    images, finite = decode(pipe.vae, pipe.params["vae"], latents, sf)
    alone = np.concatenate([np.asarray(decode(pipe.vae, pipe.params["vae"], z[None], sf)[0]) for z in latents])
    assert np.asarray(finite).all()
    assert np.abs(np.asarray(images).astype(int) - alone).max() <= 1

    def temporary_bytes(batch):
        z = jax.ShapeDtypeStruct((batch, *latents.shape[1:]), np.float32)
        compiled = decode.lower(pipe.vae, pipe.params["vae"], z, sf).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one, four = temporary_bytes(1), temporary_bytes(4)
    print(f"decode temporaries: one image {one / 2**20:.2f} MiB, four {four / 2**20:.2f} MiB")
    assert four < 2 * one


@EPSILON
def test_unmerged_loras_match_merged_and_do_not_recompile(model, tmp_path):
    """`loras=[(file, scale)]` applies adapters inside the program: the images of `load_lora` (merged), and
    no recompile for another scale or another LoRA file of the same shapes."""
    from reference import kohya_lora_file

    from sdjax.generate import program

    run = program()

    folder, unet, vae, text, pipe = model
    models = {"unet": unet, "vae": vae, "text_encoder": text}
    first = kohya_lora_file(tmp_path / "a.safetensors", models, seed=1)
    second = kohya_lora_file(tmp_path / "b.safetensors", models, seed=2)
    kwargs = dict(num_inference_steps=4, seed=3)
    merged = pipe.load_lora(first, 0.6).generate("a red apple", **kwargs)
    unmerged = pipe.generate("a red apple", loras=[(first, 0.6)], **kwargs)
    assert np.abs(merged.astype(int) - unmerged.astype(int)).max() <= 1
    assert np.abs(merged.astype(int) - pipe.generate("a red apple", **kwargs).astype(int)).mean() > 0.5
    compiled = run._cache_size()
    pipe.generate("a red apple", loras=[(second, {"unet": 0.3, "text_encoder": 1.0})], **kwargs)
    assert run._cache_size() == compiled


@EPSILON
def test_vae_tiling_matches_diffusers(model):
    """`decode_tiled` (and `vae_tiling=True`) as diffusers' tiled_decode: 8-latent tiles of this VAE, a
    20x28 latent grid with partial edge tiles."""
    from reference import nhwc, rel_l2

    from sdjax.nn.vae import decode_tiled

    _, _, vae, _, pipe = model
    z = np.random.default_rng(8).standard_normal((2, 20, 28, 4)).astype(np.float32)
    vae.enable_tiling()
    try:
        with torch.no_grad():
            theirs = nhwc(vae.decode(nchw(z)).sample)
    finally:
        vae.disable_tiling()
    with torch.no_grad():
        whole = nhwc(vae.decode(nchw(z)).sample)
    assert rel_l2(whole, theirs) > 1e-3  # tiling really changes the result (seams blended, not identical)
    ours = np.asarray(jax.jit(decode_tiled, static_argnums=0)(pipe.vae, pipe.params["vae"], z))
    assert rel_l2(ours, theirs) <= 1e-5
    images = pipe.generate("a red apple", num_inference_steps=2, height=160, width=224, vae_tiling=True)
    assert images.shape == (1, 160, 224, 3)


@EPSILON
def test_guidance_at_most_one_runs_the_conditional_half_alone(model):
    """guidance_scale <= 1 compiles a program without the unconditional half (no negative prompt encoded,
    a UNet batch of B, not 2B), as diffusers skips it; the images equal diffusers'."""
    from diffusers import StableDiffusionPipeline

    from sdjax.generate import modules, place_inputs, program
    from sdjax.request import prepare

    folder, unet, vae, text, pipe = model
    noise = noise_for(pipe, 1)
    options = dict(num_inference_steps=4, scheduler="euler", guidance_scale=1.0)
    ours = pipe.generate(PROMPTS[0], "ugly", latents=noise, **options)
    theirs = run_diffusers(
        StableDiffusionPipeline,
        folder,
        unet,
        vae,
        text,
        diffusers_scheduler("euler", pipe.scheduler_config),
        prompt=PROMPTS[0],
        negative_prompt="ugly",
        num_inference_steps=4,
        guidance_scale=1.0,
        latents=nchw(noise),
    )
    assert_close_images(ours, theirs)
    flops = {}
    for guidance in (1.0, 7.5):
        plan, inputs = prepare(pipe, PROMPTS[0], **{**options, "guidance_scale": guidance})
        assert plan.guided == (guidance > 1)
        lowered = program().lower(pipe.params, place_inputs(inputs, None), plan=plan, **modules(pipe))
        flops[guidance] = lowered.cost_analysis()["flops"]  # XLA's count of the program as lowered (no compile)
    print(f"program FLOPs (loop body once): guidance 1 {flops[1.0]:.3g}, guidance 7.5 {flops[7.5]:.3g}")
    assert flops[1.0] < 0.7 * flops[7.5]


@pytest.mark.slow  # LCM's steps: test_schedulers.py; the per-image draws: test_image_depends_on_its_seed_only
@EPSILON
def test_lcm_matches_diffusers_given_the_same_draws(model, monkeypatch):
    """LCM (as with an LCM-LoRA: 4 steps, guidance 1) against StableDiffusionPipeline with LCMScheduler,
    diffusers' per-step noise replaced by sdjax's own draws (image b, call k: normal(fold_in(sampler key of
    seed_b, k))): the consistency steps are diffusers'; only the random numbers are sdjax's."""
    import diffusers.schedulers.scheduling_lcm as lcm
    import jax
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from sdjax.keys import seed_keys, split_rows

    folder, unet, vae, text, pipe = model
    noise = noise_for(pipe, 2, seed=5)
    seed, steps = 3, 4
    ours = pipe.generate(
        PROMPTS, scheduler="LCM", guidance_scale=1.0, seed=seed, latents=noise, num_inference_steps=steps
    )
    sampler_keys = split_rows(seed_keys(jax.numpy.asarray([seed, seed + 1])), 3)[1]
    draws = iter(
        [
            np.stack(
                [np.asarray(jax.random.normal(jax.random.fold_in(k, call), noise.shape[1:])) for k in sampler_keys]
            )
            for call in range(steps - 1)  # every step but the last
        ]
    )
    monkeypatch.setattr(lcm, "randn_tensor", lambda shape, **kw: nchw(next(draws)).to(kw.get("dtype")))
    theirs = run_diffusers(
        StableDiffusionPipeline,
        folder,
        unet,
        vae,
        text,
        LCMScheduler.from_config(pipe.scheduler_config),
        prompt=PROMPTS,
        num_inference_steps=steps,
        guidance_scale=1.0,
        latents=nchw(noise),
    )
    assert next(draws, None) is None
    assert_close_images(ours, theirs)
    with pytest.raises(
        ValueError, match="LCM takes at most original_inference_steps=50 steps, got num_inference_steps=60"
    ):
        pipe.generate("a", scheduler="lcm", num_inference_steps=60)
