"""ControlNet against diffusers' ControlNetModel on the same random weights: every down-block residual and the
mid residual (plain, scaled, guess mode, BGR order, pooled), the UNet with those residuals added, and the
export back to a diffusers folder. Tiny architectures by default; the real SD 1.5 / SD 2.1 ControlNet
architectures (sdjax/data/models/controlnet-sd15, -sd21) in the `slow` tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference import (
    TINY_UNET,
    _clean,
    assert_same_images_but_rounding,
    build_unet,
    nchw,
    nhwc,
    randomize_,
    rel_l2,
)
from test_generate import torch_models  # noqa: F401 (a fixture: the tiny model's torch parts)

import sdjax
from sdjax import testing

CONFIGS = {
    # SD 1.x style, the ControlNet diffusers' from_unet makes of the tiny UNet, condition at 8x the latents
    "sd1": dict(_clean(TINY_UNET), conditioning_embedding_out_channels=[8, 8, 16, 16]),
    # SD 2.x style: per-block heads, linear projections, upcast attention; BGR condition, 2x condition stack
    "sd2_bgr": dict(
        _clean(TINY_UNET),
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        controlnet_conditioning_channel_order="bgr",
        conditioning_embedding_out_channels=[8, 16],
    ),
    # global_pool_conditions (the "shuffle" models): residuals averaged over space
    "pooled": dict(_clean(TINY_UNET), global_pool_conditions=True, conditioning_embedding_out_channels=[8, 16]),
}
UNET_ONLY = ("out_channels", "up_block_types", "sample_size", "center_input_sample", "time_embedding_dim")


def build_controlnet(config: dict, seed: int = 3):
    """diffusers' ControlNetModel with seeded random weights; the condition stack's convolutions at a fan-in
    scale (randomize_ would give them the large scale of token embeddings)."""
    from diffusers import ControlNetModel

    model = randomize_(ControlNetModel(**{k: v for k, v in config.items() if k not in UNET_ONLY}), seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.controlnet_cond_embedding.parameters():
            if p.ndim == 4:
                p.copy_(torch.randn(p.shape, generator=gen) / int(np.prod(p.shape[1:])) ** 0.5)
    return model


def controlnet_inputs(model, latent_size: int = 16, batch: int = 2, seed: int = 0):
    cfg = model.config
    rng = np.random.default_rng(seed)
    factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
    x = rng.standard_normal((batch, latent_size, latent_size, cfg.in_channels)).astype(np.float32)
    t = np.array([3.0, 981.0][:batch], np.float32)
    ctx = rng.standard_normal((batch, 77, cfg.cross_attention_dim)).astype(np.float32)
    cond = rng.uniform(0, 1, (batch, latent_size * factor, latent_size * factor, cfg.conditioning_channels))
    return x, t, ctx, cond.astype(np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(torch ControlNetModel, sdjax ControlNet loaded from its saved folder)."""
    model = build_controlnet(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param) / "controlnet"
    model.save_pretrained(folder)
    return model, sdjax.load_controlnet(folder)


def _residuals_torch(model, inputs, scale=1.0, guess_mode=False):
    x, t, ctx, cond = inputs
    with torch.no_grad():
        down, mid = model(
            nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            nchw(cond),
            conditioning_scale=scale,
            guess_mode=guess_mode,
            return_dict=False,
        )
    return [nhwc(r) for r in down], nhwc(mid)


def _residuals_sdjax(cn, inputs, scale=1.0, guess_mode=False):
    import jax

    apply = jax.jit(
        lambda p, x, t, c, cond, s: cn.module.apply({"params": p}, x, t, c, cond, s, guess_mode),
    )
    down, mid = apply(cn.params, *inputs, scale)
    return [np.asarray(r) for r in down], np.asarray(mid)


@pytest.mark.parametrize(("scale", "guess_mode"), [(1.0, False), (0.65, False), (0.8, True)])
def test_residuals_match_diffusers(pair, scale, guess_mode):
    model, cn = pair
    inputs = controlnet_inputs(model)
    want_down, want_mid = _residuals_torch(model, inputs, scale, guess_mode)
    got_down, got_mid = _residuals_sdjax(cn, inputs, scale, guess_mode)
    assert len(got_down) == len(want_down) == cn.config.residual_count
    errors = [rel_l2(g, w) for g, w in zip(got_down, want_down, strict=True)] + [rel_l2(got_mid, want_mid)]
    print("relative L2 per residual:", [f"{e:.1e}" for e in errors])
    assert max(errors) <= 1e-5
    assert all(g.shape == w.shape for g, w in zip(got_down, want_down, strict=True))


def test_unet_with_controlnet_residuals_matches_diffusers(tmp_path):
    """The UNet adds the residuals to its skips and mid block as diffusers' down_block_additional_residuals."""
    import jax

    from sdjax.convert import diffusers_folder

    unet_config = dict(TINY_UNET, sample_size=16)
    unet = build_unet(unet_config)
    model = build_controlnet(dict(_clean(unet_config), conditioning_embedding_out_channels=[8, 16]))
    inputs = controlnet_inputs(model)
    down, mid = _residuals_torch(model, inputs, 0.9)
    x, t, ctx, _ = inputs
    with torch.no_grad():
        want = unet(
            nchw(x),
            torch.from_numpy(t),
            torch.from_numpy(ctx),
            down_block_additional_residuals=[nchw(r) for r in down],
            mid_block_additional_residual=nchw(mid),
        ).sample
    unet.save_pretrained(tmp_path / "unet")
    module, params = diffusers_folder.load_component(tmp_path, diffusers_folder.UNET, "float32")
    got = jax.jit(module.apply)({"params": params}, x, t, ctx, tuple(down), mid)
    assert rel_l2(np.asarray(got), nhwc(want)) <= 1e-5
    with pytest.raises(ValueError, match="down residuals"):
        module.apply({"params": params}, x, t, ctx, tuple(down[:-1]), mid)


def test_export_loads_in_diffusers_with_the_same_residuals(pair, tmp_path):
    from diffusers import ControlNetModel

    model, cn = pair
    out = cn.save_pretrained(tmp_path / "exported")
    again = ControlNetModel.from_pretrained(out).eval()
    inputs = controlnet_inputs(model, seed=5)
    want_down, want_mid = _residuals_torch(model, inputs)
    got_down, got_mid = _residuals_torch(again, inputs)
    assert all(np.array_equal(g, w) for g, w in zip(got_down, want_down, strict=True))
    assert np.array_equal(got_mid, want_mid)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"


def test_bad_controlnet_folders_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sdjax.load_controlnet(tmp_path / "nowhere")
    unet_folder = testing.random_pipeline("tiny").save_pretrained(tmp_path / "model") / "unet"
    with pytest.raises(ValueError, match="not a ControlNetModel"):
        sdjax.load_controlnet(unet_folder)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["controlnet-sd15", "controlnet-sd21"])
def test_real_architectures_match_diffusers(name, tmp_path):
    """The real SD 1.5 / SD 2.1 ControlNet architectures (lllyasviel's v1.1 layout), random weights, at a
    32x32 latent (256x256 condition image)."""
    config = json.loads((testing.DATA / name / "config.json").read_text())
    model = build_controlnet(_clean(config))
    model.save_pretrained(tmp_path / name)
    cn = sdjax.load_controlnet(tmp_path / name)
    inputs = controlnet_inputs(model, latent_size=32, batch=1)
    want_down, want_mid = _residuals_torch(model, inputs)
    got_down, got_mid = _residuals_sdjax(cn, inputs)
    errors = [rel_l2(g, w) for g, w in zip(got_down, want_down, strict=True)] + [rel_l2(got_mid, want_mid)]
    print(name, "relative L2 max", max(errors), "per residual:", [f"{e:.1e}" for e in errors])
    assert len(errors) == 13 and max(errors) <= 1e-5

    # the same weights as a downloaded single file: its architecture detected from the file alone
    from sdjax.convert.controlnet_file import to_single_file_tensors
    from sdjax.convert.tensor_files import save_safetensors

    path = tmp_path / f"control_{name}.safetensors"
    save_safetensors(path, to_single_file_tensors(cn.module, cn.params))
    del cn
    single = sdjax.load_controlnet(path)
    assert single.config == sdjax.load_controlnet(tmp_path / name).config
    got_down, got_mid = _residuals_sdjax(single, inputs)
    assert max(rel_l2(g, w) for g, w in zip(got_down, want_down, strict=True)) <= 1e-5


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_single_files_in_lllyasviels_layout(pair, tmp_path, prefix):
    """A ControlNet written under lllyasviel's names (`control_model.*`, or bare as thibaud's SD 2.1 files)
    loads in diffusers' own single-file loader to the same model (so the names are right) and in sdjax to
    the same residuals; a diffusers-named file or another model is refused in one line."""
    from diffusers import ControlNetModel

    from sdjax.convert.controlnet_file import to_single_file_tensors
    from sdjax.convert.tensor_files import save_safetensors

    model, cn = pair
    tensors = to_single_file_tensors(cn.module, cn.params)
    tensors = {prefix + k.removeprefix("control_model."): v for k, v in tensors.items()}
    path = save_safetensors(tmp_path / "control_tiny.safetensors", tensors) or tmp_path / "control_tiny.safetensors"
    folder = tmp_path / "config"
    cn.save_pretrained(folder)
    inputs = controlnet_inputs(model, seed=7)
    want = _residuals_torch(model, inputs)

    # diffusers' converter reads the `control_model.` layout with lllyasviel's 4-level condition stack (it
    # takes the last hint convolution to be input_hint_block.14)
    if prefix and len(model.config.conditioning_embedding_out_channels) == 4:
        theirs = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True).eval()
        got = _residuals_torch(theirs, inputs)
        assert all(rel_l2(g, w) <= 1e-6 for g, w in zip(got[0], want[0], strict=True))
    ours = sdjax.load_controlnet(path, config=folder)
    got_down, got_mid = _residuals_sdjax(ours, inputs)
    assert max(rel_l2(g, w) for g, w in zip(got_down, want[0], strict=True)) <= 1e-5
    assert rel_l2(got_mid, want[1]) <= 1e-5

    renamed = tmp_path / "diffusers_named.safetensors"
    save_safetensors(renamed, {"controlnet_cond_embedding.conv_in.weight": np.zeros((8, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="diffusers' names"):
        sdjax.load_controlnet(renamed)
    unet = tmp_path / "unet.safetensors"
    save_safetensors(unet, {"conv_in.weight": np.zeros((8, 4, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="not a ControlNet file"):
        sdjax.load_controlnet(unet)


def test_shapes_only_controlnets_read_no_tensor(controlled, tmp_path, monkeypatch):
    """load_controlnet(weights=False) (sample.py compiles from it before loading): a folder's config.json or a
    `.safetensors` file's header alone gives exactly the loaded params' shapes and dtypes; a wrong shape in
    the file is named, a `.pth` pickle is refused before it is read."""
    import jax

    from sdjax.convert import tensor_files
    from sdjax.convert.controlnet_file import to_single_file_tensors
    from sdjax.convert.tensor_files import save_safetensors

    folder, *_, nets = controlled
    net = nets[0]
    single = tmp_path / "control_tiny.safetensors"
    tensors = to_single_file_tensors(net.module, net.params)
    save_safetensors(single, tensors)
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, tmp_path / "c.pth")

    def refuse(*args, **kwargs):
        raise AssertionError("weights=False read a tensor")

    def shapes(tree):
        return jax.tree.map(lambda a: (a.shape, np.dtype(a.dtype)), tree)

    for path, config in [(folder.parent / "cn3", None), (single, folder.parent / "cn3")]:
        loaded = sdjax.load_controlnet(path, "bfloat16", config=config)
        with monkeypatch.context() as patch:
            patch.setattr(tensor_files.SafetensorsFile, "__getitem__", refuse)
            patch.setattr(tensor_files.SafetensorsFile, "mapped", refuse)
            abstract = sdjax.load_controlnet(path, "bfloat16", config=config, weights=False)
        assert abstract.module == loaded.module
        assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract.params))
        assert shapes(abstract.params) == shapes(loaded.params)
    key = "control_model.input_hint_block.0.weight"
    save_safetensors(tmp_path / "bad.safetensors", {**tensors, key: np.zeros((3, 3, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=f"with the wrong shape: {key} \\(3, 3, 3, 3\\)"):
        sdjax.load_controlnet(tmp_path / "bad.safetensors", config=folder.parent / "cn3", weights=False)
    with pytest.raises(ValueError, match="weights=False needs a .safetensors file"):
        sdjax.load_controlnet(tmp_path / "c.pth", config=folder.parent / "cn3", weights=False)


# ---------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def controlled(torch_models, tmp_path_factory):  # noqa: F811 (the imported fixture)
    """(folder, torch unet, vae, text encoder, sdjax pipeline, [torch ControlNets], [sdjax ControlNets]):
    the tiny model of test_generate and two ControlNets of its one-level UNet (condition at the VAE's 8x).
    These tests check the pipeline's use of ControlNets; CONFIGS' two-level ones check the residuals' wiring."""
    from reference import MICRO_UNET, SD15, save_folder

    unet, vae, text = torch_models
    folder = save_folder(tmp_path_factory.mktemp("cn-model"), unet, vae, text, scheduler_from=SD15)
    config = dict(_clean(MICRO_UNET), conditioning_embedding_out_channels=[8, 8, 16, 16])
    torch_nets, nets = [], []
    for seed in (3, 4):
        model = build_controlnet(config, seed=seed)
        model.save_pretrained(folder.parent / f"cn{seed}")
        torch_nets.append(model)
        nets.append(sdjax.load_controlnet(folder.parent / f"cn{seed}"))
    return folder, unet, vae, text, sdjax.load_pipeline(folder), torch_nets, nets


def _condition(seed: int, size: int = 64) -> np.ndarray:
    """A condition map: white shapes on black, uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size, 3), np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, size - 16, 2)
        image[y : y + 16, x : x + 16] = 255
    return image


def _diffusers_controlnet(pipeline_cls, folder, unet, vae, text, nets, scheduler, **kwargs):
    from diffusers import ControlNetModel  # noqa: F401 - the class the pipeline holds
    from test_generate import _tokenizer, to_uint8

    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text,
        tokenizer=_tokenizer(folder),
        unet=unet,
        controlnet=nets if len(nets) > 1 else nets[0],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return to_uint8(pipe(output_type="np", **kwargs).images)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        # a scale alone: `slow` (the default run scales two ControlNets in "multi")
        pytest.param("euler", dict(controlnet_conditioning_scale=0.8), marks=pytest.mark.slow),
        ("dpmpp_2m_karras", dict(control_guidance_start=0.2, control_guidance_end=0.7)),
        ("heun", dict(guess_mode=True, guidance_scale=5.0)),
        ("ddim", dict(multi=True, controlnet_conditioning_scale=[0.6, 1.2], control_guidance_end=[1.0, 0.5])),
    ],
    ids=["scale", "start-end", "guess-mode", "multi"],
)
def test_txt2img_with_controlnet_matches_diffusers(controlled, name, options):
    from diffusers import StableDiffusionControlNetPipeline
    from PIL import Image
    from test_generate import NEGATIVES, PROMPTS, assert_close_images, diffusers_scheduler, diffusers_txt2img, noise_for

    folder, unet, vae, text, pipe, torch_nets, nets = controlled
    options = dict(options)
    multi = options.pop("multi", False)
    count = 2 if multi else 1
    conditions = [_condition(seed) for seed in range(count)]
    noise = noise_for(pipe, 2, seed=2)
    steps = 6
    ours = pipe.generate(
        PROMPTS,
        NEGATIVES,
        num_inference_steps=steps,
        scheduler=name,
        latents=noise,
        controlnet=nets[:count] if multi else nets[0],
        control_image=conditions if multi else conditions[0],
        **options,
    )
    images = [Image.fromarray(c) for c in conditions]
    theirs = _diffusers_controlnet(
        StableDiffusionControlNetPipeline,
        folder,
        unet,
        vae,
        text,
        torch_nets[:count],
        diffusers_scheduler(name, pipe.scheduler_config),
        prompt=PROMPTS,
        negative_prompt=NEGATIVES,
        image=images if multi else images[0],
        num_inference_steps=steps,
        latents=nchw(noise),
        **{"guidance_scale": 7.5, **options},
    )
    assert_close_images(ours, theirs)
    # the ControlNet changed the images (diffusers' images without it: sdjax's plain program would compile)
    guidance = options.get("guidance_scale", 7.5)
    plain = diffusers_txt2img(folder, unet, vae, text, name, pipe.scheduler_config, noise, steps, guidance)
    assert np.abs(plain.astype(int) - ours.astype(int)).mean() > 1


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpainting_with_controlnet_match_diffusers(controlled, mode, monkeypatch):
    """StableDiffusionControlNetImg2ImgPipeline / ...InpaintPipeline (a regular UNet: latent blending). Their
    `latents=` replaces the noised init image, so the same noise goes in through their noise draw."""
    import diffusers.pipelines.controlnet.pipeline_controlnet_img2img as img2img_module
    import diffusers.pipelines.controlnet.pipeline_controlnet_inpaint as inpaint_module
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline
    from PIL import Image
    from test_generate import PROMPTS, _init_image, _mask, assert_close_images, diffusers_scheduler, noise_for

    folder, unet, vae, text, pipe, torch_nets, nets = controlled
    image, condition = _init_image(seed=3), Image.fromarray(_condition(9))
    noise = noise_for(pipe, 1, seed=6)
    for module in (img2img_module, inpaint_module):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: nchw(noise))
    kwargs = dict(num_inference_steps=8, strength=0.7)
    extra = {"mask_image": _mask()} if mode == "inpaint" else {}
    ours = pipe.generate(
        PROMPTS[1],
        scheduler="ddim",
        image=image,
        latents=noise,
        controlnet=nets[1],
        control_image=condition,
        controlnet_conditioning_scale=0.9,
        **extra,
        **kwargs,
    )
    cls = StableDiffusionControlNetInpaintPipeline if mode == "inpaint" else StableDiffusionControlNetImg2ImgPipeline
    theirs = _diffusers_controlnet(
        cls,
        folder,
        unet,
        vae,
        text,
        [torch_nets[1]],
        diffusers_scheduler("ddim", pipe.scheduler_config),
        prompt=PROMPTS[1],
        image=image,
        control_image=condition,
        controlnet_conditioning_scale=0.9,
        **extra,
        **kwargs,
    )
    assert_close_images(ours, theirs)


def test_control_inputs_are_traced_not_recompiled(controlled):
    """Another condition image, scale, start/end or ControlNet of the same architecture: no recompile."""
    from sdjax.generate import program

    run = program()
    *_, pipe, _, nets = controlled
    kwargs = dict(num_inference_steps=3, controlnet=nets[0], control_image=_condition(1))
    pipe.generate("a cat", **kwargs)
    compiled = run._cache_size()
    pipe.generate("a dog", **{**kwargs, "control_image": _condition(2)}, controlnet_conditioning_scale=0.3)
    pipe.generate("a dog", **{**kwargs, "controlnet": nets[1]}, control_guidance_start=0.5)
    assert run._cache_size() == compiled


def test_bad_controlnet_requests_are_one_line(controlled, tmp_path):
    *_, pipe, _, nets = controlled
    condition = _condition(0)
    cases = [
        (dict(control_image=condition), "control_image needs a ControlNet"),
        (dict(controlnet=nets[0]), "need control_image"),
        (dict(controlnet=nets, control_image=condition), "1 control images for 2 ControlNets"),
        (dict(controlnet=nets, control_image=[condition] * 2, controlnet_conditioning_scale=[1.0]), "1 values for 2"),
        (
            dict(controlnet=nets[0], control_image=condition, control_guidance_start=0.6, control_guidance_end=0.4),
            "below",
        ),
        (dict(controlnet=nets[0], control_image=condition, controlnet_conditioning_scale=float("nan")), "finite"),
        (dict(controlnet="canny", control_image=condition), "must be a sdjax.ControlNet"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            pipe.generate("a cat", num_inference_steps=2, **options)
        assert message in str(info.value) and "\n" not in str(info.value), (options, str(info.value))
    sd21_like = build_controlnet(
        dict(_clean(TINY_UNET), cross_attention_dim=48, conditioning_embedding_out_channels=[8, 8, 16, 16])
    )
    sd21_like.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="text states of width 48 but the model's UNet uses 32"):
        pipe.generate(
            "a cat", num_inference_steps=2, controlnet=sdjax.load_controlnet(tmp_path / "wide"), control_image=condition
        )


def test_sample_cli_with_controlnet(controlled, tmp_path, capsys):
    """sample.py --controlnet/--control-image/--preprocess canny: the API's image, and the settings in the PNG
    as A1111's ControlNet extension writes them; the program is compiled before the model's and the
    ControlNet's weights are read (a `.pth` ControlNet is loaded first); bad ControlNet arguments are one
    line."""
    from PIL import Image

    import sample
    from sdjax.control_images import canny, fit_to_size

    folder, *_, pipe, _, nets = controlled
    source = tmp_path / "photo.png"  # wider than the 64x64 output: A1111's default crops its sides
    photo = np.concatenate([_condition(5), _condition(6)[:, :32]], axis=1)
    Image.fromarray(np.clip(photo.astype(int) * 0.7 + 40, 0, 255).astype(np.uint8)).save(source)
    out = tmp_path / "out"
    args = ["a red cube", "--model", folder, "--controlnet", folder.parent / "cn3", "--control-image", source]
    args += ["--preprocess", "canny", "--control-scale", "0.8", "--steps", "3", "--out", out]
    assert sample.cli([str(a) for a in args]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert 0 <= err.index("compiling (") < err.index("loading ") < err.index("loading ControlNet"), err
    pth = tmp_path / "cn3.pth"
    pth.write_bytes(b"PK\x03\x04")  # a torch.save zip: only its first bytes are looked at
    pickled = ["x", "--model", str(folder), "--controlnet", str(pth), "--control-image", str(source)]
    assert sample.model_shapes(sample.parse_args(pickled)) is None
    written = out / "00000-0.png"
    text = Image.open(written).info["parameters"]
    assert (
        'ControlNet 0: "Module: canny, Model: cn3, Weight: 0.8, Resize Mode: Crop and Resize, Guidance Start: 0, '
        "Guidance End: 1" in text
    )

    def drawn_with(fit: str) -> np.ndarray:
        """The API's image for the control image fitted by `fit`, then canny."""
        condition = canny(fit_to_size(Image.open(source), 64, 64, mode=fit))
        kwargs = dict(controlnet=nets[0], control_image=condition, controlnet_conditioning_scale=0.8)
        return pipe.generate("a red cube", num_inference_steps=3, seed=0, **kwargs)[0].astype(int)

    assert np.abs(np.asarray(Image.open(written)).astype(int) - drawn_with("crop")).max() <= 1
    # --control-resize resize: stretched to the output size as diffusers does
    args[args.index(out)] = tmp_path / "stretched"
    stretch = [*args, "--control-resize", "resize", "--no-progress"]
    assert sample.cli([str(a) for a in stretch]) == 0, capsys.readouterr().err
    stretched = Image.open(tmp_path / "stretched" / "00000-0.png")
    assert "Resize Mode: Just Resize" in stretched.info["parameters"]
    assert np.abs(np.asarray(stretched).astype(int) - drawn_with("resize")).max() <= 1

    for extra, message in [
        (["--controlnet", folder.parent / "cn3"], "0 --control-image for 1 --controlnet"),
        (
            ["--controlnet", folder.parent / "cn3", "--control-image", source, "--preprocess", "hed"],
            "unknown --preprocess",
        ),
        (["--controlnet", tmp_path / "nope", "--control-image", source], "ControlNet"),
        (["--control-scale", "0.5"], "--control-scale given 1 times for 0 --controlnet"),
    ]:
        try:
            code = sample.cli([str(a) for a in ["a cat", "--model", folder, "--out", tmp_path / "o", *extra]])
        except SystemExit as stop:
            code = stop.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, lines)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["ddim", "pndm", "lms", "lms_karras", "euler", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"]
)
def test_every_scheduler_with_controlnet_matches_diffusers(controlled, name):
    test_txt2img_with_controlnet_matches_diffusers(controlled, name, dict(controlnet_conditioning_scale=0.7))


_EIGHT_DEVICES = """
import sys
import numpy as np, jax
sys.path.insert(0, {tests!r})
import sdjax
from test_controlnet import _condition
assert jax.device_count() == 8
pipe, cn = sdjax.load_pipeline({folder!r}), sdjax.load_controlnet({cn!r})
spec = "data=2,fsdp=4"
images = pipe.on_mesh(spec).generate(
    ["a red cube", "a blue ball"] * 4, num_inference_steps=3, seed=5, mesh=spec, controlnet=cn,
    control_image=[_condition(k) for k in range(8)], controlnet_conditioning_scale=0.8)
np.savez({out!r}, fsdp=images)
"""


@pytest.mark.slow  # the default run checks this mesh without ControlNets (test_sharding.py)
def test_eight_devices_with_controlnet_give_the_one_device_images(controlled, tmp_path):
    """The sharded program (the batch split in two, the UNet's weights FSDP-split in four) draws with a
    ControlNet the images of one device, but for float rounding (`assert_same_images_but_rounding`). (Data
    parallelism alone over eight devices is checked without a ControlNet in test_sharding.py; this mesh splits
    the batch and the control images too.)"""
    import os
    import subprocess
    import sys
    from pathlib import Path

    folder, *_, pipe, _, nets = controlled
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "eight.npz"
    code = _EIGHT_DEVICES.format(
        tests=str(root / "tests"), folder=str(folder), cn=str(folder.parent / "cn3"), out=str(out)
    )
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(root)}
    job = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stderr[-3000:]
    eight = np.load(out)
    one = pipe.generate(
        ["a red cube", "a blue ball"] * 4,
        num_inference_steps=3,
        seed=5,
        mesh=None,
        controlnet=nets[0],
        control_image=[_condition(k) for k in range(8)],
        controlnet_conditioning_scale=0.8,
    )
    assert_same_images_but_rounding(eight["fsdp"], one)


def test_from_unet_matches_diffusers(tmp_path):
    """sdjax.ControlNet.from_unet gives diffusers' ControlNetModel.from_unet: the same config, the UNet's
    conv_in, time embedding, down and mid blocks bit for bit, zero output convolutions (so the UNet's images
    are unchanged), and the condition embedding drawn as PyTorch draws a conv (uniform, fan-in bound)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    pipe = testing.random_pipeline("tiny")
    pipe.save_pretrained(tmp_path / "model")
    want = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet"))
    cn = sdjax.ControlNet.from_unet(pipe, seed=1)
    got = ControlNetModel.from_pretrained(cn.save_pretrained(tmp_path / "cn"))
    differing = {
        k for k, v in want.config.items() if not k.startswith("_") and json.dumps(got.config[k]) != json.dumps(v)
    }
    assert not differing, {k: (want.config[k], got.config[k]) for k in differing}
    theirs, ours = want.state_dict(), got.state_dict()
    assert theirs.keys() == ours.keys()
    for name, value in theirs.items():
        if name.startswith("controlnet_cond_embedding.") and ".conv_out." not in name:
            fan_in = (
                int(np.prod(value.shape[1:]))
                if value.ndim > 1
                else int(np.prod(theirs[name.replace("bias", "weight")].shape[1:]))
            )
            assert np.abs(ours[name].numpy()).max() <= fan_in**-0.5 and ours[name].numpy().std() > 0.4 * fan_in**-0.5
        else:
            assert torch.equal(ours[name], value), name
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((1, 8, 8, 4)).astype(np.float32),
        np.array([500.0], np.float32),
        rng.standard_normal((1, 77, 32)).astype(np.float32),
        rng.uniform(0, 1, (1, 64, 64, 3)).astype(np.float32),
    )
    down, mid = _residuals_sdjax(cn, inputs)
    assert all(not r.any() for r in down) and not mid.any()
    with pytest.raises(ValueError, match="VAE's factor is 8: give 4 channel counts"):
        sdjax.ControlNet.from_unet(pipe, conditioning_embedding_out_channels=(16, 32))


@pytest.mark.slow  # the default run checks two processes without ControlNets (test_sharding.py)
def test_two_processes_with_controlnets_write_the_images_of_one(controlled, tmp_path):
    """sample.py with two ControlNets on 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1) writes
    exactly the files (names, pixels, PNG text) of 1 process with 4 devices.

    Not of 1 process with 8 devices: with a ControlNet, a process holding 4 CPU devices rounds a few values
    of the condition embedding differently (1 ulp) from one holding 1, 2 or 8, although the compiled
    programs are the same instruction for instruction (the plain pipeline is not affected; see the README,
    "ControlNet"). Here 1 in 12,288 uint8 values came out 1 level apart."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    folder = controlled[0]
    root = Path(__file__).resolve().parents[1]
    edges, blobs = tmp_path / "edges.png", tmp_path / "blobs.png"
    Image.fromarray(_condition(7)).save(edges)
    Image.fromarray(_condition(8)).save(blobs)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball on grass\na green tree\n")
    common = [sys.executable, str(root / "sample.py"), "--model", str(folder), "--prompts-file", str(prompts)]
    common += ["--controlnet", str(folder.parent / "cn3"), "--control-image", str(edges), "--control-scale", "0.7"]
    common += ["--controlnet", str(folder.parent / "cn4"), "--control-image", str(blobs), "--control-end", "0.5"]
    common += ["--steps", "3", "-n", "2", "--seed", "11", "--cache-dir", "off"]

    def env(devices: int) -> dict:
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        return {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(root)}

    single = subprocess.run(common + ["--out", str(tmp_path / "one")], env=env(4), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hosts = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--out", str(tmp_path / "two")]
    jobs = [
        subprocess.Popen(common + hosts + ["--process-id", str(i)], env=env(4), stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errors = [job.communicate(timeout=600)[1] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), "\n".join(e[-2000:] for e in errors)
    assert "over 8 devices, 2 process(es)" in errors[0] and "over 4 devices, 1 process(es)" in single.stderr
    one = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    two = sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert len(one) == 3 and one == two
    for name in one:
        with Image.open(tmp_path / "one" / name) as a, Image.open(tmp_path / "two" / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
            assert a.text == b.text and 'ControlNet 1: "Module: none, Model: cn4' in a.text["parameters"]
