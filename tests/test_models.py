"""Parity of the Flax UNet, VAE and CLIP text encoder with diffusers/transformers on random weights.

Each case builds PyTorch reference models from a small config, saves them as a diffusers folder, loads
the folder with `sdjax.load_pipeline` and compares outputs in fp32 (relative L2 error <= 1e-5). Together
the configs cover every supported UNet option.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import TINY_UNET, build_text_encoder, build_unet, build_vae, nchw, nhwc, rel_l2, save_folder

import sdjax

TOL = 1e-5

UNET_CONFIGS = {
    # SD 1.x style: heads as one int, conv projections, 4 input channels.
    "sd1": dict(TINY_UNET, sample_size=16),
    # SD 2.x style: per-block heads, linear projections, upcast attention, 9-channel inpainting input,
    # no sin/cos flip with a frequency shift, two transformer layers, per-block only_cross_attention.
    "sd2_inpaint": dict(
        block_out_channels=[32, 48, 64],
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4, 8],
        cross_attention_dim=24,
        use_linear_projection=True,
        upcast_attention=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        in_channels=9,
        out_channels=4,
        norm_num_groups=16,
        norm_eps=1e-6,
        transformer_layers_per_block=2,
        only_cross_attention=[False, True, False],
        sample_size=16,
    ),
    # The remaining options: only_cross_attention everywhere, centred input, mid-block scale factor,
    # another activation, a per-block layer count, a wider time embedding and the pooled text added to it.
    "options": dict(
        block_out_channels=[16, 32],
        layers_per_block=[1, 2],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 4],
        cross_attention_dim=16,
        only_cross_attention=True,
        center_input_sample=True,
        mid_block_scale_factor=1.414,
        act_fn="mish",
        norm_num_groups=4,
        time_embedding_dim=48,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        sample_size=8,
    ),
}

VAE_CONFIGS = {
    "two_blocks": dict(
        block_out_channels=[16, 32],
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=32,
    ),
    "no_attention_no_quant": dict(
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        norm_num_groups=4,
        latent_channels=4,
        scaling_factor=0.13025,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        sample_size=32,
    ),
}

CLIP_CONFIGS = {
    # SD 1.x: quick_gelu, old eos_token_id (pooled at the largest id).
    "sd1": dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="quick_gelu",
        eos_token_id=2,
    ),
    # SD 2.x: gelu, real eos id.
    "sd2": dict(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=6,
        hidden_act="gelu",
        eos_token_id=49407,
        layer_norm_eps=1e-6,
    ),
}

CASES = {  # folder name -> (unet, vae, clip) config names
    "sd1": ("sd1", "two_blocks", "sd1"),
    "sd2_inpaint": ("sd2_inpaint", "no_attention_no_quant", "sd2"),
    "options": ("options", "two_blocks", "sd2"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, torch unet, torch vae, torch text encoder, folder, sdjax pipeline) for one config set."""
    u, v, c = CASES[request.param]
    unet = build_unet(UNET_CONFIGS[u])
    vae = build_vae(VAE_CONFIGS[v])
    text = build_text_encoder(CLIP_CONFIGS[c])
    folder = save_folder(tmp_path_factory.mktemp(request.param), unet, vae, text)
    return request.param, unet, vae, text, folder, sdjax.load_pipeline(folder)


def unet_inputs(unet, seed=0, batch=2):
    cfg = unet.config
    rng = np.random.default_rng(seed)
    size = cfg.sample_size
    x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
    t = np.array([3.0, 981.0, 500.0, 17.5][:batch], np.float32)
    ctx = rng.standard_normal((batch, 77, cfg.cross_attention_dim)).astype(np.float32)
    return x, t, ctx


def torch_unet(unet, x, t, ctx):
    with torch.no_grad():
        return nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)


def test_unet_matches_diffusers(case):
    _, unet, _, _, _, pipe = case
    x, t, ctx = unet_inputs(unet)
    ours = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx)
    assert ours.shape == x.shape[:3] + (unet.config.out_channels,)
    assert rel_l2(ours, torch_unet(unet, x, t, ctx)) <= TOL


def test_unet_without_jit_and_scalar_timestep(case):
    name, unet, _, _, _, pipe = case
    if name != "sd1":
        pytest.skip("one config is enough for the eager path")
    x, _, ctx = unet_inputs(unet)
    ours = pipe.unet.apply({"params": pipe.params["unet"]}, x, jnp.float32(250), ctx)
    ref = torch_unet(unet, x, np.array([250.0, 250.0], np.float32), ctx)
    assert rel_l2(ours, ref) <= TOL


def test_vae_matches_diffusers(case):
    _, _, vae, _, _, pipe = case
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    mean, logvar = jax.jit(lambda p, x: pipe.vae.apply({"params": p}, x, method="encode"))(pipe.params["vae"], img)
    with torch.no_grad():
        dist = vae.encode(nchw(img)).latent_dist
    assert rel_l2(mean, nhwc(dist.mean)) <= TOL
    assert rel_l2(logvar, nhwc(dist.logvar)) <= TOL

    z = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    image = jax.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method="decode"))(pipe.params["vae"], z)
    with torch.no_grad():
        ref = nhwc(vae.decode(nchw(z)).sample)
    assert image.shape == ref.shape
    assert rel_l2(image, ref) <= TOL
    assert pipe.vae.config.scaling_factor == vae.config.scaling_factor


def clip_ids(seed=0, batch=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 49406, (batch, 77))
    ids[:, 0] = 49406
    ids[0, 9:] = 49407  # EOS then EOS-padding (SD 1.x)
    ids[1, 20] = 49407  # EOS then "!"-padding (SD 2.x)
    ids[1, 21:] = 0
    ids[2, 76] = 49407
    return ids


def test_text_encoder_matches_transformers(case):
    _, _, _, text, _, pipe = case
    ids = clip_ids()
    out = jax.jit(pipe.text_encoder.apply)({"params": pipe.params["text_encoder"]}, ids)
    with torch.no_grad():
        ref = text(torch.from_numpy(ids), output_hidden_states=True)
    assert rel_l2(out[0], ref.last_hidden_state) <= TOL
    assert rel_l2(out.pooler_output, ref.pooler_output) <= TOL
    assert len(out.hidden_states) == len(ref.hidden_states) == text.config.num_hidden_layers + 1
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert rel_l2(ours, theirs) <= TOL


def test_round_trip_export(case, tmp_path):
    """load -> save_pretrained -> diffusers/transformers from_pretrained -> the same outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    _, unet, vae, text, _, pipe = case
    out = pipe.save_pretrained(tmp_path / "export")
    unet2 = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    vae2 = AutoencoderKL.from_pretrained(out / "vae").eval()
    text2 = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    x, t, ctx = unet_inputs(unet, seed=5)
    assert rel_l2(torch_unet(unet2, x, t, ctx), torch_unet(unet, x, t, ctx)) == 0.0
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae2.decode(z).sample, vae.decode(z).sample)
        ids = torch.from_numpy(clip_ids())
        assert torch.equal(text2(ids).last_hidden_state, text(ids).last_hidden_state)
    again = sdjax.load_pipeline(out)
    for ours, theirs in zip(jax.tree.leaves(again.params), jax.tree.leaves(pipe.params), strict=True):
        assert np.array_equal(ours, theirs)
    assert again.unet.config == pipe.unet.config
    assert again.vae.config == pipe.vae.config
    assert again.text_encoder.config == pipe.text_encoder.config


def test_num_attention_heads_names_the_head_count(case, tmp_path):
    """`num_attention_heads` (which diffusers itself refuses) overrides the misnamed attention_head_dim."""
    name, unet, _, _, folder, pipe = case
    if name != "sd2_inpaint":
        pytest.skip("one config is enough")
    import shutil

    copy = tmp_path / "heads"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    cfg["num_attention_heads"], cfg["attention_head_dim"] = cfg["attention_head_dim"], 1
    (copy / "unet" / "config.json").write_text(json.dumps(cfg))
    pipe2 = sdjax.load_pipeline(copy)
    x, t, ctx = unet_inputs(unet)
    ours = jax.jit(pipe2.unet.apply)({"params": pipe2.params["unet"]}, x, t, ctx)
    assert rel_l2(ours, torch_unet(unet, x, t, ctx)) <= TOL


def test_half_precision_load(case):
    """bfloat16 and float16 parameters give the fp32 result within half-precision error."""
    name, unet, _, _, folder, pipe = case
    if name != "sd1":
        pytest.skip("one config is enough")
    x, t, ctx = unet_inputs(unet)
    ref = torch_unet(unet, x, t, ctx)
    for dtype in (jnp.bfloat16, jnp.float16):
        half = sdjax.load_pipeline(folder, dtype=dtype)
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(half.params))
        out = jax.jit(half.unet.apply)({"params": half.params["unet"]}, x, t, ctx)
        assert out.dtype == dtype
        assert rel_l2(np.asarray(out, np.float32), ref) < 0.05


def test_unet_sizes_not_divisible_by_the_downsampling(case):
    """Latent sizes like 65 (520 px) upsample to each skip's size, as diffusers' forward_upsample_size."""
    name, unet, _, _, _, pipe = case
    if name != "sd2_inpaint":
        pytest.skip("one config (three levels) is enough")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 11, unet.config.in_channels)).astype(np.float32)
    t = np.array([400.0], np.float32)
    ctx = rng.standard_normal((1, 77, unet.config.cross_attention_dim)).astype(np.float32)
    ours = jax.jit(pipe.unet.apply)({"params": pipe.params["unet"]}, x, t, ctx)
    assert rel_l2(ours, torch_unet(unet, x, t, ctx)) <= TOL


def test_text_addition_embedding_has_no_single_file_layout(case, tmp_path):
    """A UNet with addition_embed_type "text" refuses single-file export with a one-line error; kohya LoRA
    names still cover it (the embedding keeps its diffusers-style name)."""
    name, _, _, _, _, pipe = case
    if name != "options":
        pytest.skip("the config with the text addition embedding")
    with pytest.raises(ValueError, match="addition_embed_type 'text' has no single-file"):
        pipe.save_single_file(tmp_path / "model.safetensors")
    from sdjax.convert.lora import _kernels, _lookup

    names = _lookup(pipe, "unet", _kernels(pipe.params["unet"]), "kohya")
    assert names["add_embedding_pool_q_proj"] == ("add_embedding", "pool", "q_proj")
