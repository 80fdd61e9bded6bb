"""Random-weight Stable Diffusion models of the real architectures, built without torch and cached on disk.

The configs and tokenizers are the ones shipped in `sdjax/data/models/`; weights are drawn with numpy
(norm scales near 1, small biases, kernels scaled by 1/sqrt(fan_in) so activations stay O(1)) and saved
once as a diffusers folder under the cache directory (`$SDJAX_BENCH_DIR`, default ~/.cache/sdjax/bench).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.tokenizer import CLIPTokenizer

DATA = Path(__file__).resolve().parents[1] / "data" / "models"
ARCHS = {
    "sd15": "stable-diffusion-v1-5",
    "sd21": "stable-diffusion-2-1",
    "sd21-base": "stable-diffusion-2-1-base",
    "tiny": "stable-diffusion-v1-5",
}
# The tiny architecture: SD 1.5's layout shrunk (two levels, 32/64 channels, a 4-level VAE of 8/16 channels).
TINY = {
    "unet": dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    ),
    "vae": dict(
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=4,
        sample_size=64,
    ),
    "text_encoder": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SDJAX_BENCH_DIR") or Path.home() / ".cache" / "sdjax" / "bench").expanduser()


def _random_like(tree, seed: int):
    """Random numpy arrays with the shapes of `tree` (abstract params), by leaf name and path."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        owner = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        shape = leaf.shape
        if name == "scale" or (name == "weight" and "norm" in owner):
            return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name == "embedding":
            return (0.5 * rng.standard_normal(shape)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, tree)


def random_pipeline(arch: str, seed: int = 0) -> StableDiffusionPipeline:
    """An in-memory pipeline of `arch` (see ARCHS) with random float32 weights."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    folder = DATA / ARCHS[arch]
    raw = {part: read_json(folder / part / "config.json") for part in ("unet", "vae", "text_encoder")}
    if arch == "tiny":
        raw = {part: {**TINY[part]} for part in raw}
        raw["text_encoder"]["vocab_size"] = 49408
    unet = UNet2DConditionModel(UNetConfig.from_dict(raw["unet"], what=f"{arch} unet"))
    vae = AutoencoderKL(VAEConfig.from_dict(raw["vae"], what=f"{arch} vae"))
    text = CLIPTextModel(CLIPTextConfig.from_dict(raw["text_encoder"], what=f"{arch} text encoder"))
    key = jax.random.key(0)
    size = unet.config.sample_size or 8
    latents = jnp.zeros((1, size, size, unet.config.in_channels))
    context = jnp.zeros((1, 77, unet.config.cross_attention_dim))
    shapes = {
        "unet": jax.eval_shape(lambda: unet.init(key, latents, jnp.zeros((1,)), context))["params"],
        "vae": jax.eval_shape(lambda: vae.init(key, jnp.zeros((1, 64, 64, 3)), method="encode"))["params"],
        "text_encoder": jax.eval_shape(lambda: text.init(key, jnp.zeros((1, 77), jnp.int32)))["params"],
    }
    vae_decoder = jax.eval_shape(
        lambda: vae.init(key, jnp.zeros((1, 8, 8, vae.config.latent_channels)), method="decode")
    )
    shapes["vae"] = {**shapes["vae"], **vae_decoder["params"]}
    params = {part: _random_like(tree, seed + i) for i, (part, tree) in enumerate(shapes.items())}
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        params=params,
        dtype=jnp.dtype(jnp.float32),
    )


def model_folder(arch: str) -> Path:
    """The cached diffusers folder of `arch`, built on first use (written to a temporary name, then renamed)."""
    target = cache_dir() / arch
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(f".{arch}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    random_pipeline(arch).save_pretrained(tmp)
    tmp.rename(target)
    return target
