"""SDXL: parity of the models and of `pipe.generate` with diffusers' `StableDiffusionXLPipeline`.

A tiny random-weight SDXL (SDXL base's layout shrunk: `sdjax.testing.TINY_SDXL`) is built in PyTorch, saved as
a diffusers folder with SDXL base's tokenizers and scheduler, and loaded by `sdjax.load_pipeline`. Components
must agree to 1e-5 relative L2 (fp32); images to the end-to-end tolerance of tests/test_generate.py.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from reference import DATA, build_text_encoder, build_unet, build_vae, nchw, nhwc, randomize_, rel_l2
from test_generate import _quiet_vae, assert_close_images, diffusers_scheduler, noise_for, to_uint8

import sdjax
from sdjax import testing

SDXL = DATA / "stable-diffusion-xl-base-1.0"
REFINER = DATA / "stable-diffusion-xl-refiner-1.0"
PROMPTS = ["a photo of an astronaut riding a horse", "a red apple on a wooden table"]
NEGATIVES = ["blurry", ""]
TOL = 1e-5


def build_text_encoder_2(config: dict, seed: int = 3):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = {k: v for k, v in config.items() if k != "architectures"}
    return randomize_(CLIPTextModelWithProjection(CLIPTextConfig(**config)), seed)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def make_tiny_sdxl(folder):
    """(folder, torch models {unet, vae, text_encoder, text_encoder_2}, sdjax pipeline) of the tiny SDXL.
    Both reference text encoders pool at the largest token id (eos_token_id 2), as SDXL's own configs."""
    models = {
        "unet": build_unet(testing.TINY_SDXL_UNET),
        "vae": _quiet_vae(build_vae(testing.TINY_VAE)),
        "text_encoder": build_text_encoder(dict(testing.TINY_SDXL_CLIP, eos_token_id=2)),
        "text_encoder_2": build_text_encoder_2(dict(testing.TINY_SDXL_CLIP_2, eos_token_id=2)),
    }
    for name, model in models.items():
        model.save_pretrained(folder / name)
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(SDXL / name, folder / name)
    shutil.copy(SDXL / "model_index.json", folder / "model_index.json")
    return folder, models, sdjax.load_pipeline(folder)


def test_folder_is_recognised(sdxl):
    _, _, pipe = sdxl
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt and not pipe.requires_aesthetics_score
    assert pipe.text_encoder_2.config.projection_dim == 24
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407


def test_unet_with_time_ids_matches_diffusers(sdxl):
    _, models, pipe = sdxl
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([3.0, 981.0], np.float32)
    context = rng.standard_normal((2, 77, 48)).astype(np.float32)
    text_embeds = rng.standard_normal((2, 24)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 896]], np.float32)
    ours = jax.jit(pipe.unet.apply)(
        {"params": pipe.params["unet"]}, x, t, context, text_embeds_BD=text_embeds, time_ids_BN=time_ids
    )
    added = {"text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        theirs = models["unet"](nchw(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs=added)
    assert rel_l2(ours, nhwc(theirs.sample)) <= TOL


def test_projecting_text_encoder_matches_transformers(sdxl, tmp_path):
    from transformers import CLIPTextModelWithProjection

    _, models, pipe = sdxl
    ids = np.array([pipe.tokenizer_2(["a red apple", "an astronaut riding a horse on the moon"])][0])
    out = jax.jit(pipe.text_encoder_2.apply)({"params": pipe.params["text_encoder_2"]}, ids)
    with torch.no_grad():
        ref = models["text_encoder_2"](torch.from_numpy(ids), output_hidden_states=True)
    assert rel_l2(out.text_embeds, ref.text_embeds) <= TOL
    assert rel_l2(out.hidden_states[-2], ref.hidden_states[-2]) <= TOL
    out_dir = pipe.save_pretrained(tmp_path / "export")
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    again = CLIPTextModelWithProjection.from_pretrained(out_dir / "text_encoder_2").eval()
    with torch.no_grad():
        assert torch.equal(again(torch.from_numpy(ids)).text_embeds, ref.text_embeds)
    reloaded = sdjax.load_pipeline(out_dir)
    assert reloaded.is_sdxl and reloaded.text_encoder_2.config == pipe.text_encoder_2.config
    for ours, theirs in zip(jax.tree.leaves(reloaded.params), jax.tree.leaves(pipe.params), strict=True):
        assert np.array_equal(ours, theirs)


def diffusers_sdxl(folder, models, scheduler, pipeline_class=None):
    """A diffusers SDXL pipeline (default: StableDiffusionXLPipeline) over the torch models."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = (pipeline_class or StableDiffusionXLPipeline)(
        **models,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers_sdxl(folder, models, scheduler, pipeline_class=None, **kwargs):
    """uint8 images of a diffusers SDXL pipeline (default: StableDiffusionXLPipeline) over the torch models."""
    pipe = diffusers_sdxl(folder, models, scheduler, pipeline_class)
    with torch.no_grad():
        return to_uint8(pipe(output_type="np", **kwargs).images)


@pytest.mark.parametrize(
    "name",
    [
        "euler",
        pytest.param("dpmpp_2m_karras", marks=pytest.mark.slow),  # schedulers: test_generate, test_schedulers
        pytest.param("ddim", marks=pytest.mark.slow),
        pytest.param("unipc", marks=pytest.mark.slow),
    ],
)
def test_txt2img_matches_diffusers(sdxl, name):
    folder, models, pipe = sdxl
    noise = noise_for(pipe, 2)
    kwargs = dict(num_inference_steps=5, guidance_scale=5.0, height=64, width=64)
    ours = pipe.generate(PROMPTS, NEGATIVES, scheduler=name, latents=noise, **kwargs)
    theirs = run_diffusers_sdxl(
        folder,
        models,
        diffusers_scheduler(name, pipe.scheduler_config),
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        latents=nchw(noise),
        **kwargs,
    )
    assert_close_images(ours, theirs)


def test_second_prompts_micro_conditioning_and_zero_negatives(sdxl):
    """prompt_2, sizes and crops, guidance_rescale and clip_skip as diffusers; no negative prompt gives zero
    unconditional embeddings (force_zeros_for_empty_prompt). One prompt: with several, diffusers 0.42 pairs
    the negative time ids with the wrong rows (`cat([negative, positive]).repeat(batch)` against embeddings
    ordered [negatives..., positives...]); sdjax gives each row its own."""
    folder, models, pipe = sdxl
    noise = noise_for(pipe, 1, seed=1)
    kwargs = dict(
        prompt_2="a watercolour painting",
        original_size=(512, 768),
        crops_coords_top_left=(16, 32),
        target_size=(96, 64),
        negative_original_size=(256, 256),
        negative_target_size=(64, 64),
        num_inference_steps=4,
        guidance_scale=6.0,
        guidance_rescale=0.6,
        clip_skip=1,
        height=64,
        width=64,
    )
    ours = pipe.generate(PROMPTS[0], latents=noise, **kwargs)
    scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
    theirs = run_diffusers_sdxl(folder, models, scheduler, prompt=PROMPTS[0], latents=nchw(noise), **kwargs)
    assert_close_images(ours, theirs)
    with_negative = pipe.generate(PROMPTS[0], "", latents=noise, **kwargs)
    assert np.abs(with_negative.astype(int) - ours.astype(int)).max() > 3  # "" is encoded, None is zeros
    first_prompt_only = pipe.generate(PROMPTS[0], latents=noise, **{**kwargs, "prompt_2": None})
    assert np.abs(first_prompt_only.astype(int) - ours.astype(int)).max() > 3


def test_sdxl_options_refused_elsewhere():
    pipe = testing.random_pipeline("tiny")
    with pytest.raises(ValueError, match="original_size, prompt_2: SDXL options|prompt_2, original_size: SDXL"):
        pipe.generate("a cat", prompt_2="x", original_size=(64, 64), num_inference_steps=1)


def test_refiner_sized_ids_are_refused(sdxl):
    """Aesthetic-score ids (5) on a base UNet (6): one line naming both widths."""
    import dataclasses

    _, _, pipe = sdxl
    refiner_like = dataclasses.replace(pipe, requires_aesthetics_score=True)
    with pytest.raises(ValueError, match="5 time ids .* make 64 features, but the UNet's add_embedding takes 72"):
        refiner_like.generate("a cat", image=np.zeros((64, 64, 3), np.uint8), num_inference_steps=2)


def test_img2img_matches_diffusers(sdxl, monkeypatch):
    """StableDiffusionXLImg2ImgPipeline with the base model: the init image's latents noised to the step
    `strength` picks. (diffusers builds the img2img negative ids with crop (0, 0) even when the prompt's crop
    is not; the default crop is (0, 0) on both sides.)"""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from test_generate import _init_image

    folder, models, pipe = sdxl
    noise = noise_for(pipe, 1, seed=2)
    monkeypatch.setattr(img2img, "randn_tensor", lambda *a, **k: nchw(noise))
    image = _init_image()
    kwargs = dict(num_inference_steps=10, strength=0.6, guidance_scale=5.0, original_size=(128, 96))
    ours = pipe.generate(PROMPTS[0], NEGATIVES[0], scheduler="euler", image=image, latents=noise, **kwargs)
    scheduler = diffusers_scheduler("euler", pipe.scheduler_config)
    theirs = run_diffusers_sdxl(
        folder,
        models,
        scheduler,
        StableDiffusionXLImg2ImgPipeline,
        prompt=PROMPTS[0],
        negative_prompt=NEGATIVES[0],
        image=image,
        **kwargs,
    )
    assert_close_images(ours, theirs)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_diffusers(sdxl, strength, monkeypatch):
    """StableDiffusionXLInpaintPipeline with the (4-channel) base model: latents blended with the re-noised
    init image outside the mask after every step."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint
    from diffusers import StableDiffusionXLInpaintPipeline
    from test_generate import _init_image, _mask

    folder, models, pipe = sdxl
    noise = noise_for(pipe, 1, seed=3)
    monkeypatch.setattr(inpaint, "randn_tensor", lambda *a, **k: nchw(noise))
    image, mask = _init_image(seed=4), _mask()
    kwargs = dict(num_inference_steps=8, strength=strength, guidance_scale=5.0)
    ours = pipe.generate(PROMPTS[1], scheduler="ddim", image=image, mask_image=mask, latents=noise, **kwargs)
    theirs = run_diffusers_sdxl(
        folder,
        models,
        diffusers_scheduler("ddim", pipe.scheduler_config),
        StableDiffusionXLInpaintPipeline,
        prompt=PROMPTS[1],
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        **kwargs,
    )
    assert_close_images(ours, theirs)


@pytest.fixture(scope="module")
def refiner(sdxl, tmp_path_factory):
    """(folder, torch models, sdjax pipeline) of a tiny SDXL refiner: text_encoder_2 only (the base's),
    aesthetic-score micro-conditioning (refiner's model_index.json)."""
    _, base_models, _ = sdxl
    models = {
        "unet": build_unet(testing.TINY_SDXL_REFINER_UNET, seed=5),
        "vae": base_models["vae"],
        "text_encoder_2": base_models["text_encoder_2"],
    }
    folder = tmp_path_factory.mktemp("refiner")
    for name, model in models.items():
        model.save_pretrained(folder / name)
    for name in ("tokenizer_2", "scheduler"):
        shutil.copytree(REFINER / name, folder / name)
    shutil.copy(REFINER / "model_index.json", folder / "model_index.json")
    return folder, models, sdjax.load_pipeline(folder)


def test_refiner_matches_diffusers(refiner, monkeypatch):
    """A refiner (StableDiffusionXLImg2ImgPipeline, requires_aesthetics_score) on an init image; its one text
    encoder reads the prompt; aesthetic scores in the time ids; export keeps it a refiner."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from test_generate import _init_image
    from transformers import CLIPTokenizer

    folder, models, pipe = refiner
    assert pipe.text_encoder is None and pipe.requires_aesthetics_score and not pipe.force_zeros_for_empty_prompt
    noise = noise_for(pipe, 2, seed=6)
    monkeypatch.setattr(img2img, "randn_tensor", lambda *a, **k: nchw(noise))
    image = _init_image(seed=7)
    kwargs = dict(num_inference_steps=10, strength=0.3, guidance_scale=5.0, aesthetic_score=7.0)
    ours = pipe.generate(PROMPTS, NEGATIVES, scheduler="euler", image=image, latents=noise, **kwargs)
    theirs = StableDiffusionXLImg2ImgPipeline(
        **models,
        text_encoder=None,
        tokenizer=None,
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=diffusers_scheduler("euler", pipe.scheduler_config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = theirs(prompt=PROMPTS, negative_prompt=NEGATIVES, image=image, output_type="np", **kwargs)
    assert_close_images(ours, to_uint8(out.images))
    with pytest.raises(ValueError, match="SDXL refiner .* refines images: pass image="):
        pipe.generate("a cat", num_inference_steps=2)


def test_refiner_export_stays_a_refiner(refiner, tmp_path):
    _, _, pipe = refiner
    again = sdjax.load_pipeline(pipe.save_pretrained(tmp_path / "refiner"))
    assert again.text_encoder is None and again.tokenizer is None and again.requires_aesthetics_score
    for ours, theirs in zip(jax.tree.leaves(again.params), jax.tree.leaves(pipe.params), strict=True):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["euler", pytest.param("dpmpp_2m_karras", marks=pytest.mark.slow)])
def test_base_then_refiner_matches_diffusers(sdxl, refiner, name):
    """diffusers' ensemble of experts: the base stops at denoising_end=0.8 and returns latents
    (output_type="latent"); the refiner continues from them at denoising_start=0.8 (no noise added)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    base_folder, base_models, base = sdxl
    refiner_folder, refiner_models, refiner_pipe = refiner
    noise = noise_for(base, 2, seed=8)
    steps = dict(num_inference_steps=10, guidance_scale=5.0)
    latents = base.generate(PROMPTS, scheduler=name, latents=noise, denoising_end=0.8, output_type="latent", **steps)
    assert latents.shape == (2, 8, 8, 4) and latents.dtype == np.float32
    ours = refiner_pipe.generate(PROMPTS, scheduler=name, image=latents, denoising_start=0.8, **steps)

    tokenizer_2 = CLIPTokenizer.from_pretrained(base_folder / "tokenizer_2")
    torch_base = StableDiffusionXLPipeline(
        **base_models,
        tokenizer=CLIPTokenizer.from_pretrained(base_folder / "tokenizer"),
        tokenizer_2=tokenizer_2,
        scheduler=diffusers_scheduler(name, base.scheduler_config),
        add_watermarker=False,
    )
    torch_refiner = StableDiffusionXLImg2ImgPipeline(
        **refiner_models,
        text_encoder=None,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        scheduler=diffusers_scheduler(name, refiner_pipe.scheduler_config),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    for pipe in (torch_base, torch_refiner):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        handed = torch_base(
            prompt=PROMPTS, latents=nchw(noise), denoising_end=0.8, output_type="latent", **steps
        ).images
        assert rel_l2(latents, nhwc(handed)) <= 1e-4
        theirs = torch_refiner(prompt=PROMPTS, image=handed, denoising_start=0.8, output_type="np", **steps).images
    assert_close_images(ours, to_uint8(theirs))


def test_hand_over_options_are_checked(sdxl):
    _, _, pipe = sdxl
    with pytest.raises(ValueError, match="denoising_start continues from an init image"):
        pipe.generate("a cat", denoising_start=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="denoising_end must be a fraction strictly between 0 and 1"):
        pipe.generate("a cat", denoising_end=1.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="init latents are 8x8 .* but height x width is 128x128"):
        pipe.generate("a cat", image=np.zeros((1, 8, 8, 4), np.float32), height=128, width=128)


def test_textual_inversion_pairs_match_diffusers(sdxl, tmp_path):
    """An SDXL embedding file (clip_l for the first encoder, clip_g for the second, two vectors each) gives
    diffusers' image (diffusers loads each half into its encoder, as its SDXL docs show)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from sdjax.convert.tensor_files import save_safetensors

    folder, models, pipe = sdxl
    rng = np.random.default_rng(9)
    pair = {
        "clip_l": rng.standard_normal((2, 16)).astype(np.float32),
        "clip_g": rng.standard_normal((2, 32)).astype(np.float32),
    }
    path = tmp_path / "shiny.safetensors"
    save_safetensors(path, pair)
    styled = pipe.load_textual_inversion(path)
    assert styled.tokenizer_2.encode_plain("shiny") != pipe.tokenizer_2.encode_plain("shiny")
    prompt = "a shiny apple"
    noise = noise_for(pipe, 1, seed=10)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64)
    ours = styled.generate(prompt, latents=noise, scheduler="euler", **kwargs)

    import copy

    theirs_pipe = StableDiffusionXLPipeline(
        **{k: copy.deepcopy(v) for k, v in models.items()},
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=diffusers_scheduler("euler", pipe.scheduler_config),
        add_watermarker=False,
    )
    theirs_pipe.set_progress_bar_config(disable=True)
    for key, encoder, tokenizer in (
        ("clip_l", "text_encoder", "tokenizer"),
        ("clip_g", "text_encoder_2", "tokenizer_2"),
    ):
        theirs_pipe.load_textual_inversion(
            torch.from_numpy(pair[key]),
            token="shiny",
            text_encoder=getattr(theirs_pipe, encoder),
            tokenizer=getattr(theirs_pipe, tokenizer),
        )
    with torch.no_grad():
        theirs = theirs_pipe(prompt=prompt, latents=nchw(noise), output_type="np", **kwargs).images
    assert_close_images(ours, to_uint8(theirs))


def test_embeddings_of_the_other_family_are_refused(sdxl, tmp_path):
    from sdjax.convert.tensor_files import save_safetensors

    _, _, pipe = sdxl
    sd1 = tmp_path / "sd1.safetensors"
    save_safetensors(sd1, {"emb_params": np.ones((1, 16), np.float32)})
    with pytest.raises(ValueError, match="not an SDXL embedding .* does not fit SDXL"):
        pipe.load_textual_inversion(sd1)
    pair = tmp_path / "pair.safetensors"
    save_safetensors(pair, {"clip_l": np.ones((1, 32), np.float32), "clip_g": np.ones((1, 32), np.float32)})
    with pytest.raises(ValueError, match="SDXL embedding .* fits SDXL models only"):
        testing.random_pipeline("tiny").load_textual_inversion(pair)


def _sdxl_from_single_file_with_diffusers(path, models, refiner: bool):
    """State dicts of the torch models rebuilt by diffusers' own converters from our single file."""
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file

    checkpoint = load_file(path)
    out = {
        "unet": su.convert_ldm_unet_checkpoint(checkpoint, dict(models["unet"].config)),
        "vae": su.convert_ldm_vae_checkpoint(checkpoint, dict(models["vae"].config)),
    }
    bigG = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    text_2 = su.convert_open_clip_checkpoint(models["text_encoder_2"], checkpoint, prefix=bigG)
    out["text_encoder_2"] = {
        k.removeprefix("text_model.") if "projection" not in k else k: v for k, v in text_2.items()
    }
    if not refiner:
        text = su.convert_ldm_clip_checkpoint(checkpoint, remove_prefix="conditioner.embedders.0.transformer.")
        out["text_encoder"] = text
    return out


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_single_file_round_trip_and_diffusers_conversion(sdxl, refiner, which, tmp_path):
    """An SDXL model written as one A1111/ComfyUI-style file (`conditioner.embedders.*`, `label_emb`):
    diffusers' converters recover exactly the weights, sdjax detects and reloads it to identical parameters
    (the shipped SDXL configs), and it draws the same image."""
    from sdjax.convert import single_file as sf
    from sdjax.convert.tensor_files import SafetensorsFile

    _, models, pipe = sdxl if which == "base" else refiner
    path = pipe.save_single_file(tmp_path / f"sdxl-{which}.safetensors")
    assert sf.detect_model_type(SafetensorsFile(path)) == ("sdxl" if which == "base" else "sdxl-refiner")
    converted = _sdxl_from_single_file_with_diffusers(path, models, which == "refiner")
    for part, module in models.items():
        plain = lambda d: {k.removeprefix("text_model."): v for k, v in d.items() if not k.endswith("position_ids")}  # noqa: E731
        state, theirs = plain(module.state_dict()), plain(converted[part])
        assert set(theirs) == set(state), (part, sorted(set(theirs) ^ set(state))[:4])
        for key, value in state.items():
            assert torch.equal(theirs[key], value), (part, key)
    again = sdjax.load_pipeline(path, config=pipe.source)
    assert again.is_sdxl and (again.text_encoder is None) == (which == "refiner")
    for ours, theirs in zip(jax.tree.leaves(again.params), jax.tree.leaves(pipe.params), strict=True):
        assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("which", ["base", pytest.param("refiner", marks=pytest.mark.slow)])
def test_full_size_single_file_map_matches_diffusers(which):
    """The single-file map of the real SDXL base / refiner architectures (shipped configs), on shape-only
    tensors: diffusers' converters give the diffusers models' names and shapes, and the names released
    checkpoints use are there."""
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sdjax.convert import ldm_keys
    from sdjax.convert import single_file as sf
    from sdjax.convert.diffusers_folder import keymap_for
    from sdjax.nn.config_utils import read_json

    pipe = testing.abstract_pipeline("sdxl" if which == "base" else "sdxl-refiner")
    modules = {p: getattr(pipe, p) for p in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, p) is not None}
    layouts = {"unet": ("unet", None), **sf._text_layouts(modules, False, None)}
    checkpoint = {}
    for part, (layout, prefix) in layouts.items():
        keymap = keymap_for(None, modules[part])
        for e in sf.component_entries(modules[part], layout, keymap, prefix):
            checkpoint[e.ldm_key] = torch.empty(
                ldm_keys.ldm_shape(e, keymap[e.diffusers_keys[0]].torch_shape), device="meta"
            )
    bigG = "conditioner.embedders.1.model." if which == "base" else "conditioner.embedders.0.model."
    real = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816) if which == "base" else (1536, 2560),
        bigG + "text_projection": (1280, 1280),
        bigG + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    }
    if which == "base":
        real["model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight"] = (1280, 2048)
        real["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] = (768, 3072)
    for key, shape in real.items():
        assert tuple(checkpoint[key].shape) == shape, key
    folder = testing.DATA / testing.ARCHS["sdxl" if which == "base" else "sdxl-refiner"]
    clean = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    unet_cfg = clean(read_json(folder / "unet" / "config.json"))
    text_cfg = {
        k: v for k, v in clean(read_json(folder / "text_encoder_2" / "config.json")).items() if k != "architectures"
    }
    with torch.device("meta"):
        torch_unet = TorchUNet(**unet_cfg)
        torch_text = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}  # noqa: E731
    assert shapes(su.convert_ldm_unet_checkpoint(checkpoint, unet_cfg)) == shapes(torch_unet.state_dict())
    converted = su.convert_open_clip_checkpoint(torch_text, checkpoint, prefix=bigG)
    assert shapes(converted) == shapes(torch_text.state_dict())


def _kohya_sdxl_file(path, models, unet_config, seed: int):
    """A kohya SDXL LoRA as sd-scripts writes one: UNet modules by their original (SGM) names
    (lora_unet_input_blocks_4_1_..., label_emb), lora_te1_ / lora_te2_ for the text encoders, rank 4 (2 for
    3x3 convs), one alpha. (Per-module alphas: diffusers 0.42 gives SGM-named attention modules the alphas of
    other modules, e.g. input_blocks_3_1_..._attn1_to_q that of output_blocks_1_1_..._attn1_to_v; sdjax
    reads each module's own, tests/test_lora.py.)"""
    from reference import lora_targets

    from sdjax.convert import ldm_keys
    from sdjax.convert.tensor_files import save_safetensors

    rng = np.random.default_rng(seed)
    rules = ldm_keys.unet_rules(unet_config)
    tensors = {}
    for prefix, part in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        for name, shape in lora_targets(models[part]).items():
            if part == "unet":
                (entry,) = ldm_keys.build_entries(rules, [name + ".weight"], "")
                name = entry.ldm_key.removesuffix(".weight")
            rank = 2 if len(shape) == 4 and shape[2] == 3 else 4
            key = prefix + name.replace(".", "_")
            tensors[key + ".lora_down.weight"] = rng.standard_normal((rank,) + shape[1:], dtype=np.float32) / np.sqrt(
                np.prod(shape[1:])
            )
            up = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
            tensors[key + ".lora_up.weight"] = 0.2 * rng.standard_normal(up, dtype=np.float32)
            tensors[key + ".alpha"] = np.array(2.0, np.float16)  # sd-scripts' one network_alpha
    save_safetensors(path, tensors)
    return path


def test_kohya_lora_matches_diffusers(sdxl, tmp_path):
    """A kohya SDXL LoRA merged by sdjax and by diffusers (`load_lora_weights`, `fuse_lora`): the same UNet
    output (with time ids) and the same states of both text encoders."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    folder, models, pipe = sdxl
    path = _kohya_sdxl_file(tmp_path / "style.safetensors", models, pipe.unet.config, seed=11)
    assert any(
        k.startswith("lora_unet_input_blocks_") for k in __import__("safetensors.numpy").numpy.load_file(str(path))
    )
    merged = pipe.load_lora(path, scale=0.8)
    theirs_pipe = StableDiffusionXLPipeline(
        **{k: copy.deepcopy(v) for k, v in models.items()},
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        scheduler=diffusers_scheduler("euler", pipe.scheduler_config),
        add_watermarker=False,
    )
    theirs_pipe.load_lora_weights(str(path))
    theirs_pipe.fuse_lora(lora_scale=0.8)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([50.0, 700.0], np.float32)
    context = rng.standard_normal((2, 77, 48)).astype(np.float32)
    pooled = rng.standard_normal((2, 24)).astype(np.float32)
    time_ids = np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)
    ids = np.array(pipe.tokenizer_2(["a red apple", "a lion"]))
    unet = jax.jit(pipe.unet.apply)  # one compile for the merged and the base weights
    ours_unet = unet({"params": merged.params["unet"]}, x, t, context, text_embeds_BD=pooled, time_ids_BN=time_ids)
    added = {"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}
    with torch.no_grad():
        theirs_unet = nhwc(
            theirs_pipe.unet(nchw(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs=added).sample
        )
        theirs_text = [theirs_pipe.text_encoder(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]]
        theirs_text.append(
            theirs_pipe.text_encoder_2(torch.from_numpy(ids), output_hidden_states=True).hidden_states[-2]
        )
    base_unet = unet({"params": pipe.params["unet"]}, x, t, context, text_embeds_BD=pooled, time_ids_BN=time_ids)
    assert rel_l2(base_unet, theirs_unet) > 1e-2  # the LoRA changes the output
    assert rel_l2(ours_unet, theirs_unet) <= 1e-5
    for part, theirs in zip(("text_encoder", "text_encoder_2"), theirs_text, strict=True):
        ours = jax.jit(getattr(merged, part).apply)({"params": merged.params[part]}, ids).hidden_states[-2]
        assert rel_l2(ours, theirs) <= 1e-5, part


# Unmerged adapters go through the merge's own `sdjax.nn.lora.apply_adapters`, inside the program: the default
# run checks that program with an SD LoRA (tests/test_generate.py, tests/test_lora.py), the merge of all three
# SDXL parts above; this check compiles a whole-image program of its own (~25 s).
@pytest.mark.slow
def test_unmerged_kohya_lora_draws_the_merged_image(sdxl, tmp_path):
    """The kohya SDXL LoRA above applied inside the whole-image program (`loras=`) draws the merged image."""
    _, models, pipe = sdxl
    path = _kohya_sdxl_file(tmp_path / "style.safetensors", models, pipe.unet.config, seed=11)
    kwargs = dict(num_inference_steps=3, height=64, width=64, latents=noise_for(pipe, 1, seed=13))
    unmerged = pipe.generate("a lion", loras=[(path, 0.8)], **kwargs)
    assert_close_images(unmerged, pipe.load_lora(path, scale=0.8).generate("a lion", **kwargs))


def test_lora_of_the_other_family_is_refused(sdxl, tmp_path):
    _, models, pipe = sdxl
    path = _kohya_sdxl_file(tmp_path / "sdxl.safetensors", models, pipe.unet.config, seed=14)
    with pytest.raises(ValueError, match="has weights for text_encoder_2, which this model does not have"):
        testing.random_pipeline("tiny").load_lora(path)


def test_euler_ancestral_matches_diffusers_given_the_same_draws(sdxl, monkeypatch):
    """Euler a against diffusers, diffusers' per-step noise replaced by sdjax's own draws (image b, model
    call k: normal(fold_in(fold_in(key(seed_b), 1), k)), `sdjax.generate`'s sampler keys): the sampler's
    arithmetic is diffusers'; only the random numbers are sdjax's."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral

    from sdjax.keys import seed_keys, split_rows

    folder, models, pipe = sdxl
    noise = noise_for(pipe, 2, seed=15)
    seed, steps = 21, 6
    ours = pipe.generate(PROMPTS, NEGATIVES, scheduler="euler_a", seed=seed, latents=noise, num_inference_steps=steps)
    sampler_keys = split_rows(seed_keys(jax.numpy.asarray([seed, seed + 1])), 3)[1]
    draws = [
        np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, call), noise.shape[1:])) for k in sampler_keys])
        for call in range(steps)
    ]
    calls = iter(draws)
    monkeypatch.setattr(ancestral, "randn_tensor", lambda shape, **kw: nchw(next(calls)).to(kw.get("dtype")))
    theirs = run_diffusers_sdxl(
        folder,
        models,
        diffusers_scheduler("euler_a", pipe.scheduler_config),
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        latents=nchw(noise),
        num_inference_steps=steps,
        guidance_scale=5.0,
    )
    assert next(calls, None) is None  # one draw per step, as many as sdjax's
    assert_close_images(ours, theirs)


def test_sample_py_draws_sdxl_with_its_options(sdxl, tmp_path, capsys):
    """sample.py on an SDXL folder: the SDXL flags reach generate (the same image as the API), they are
    recorded in the PNG, and other models refuse them in one line."""
    from PIL import Image
    from test_sample import run_cli

    folder, _, pipe = sdxl
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, "a lion", "--model", folder, "--steps", "3", "--prompt-2", "oil painting, thick",
        "--original-size", "512x768", "--crop", "0x16", "--out", out, "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    with Image.open(out / "00000-0.png") as image:
        drawn, text = np.asarray(image.convert("RGB")), image.text["parameters"]
    assert 'Prompt 2: "oil painting, thick", Original size: 512x768, Crop top-left: 0x16' in text
    assert "CFG scale: 5," in text
    api = pipe.generate(
        "a lion", prompt_2="oil painting, thick", original_size=(512, 768), crops_coords_top_left=(0, 16),
        num_inference_steps=3, guidance_scale=5.0,
    )  # fmt: skip
    assert np.array_equal(drawn, api[0])
    code, err = run_cli(capsys, "a cat", "--prompt-2", "x", "--steps", "1", "--out", tmp_path / "demo")
    assert code == 2 and "prompt_2: SDXL options, but this model is not an SDXL model" in err
