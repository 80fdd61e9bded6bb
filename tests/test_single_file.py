"""Single-file checkpoints (original CompVis/Stability layout): detection, loading, export, external VAEs.

Each case builds random tiny diffusers/transformers models of the SD 1.x, SD 2.x or inpainting structure,
writes them as one single file with sdjax's key map run backwards (plus the junk keys real files carry),
checks the file independently with diffusers' own converters (`diffusers.loaders.single_file_utils`), and
compares sdjax's outputs with the models built from diffusers' converted weights (fp32, rel. L2 <= 1e-5).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import (
    SD15,
    SD21,
    SMALL_UNET,
    SMALL_VAE,
    build_text_encoder,
    build_unet,
    build_vae,
    nchw,
    nhwc,
    rel_l2,
    save_folder,
)

import sdjax
from sdjax.convert import ldm_keys, tensor_files
from sdjax.convert import single_file as sf
from sdjax.convert.diffusers_folder import TEXT_ENCODER, UNET, VAE, keymap_for
from sdjax.convert.keymap import ConversionError
from sdjax.convert.tensor_files import SafetensorsFile, save_safetensors
from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig

TOL = 1e-5

# Two levels and one layer per block keep compilation short. SD 1 puts the upsampler after a plain level
# (`output_blocks.1.1.conv`), SD 2 after a transformer (`output_blocks.1.2.conv`); the real numbering
# with two layers per block is checked by test_full_size_map_matches_diffusers_names_and_shapes.
_UNET_SD1 = SMALL_UNET
_UNET_SD2 = dict(
    _UNET_SD1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    cross_attention_dim=48,
    use_linear_projection=True,
    upcast_attention=True,
)
CASES = {
    # name: (unet config, text encoder config, tokenizer/scheduler source, expected detection)
    "sd1": (
        _UNET_SD1,
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, eos_token_id=2),
        SD15,
        "sd1",
    ),
    "sd2": (
        _UNET_SD2,
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=6,
            hidden_act="gelu",
            eos_token_id=2,
        ),
        SD21,
        "sd2",
    ),
    "inpaint": (
        dict(_UNET_SD1, in_channels=9, out_channels=4),
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, eos_token_id=2),
        SD15,
        "sd1-inpainting",
    ),
}


def _junk(tensors: dict, layout: str, num_layers: int, rng) -> dict:
    """The non-parameter tensors real single files carry, which loading must skip without complaint."""
    junk = {
        "betas": rng.random(1000, dtype=np.float32),
        "alphas_cumprod": rng.random(1000, dtype=np.float32),
        "posterior_mean_coef1": rng.random(1000, dtype=np.float32),
        "model_ema.decay": np.array(0.9999, np.float32),
        "model_ema.num_updates": np.array(100, np.int32),
        "model_ema.diffusion_modelinput_blocks00weight": tensors["model.diffusion_model.input_blocks.0.0.weight"],
    }
    if layout == "clip":
        junk[ldm_keys.CLIP_PREFIX + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    else:
        p = ldm_keys.OPENCLIP_PREFIX
        junk[p + "logit_scale"] = np.array(4.6, np.float32)
        width = tensors[p + "token_embedding.weight"].shape[1]
        junk[p + "text_projection"] = rng.standard_normal((width, width), dtype=np.float32)
        # The 24th OpenCLIP block of SD 2 files, which diffusers (and SD 2 itself) does not use.
        last = f"{p}transformer.resblocks.0."
        for key in [k for k in tensors if k.startswith(last)]:
            junk[key.replace(last, f"{p}transformer.resblocks.{num_layers}.")] = rng.standard_normal(
                tensors[key].shape, dtype=np.float32
            )
    return junk


def _config_only(folder: Path, out: Path) -> Path:
    """A copy of a diffusers folder without its weights: configs, tokenizer and scheduler."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """One model structure: its torch models, config folder, single file (+ its tensors and junk keys) and
    the sdjax pipeline loaded from the file."""
    name = request.param
    unet_cfg, text_cfg, source, _ = CASES[name]
    tmp = tmp_path_factory.mktemp(name)
    unet, vae, text = build_unet(unet_cfg, seed=3), build_vae(SMALL_VAE, seed=4), build_text_encoder(text_cfg, seed=5)
    folder = save_folder(tmp / "diffusers", unet, vae, text, tokenizer_from=source, scheduler_from=source)
    config = _config_only(folder, tmp / "config")
    tensors = sf.to_single_file_tensors(sdjax.load_pipeline(folder))  # the key map, run backwards
    layout = "openclip" if name == "sd2" else "clip"
    junk = _junk(tensors, layout, text_cfg["num_hidden_layers"], np.random.default_rng(0))
    path = tmp / f"{name}.safetensors"
    save_safetensors(path, {**tensors, **junk})
    return SimpleNamespace(
        name=name,
        torch_models={"unet": unet, "vae": vae, "text_encoder": text},
        config=config,
        path=path,
        tensors=tensors,
        junk=junk,
        pipe=sdjax.load_pipeline(path, config=config),
    )


def _diffusers_models(path: Path, config: Path, name: str):
    """torch UNet, VAE and text encoder from diffusers' own conversion of the single file (independent of
    sdjax: read with safetensors.torch, converted by diffusers.loaders.single_file_utils)."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig as TorchCLIPConfig
    from transformers import CLIPTextModel as TorchCLIP

    checkpoint = load_file(path)
    unet_cfg = {k: v for k, v in read_json(config / "unet" / "config.json").items() if not k.startswith("_")}
    vae_cfg = {k: v for k, v in read_json(config / "vae" / "config.json").items() if not k.startswith("_")}
    unet = TorchUNet(**unet_cfg).eval()
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(checkpoint, unet_cfg), strict=True)
    vae = TorchVAE(**vae_cfg).eval()
    vae.load_state_dict(su.convert_ldm_vae_checkpoint(checkpoint, vae_cfg), strict=True)
    text = TorchCLIP(TorchCLIPConfig.from_pretrained(config / "text_encoder")).eval()
    if name == "sd2":
        converted = su.convert_open_clip_checkpoint(text, checkpoint)
    else:
        converted = su.convert_ldm_clip_checkpoint(checkpoint)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    result = text.load_state_dict(converted, strict=False)
    assert not result.missing_keys
    # diffusers drops resblock 23 by its full-size name only: in a tiny model the unused last block shows up.
    # (and transformers 5 has no position_ids buffer).
    extra = [k for k in result.unexpected_keys if k != "embeddings.position_ids"]
    assert all(k.startswith(f"encoder.layers.{text.config.num_hidden_layers}.") for k in extra)
    assert bool(extra) == (name == "sd2")
    return {"unet": unet, "vae": vae, "text_encoder": text}


@pytest.fixture(scope="module")
def converted(case):
    """The case's torch models, rebuilt from diffusers' conversion of its single file."""
    return _diffusers_models(case.path, case.config, case.name)


def test_detects_the_model_type(case):
    assert sf.detect_model_type(SafetensorsFile(case.path)) == CASES[case.name][3]


def test_diffusers_conversion_recovers_the_weights(case, converted):
    """diffusers' converters turn our file back into exactly the weights it was written from."""
    for part, module in case.torch_models.items():
        theirs = converted[part].state_dict()
        assert set(theirs) == set(module.state_dict())
        for key, value in module.state_dict().items():
            assert torch.equal(theirs[key], value), key


def test_outputs_match_diffusers_conversion(case, converted):
    models = converted
    pipe = case.pipe
    assert pipe.params["unet"]["conv_in"]["kernel"].dtype == jnp.float32
    rng = np.random.default_rng(1)
    cfg = models["unet"].config
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([3.0, 801.0], np.float32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    ours = pipe.unet.apply({"params": pipe.params["unet"]}, x, t, ctx)  # eager: op caches are shared
    with torch.no_grad():
        ref = nhwc(models["unet"](nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    err = {"unet": rel_l2(ours, ref)}

    img = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    mean, _ = pipe.vae.apply({"params": pipe.params["vae"]}, img, method="encode")
    z = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    dec = pipe.vae.apply({"params": pipe.params["vae"]}, z, method="decode")
    with torch.no_grad():
        err["vae_encode"] = rel_l2(mean, nhwc(models["vae"].encode(nchw(img)).latent_dist.mean))
        err["vae_decode"] = rel_l2(dec, nhwc(models["vae"].decode(nchw(z)).sample))

    ids = pipe.tokenizer(["a photo of an astronaut riding a horse", "a cat!"])
    out = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids)
    with torch.no_grad():
        ref = models["text_encoder"](torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    err["text_last"] = rel_l2(out.last_hidden_state, ref.last_hidden_state)
    err["text_penultimate"] = rel_l2(out.hidden_states[-2], ref.hidden_states[-2])
    print(case.name, err)
    assert max(err.values()) <= TOL, err


def test_export_then_reload_is_identical(case, tmp_path):
    out = case.pipe.save_single_file(tmp_path / "export.safetensors")
    exported = SafetensorsFile(out)
    assert set(exported) == set(case.tensors)  # every parameter written back under its original name, no junk
    for key, value in case.tensors.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again = sdjax.load_pipeline(out, config=case.config)
    for ours, theirs in zip(jax.tree.leaves(again.params), jax.tree.leaves(case.pipe.params), strict=True):
        assert np.array_equal(ours, theirs)
    assert again.unet.config == case.pipe.unet.config
    assert again.text_encoder.config == case.pipe.text_encoder.config


def test_shapes_only_load_reads_the_header_alone(case, tmp_path, monkeypatch):
    """load_pipeline(file, weights=False) (sample.py compiles from it before loading): the params are
    `ShapeDtypeStruct`s of exactly the loaded shapes, with the file's VAE or an external one (a file or a
    diffusers VAE folder), no tensor is read, and a tensor of the wrong shape is named before any compile."""
    structs = lambda params, dtype: jax.tree.map(lambda x: (x.shape, jnp.dtype(dtype)), params)  # noqa: E731
    loaded = structs(case.pipe.params, jnp.bfloat16)

    def no_tensor_reads(*args):
        raise AssertionError("weights=False read a tensor")

    with monkeypatch.context() as patched:
        patched.setattr(SafetensorsFile, "__getitem__", no_tensor_reads)
        patched.setattr(SafetensorsFile, "mapped", no_tensor_reads)
        for vae in (None, case.path, case.config / "vae"):
            shapes = sdjax.load_pipeline(case.path, config=case.config, dtype="bfloat16", vae=vae, weights=False)
            assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes.params))
            assert structs(shapes.params, jnp.bfloat16) == loaded
            assert shapes.unet.config == case.pipe.unet.config and shapes.dtype == jnp.bfloat16

    bad = dict(case.tensors)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    bad[key] = np.zeros(bad[key].shape[:2] + (1, 1), np.float32)
    save_safetensors(tmp_path / "bad.safetensors", bad)
    with pytest.raises(ConversionError) as err:
        sdjax.load_pipeline(tmp_path / "bad.safetensors", config=case.config, weights=False)
    assert key in _one_line(err)

    ckpt = tmp_path / "model.ckpt"
    torch.save({k: torch.tensor(v) for k, v in case.tensors.items()}, ckpt)
    for model, vae in ((ckpt, None), (case.path, ckpt)):
        with pytest.raises(ValueError) as err:
            sdjax.load_pipeline(model, config=case.config, vae=vae, weights=False)
        assert f"weights=False needs a .safetensors file; {ckpt} is a PyTorch pickle" in _one_line(err)


@pytest.mark.parametrize("case", ["sd1"], indirect=True)
def test_half_precision_file_is_cast(case, tmp_path):
    path = tmp_path / "fp16.safetensors"
    save_safetensors(path, {k: v.astype(np.float16) for k, v in case.tensors.items()})
    pipe = sf.load_single_file(path, config=case.config, dtype="float32")
    assert {leaf.dtype for leaf in jax.tree.leaves(pipe.params)} == {jnp.dtype(jnp.float32)}
    expected = case.tensors["model.diffusion_model.input_blocks.0.0.weight"].astype(np.float16).transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(pipe.params["unet"]["conv_in"]["kernel"], expected.astype(np.float32))


@pytest.mark.parametrize("case", ["sd1"], indirect=True)
def test_pickle_checkpoint_through_the_safe_loader(case, tmp_path):
    """A .ckpt ({"state_dict": ..., "global_step": ...}) read with torch.load(weights_only=True), in bf16."""
    ckpt = tmp_path / "model.ckpt"
    state = {k: torch.tensor(v) for k, v in {**case.tensors, **case.junk}.items()}
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 3}, ckpt)
    from_pickle = sf.load_single_file(ckpt, config=case.config, dtype=jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(from_pickle.params), jax.tree.leaves(case.pipe.params), strict=True):
        assert a.dtype == jnp.bfloat16 and np.array_equal(a, b.astype(jnp.bfloat16))


@pytest.mark.parametrize("case", ["sd2"], indirect=True)
def test_prediction_type_goes_into_the_scheduler_config(case):
    assert case.pipe.scheduler_config["prediction_type"] == "v_prediction"  # from the config folder
    pipe = sf.load_single_file(case.path, config=case.config, prediction_type="epsilon")
    assert pipe.scheduler_config["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        sf.load_single_file(case.path, config=case.config, prediction_type="eps")


def test_default_configs_follow_diffusers():
    """Without config=, the shipped folder of the detected type decides (SD 2: 768 v-prediction)."""
    expect = {
        ("sd1", None): ("stable-diffusion-v1-5", 4, "epsilon"),
        ("sd1-inpainting", None): ("stable-diffusion-inpainting", 9, "epsilon"),
        ("sd2", None): ("stable-diffusion-2-1", 4, "v_prediction"),
        ("sd2", "epsilon"): ("stable-diffusion-2-1-base", 4, "epsilon"),
        ("sd2-inpainting", None): ("stable-diffusion-2-1-base", 9, "epsilon"),
    }
    for (kind, prediction), (folder, in_channels, scheduler_prediction) in expect.items():
        path, overrides = sf.default_config_folder(kind, prediction)
        assert path.name == folder
        unet = {**read_json(path / "unet" / "config.json"), **overrides}
        assert unet["in_channels"] == in_channels
        scheduler = read_json(path / "scheduler" / "scheduler_config.json")
        assert scheduler.get("prediction_type", "epsilon") == scheduler_prediction


@pytest.mark.parametrize("folder", ["stable-diffusion-v1-5", "stable-diffusion-2-1"])
def test_full_size_map_matches_diffusers_names_and_shapes(folder):
    """The map for the real SD 1.5 / 2.1 architectures, checked against diffusers' converters on shape-only
    (meta) tensors: the same diffusers names and shapes as the diffusers models."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.loaders import single_file_utils as su
    from transformers import CLIPTextConfig as TorchCLIPConfig
    from transformers import CLIPTextModel as TorchCLIP

    root = sf.SHIPPED_MODELS / folder
    raw = {part: read_json(root / part / "config.json") for part in ("unet", "vae", "text_encoder")}
    unet = UNet2DConditionModel(UNetConfig.from_dict(raw["unet"]))
    vae = AutoencoderKL(VAEConfig.from_dict(raw["vae"]))
    text = CLIPTextModel(CLIPTextConfig.from_dict(raw["text_encoder"]))
    layout = sf.text_layout(text)
    checkpoint = {}
    for module, part, spec in ((unet, "unet", UNET), (vae, "vae", VAE), (text, layout, TEXT_ENCODER)):
        keymap = keymap_for(spec, module)
        for e in sf.component_entries(module, part, keymap):
            shape = ldm_keys.ldm_shape(e, keymap[e.diffusers_keys[0]].torch_shape)
            checkpoint[e.ldm_key] = torch.empty(shape, device="meta")
    real_names = {  # spot checks of names in the released checkpoints
        "model.diffusion_model.input_blocks.3.0.op.weight": None,
        "model.diffusion_model.output_blocks.2.1.conv.weight": None,
        "model.diffusion_model.output_blocks.5.2.conv.weight": None,
        "model.diffusion_model.output_blocks.8.2.conv.weight": None,
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": None,
        "first_stage_model.decoder.up.3.upsample.conv.weight": None,
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    }
    if layout == "openclip":
        real_names["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"] = (3072, 1024)
        real_names["cond_stage_model.model.positional_embedding"] = (77, 1024)
    else:
        real_names["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] = (768, 3072)
    for key, shape in real_names.items():
        assert key in checkpoint, key
        assert shape is None or tuple(checkpoint[key].shape) == shape, key

    def shapes(state):
        return {k: tuple(v.shape) for k, v in state.items()}

    clean = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        torch_unet = TorchUNet(**clean(raw["unet"]))
        torch_vae = TorchVAE(**clean(raw["vae"]))
        torch_text = TorchCLIP(TorchCLIPConfig(**clean(raw["text_encoder"])))
    assert shapes(su.convert_ldm_unet_checkpoint(checkpoint, clean(raw["unet"]))) == shapes(torch_unet.state_dict())
    assert shapes(su.convert_ldm_vae_checkpoint(checkpoint, clean(raw["vae"]))) == shapes(torch_vae.state_dict())
    if layout == "openclip":
        converted = su.convert_open_clip_checkpoint(torch_text, checkpoint)
    else:
        converted = su.convert_ldm_clip_checkpoint(checkpoint)
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    expected = {k: v for k, v in shapes(torch_text.state_dict()).items() if not k.endswith("position_ids")}
    assert shapes(converted) == expected


@pytest.mark.parametrize("case", ["sd1"], indirect=True)
def test_standard_architecture_is_assumed_without_config(case):
    """A tiny file read without config= is checked against the full-size SD architecture: one clear line."""
    with pytest.raises(ConversionError) as err:
        sf.load_single_file(case.path)
    message = str(err.value)
    assert "\n" not in message and "standard sd1 architecture" in message and "config=" in message


@pytest.mark.parametrize("case", ["sd1"], indirect=True)
def test_external_vae(case, tmp_path):
    """An LDM-layout VAE file (as vae-ft-mse-840000-ema-pruned, fp16, with training leftovers) or a diffusers
    VAE folder replaces the checkpoint's VAE; the reference is diffusers' converter on the same file."""
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers.loaders import single_file_utils as su
    from safetensors.torch import load_file

    other = build_vae(SMALL_VAE, seed=11)
    state = {k: v.numpy() for k, v in other.state_dict().items()}
    ldm = {
        e.ldm_key.removeprefix(ldm_keys.VAE_PREFIX): ldm_keys.to_ldm(e, [state[k] for k in e.diffusers_keys])
        for e in sf.component_entries(case.pipe.vae, "vae")
    }
    ldm["loss.logvar"] = np.zeros((), np.float32)
    vae_file = tmp_path / "vae-ft.safetensors"
    save_safetensors(vae_file, {k: v.astype(np.float16) for k, v in ldm.items()})
    other.save_pretrained(tmp_path / "vae_folder")

    ref = TorchVAE(**{k: v for k, v in other.config.items() if not k.startswith("_")}).eval()
    ref.load_state_dict(
        su.convert_ldm_vae_checkpoint({k: v.float() for k, v in load_file(vae_file).items()}, {**other.config})
    )
    z = np.random.default_rng(2).standard_normal((1, 8, 8, 4)).astype(np.float32)
    decode = lambda pipe: pipe.vae.apply({"params": pipe.params["vae"]}, z, method="decode")

    swapped = case.pipe.with_vae(vae_file)
    with torch.no_grad():
        assert rel_l2(decode(swapped), nhwc(ref.decode(nchw(z)).sample)) <= TOL
    assert swapped.params["unet"] is case.pipe.params["unet"]
    assert swapped.params["vae"] is not case.pipe.params["vae"]  # the original pipeline is unchanged

    from_folder = sdjax.load_pipeline(case.path, config=case.config, vae=tmp_path / "vae_folder")
    with torch.no_grad():
        assert rel_l2(decode(from_folder), nhwc(other.decode(nchw(z)).sample)) <= TOL


# ---------------------------------------------------------------------------------------------- bad files


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_truncated_file(case, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = case.path.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError) as err:
        sf.load_single_file(cut, config=case.config)
    assert "truncated" in _one_line(err)


def test_unknown_layouts(tmp_path):
    cases = {
        "sdxl": ({"conditioner.embedders.1.model.positional_embedding": np.zeros((77, 8), np.float32)}, "SDXL"),
        "diffusers": ({"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)}, "not a Stable Diffusion single-file"),
        "lora": ({"lora_unet_conv_in.lora_down.weight": np.zeros((4, 4, 3, 3), np.float32)}, "LoRA"),
        "pix2pix": (
            {
                "model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 8, 3, 3), np.float32),
                ldm_keys.CLIP_PREFIX + "embeddings.token_embedding.weight": np.zeros((10, 8), np.float32),
            },
            "8 input channels",
        ),
        "no_text": (
            {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3), np.float32)},
            "no SD 1.x or SD 2.x text encoder",
        ),
    }
    for name, (tensors, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_safetensors(path, tensors)
        with pytest.raises(tensor_files.CheckpointError) as err:
            sf.load_single_file(path)
        assert words in _one_line(err), name
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError) as err:
        sf.load_single_file(garbage)
    _one_line(err)


@pytest.mark.parametrize("case", ["sd1"], indirect=True)
def test_file_without_vae_needs_vae_argument(case, tmp_path):
    no_vae = tmp_path / "no_vae.safetensors"
    save_safetensors(no_vae, {k: v for k, v in case.tensors.items() if not k.startswith(ldm_keys.VAE_PREFIX)})
    with pytest.raises(tensor_files.CheckpointError) as err:
        sf.load_single_file(no_vae, config=case.config)
    assert "vae=" in _one_line(err)
    pipe = sf.load_single_file(no_vae, config=case.config, vae=case.path)  # a whole checkpoint as the VAE source
    for ours, theirs in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(case.pipe.params), strict=True):
        assert np.array_equal(ours, theirs)


def test_pickle_without_safe_loader(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}}, ckpt)
    monkeypatch.setitem(sys.modules, "torch", None)  # torch not installed
    with pytest.raises(tensor_files.CheckpointError) as err:
        tensor_files.read_checkpoint(ckpt)
    message = _one_line(err)
    assert "torch" in message and ".safetensors" in message


class _NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "callback": _NotATensor()}, ckpt)
    with pytest.raises(tensor_files.CheckpointError) as err:
        tensor_files.read_checkpoint(ckpt)
    assert "refuses" in _one_line(err)
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(tensor_files.CheckpointError) as err:
        tensor_files.read_checkpoint(truncated)
    assert "truncated or corrupt" in _one_line(err)


@pytest.mark.parametrize("case", ["sd2"], indirect=True)
def test_wrong_shapes_are_named(case, tmp_path):
    bad = dict(case.tensors)
    key = "model.diffusion_model.input_blocks.3.1.proj_in.weight"
    bad[key] = np.zeros(bad[key].shape + (1, 1), np.float32)  # an SD 1 conv projection in an SD 2 file
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, bad)
    with pytest.raises(ConversionError) as err:
        sf.load_single_file(path, config=case.config)
    assert key in _one_line(err)


def test_file_type_is_told_by_content(tmp_path):
    """A safetensors header size whose first byte looks like a pickle opcode (0x80), and a safetensors file
    named .ckpt, are still read as safetensors."""
    for pad in range(64):
        path = tmp_path / "x.ckpt"
        save_safetensors(path, {"betas": np.arange(3, dtype=np.float32)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header size starting with 0x80")
    assert not tensor_files.is_torch_pickle(path)
    np.testing.assert_array_equal(tensor_files.read_checkpoint(path)["betas"], np.arange(3, dtype=np.float32))
