"""Random-weight models of the real architectures, for tests, benchmarks and quick training runs (no torch).

One home for the shrunk architectures every test file and the tiny runs share (the same shapes reuse
compiled programs), and for `random_pipeline`: the configs and tokenizers shipped in `sdjax/data/models/`
with weights drawn by numpy (norm scales near 1, small biases, kernels scaled by 1/sqrt(fan_in) so
activations stay O(1) through deep stacks; no parameter hides at exactly 0 or 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.diffusers_folder import MODEL_COMPONENTS, TEXT_ENCODER_2, abstract_params
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.tokenizer import CLIPTokenizer

DATA = Path(__file__).resolve().parent / "data" / "models"

# The tiny architecture: SD 1.5's layout shrunk (two levels, 32/64 channels), a VAE with SD's 8x downscale
# (4 levels of 8/16 channels) and a 2-layer CLIP text encoder of width 32.
TINY_UNET: Mapping[str, Any] = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8,
)
TINY_VAE: Mapping[str, Any] = dict(
    block_out_channels=[8, 8, 16, 16],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    norm_num_groups=4,
    sample_size=64,
)
TINY_CLIP: Mapping[str, Any] = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
# The smaller SD 1.x structure of the checkpoint-format tests (single file, LoRA, textual inversion).
SMALL_UNET: Mapping[str, Any] = dict(TINY_UNET, block_out_channels=[16, 32], attention_head_dim=2)
SMALL_VAE: Mapping[str, Any] = dict(
    block_out_channels=[8, 16],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=4,
    latent_channels=4,
    sample_size=32,
)
SMALL_CLIP: Mapping[str, Any] = TINY_CLIP
# The smallest SD 1.x structure: a one-level UNet (a cross-attention down block without downsampler, the
# mid block, a cross-attention up block), for tests of what does not depend on the UNet's levels (the
# sampling loop, guidance, the training step): XLA compile time, which dominates the test suite, grows with
# the number of layers, not their width (README "Tests"). MICRO adds a 2x VAE (8x8 latents of 16x16
# images) and a one-layer text encoder.
MICRO_UNET: Mapping[str, Any] = dict(
    TINY_UNET,
    block_out_channels=[32],
    down_block_types=["CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D"],
)
MICRO_VAE: Mapping[str, Any] = dict(SMALL_VAE, sample_size=16)
MICRO_CLIP: Mapping[str, Any] = dict(TINY_CLIP, num_hidden_layers=1)
# The tiny SDXL: SDXL base's layout shrunk (DownBlock2D first, 1/2 transformer layers, linear projections,
# time ids through add_embedding), a 16-wide first and a 32-wide projecting second text encoder.
TINY_SDXL_UNET: Mapping[str, Any] = dict(
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[2, 4],
    transformer_layers_per_block=[1, 2],
    cross_attention_dim=16 + 32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
    norm_num_groups=8,
    sample_size=8,
)
# The tiny SDXL refiner: the second encoder's states alone, aesthetic score instead of the target size.
TINY_SDXL_REFINER_UNET: Mapping[str, Any] = dict(
    TINY_SDXL_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8
)
TINY_SDXL_CLIP: Mapping[str, Any] = dict(
    hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"
)
TINY_SDXL_CLIP_2: Mapping[str, Any] = dict(
    architectures=["CLIPTextModelWithProjection"],
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    hidden_act="gelu",
    projection_dim=24,
)

# Named architectures: a shipped config folder, or the tiny configs (with SD 1.5's tokenizer and scheduler).
ARCHS = {
    "sd15": "stable-diffusion-v1-5",
    "sd21": "stable-diffusion-2-1",
    "sd21-base": "stable-diffusion-2-1-base",
    "tiny": "stable-diffusion-v1-5",
    "micro": "stable-diffusion-v1-5",
    "sdxl": "stable-diffusion-xl-base-1.0",
    "sdxl-refiner": "stable-diffusion-xl-refiner-1.0",
    "tiny-sdxl": "stable-diffusion-xl-base-1.0",
}
TINY = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoder": TINY_CLIP}
MICRO = {"unet": MICRO_UNET, "vae": MICRO_VAE, "text_encoder": MICRO_CLIP}
TINY_SDXL = {
    "unet": TINY_SDXL_UNET,
    "vae": TINY_VAE,
    "text_encoder": TINY_SDXL_CLIP,
    "text_encoder_2": TINY_SDXL_CLIP_2,
}


def random_like(tree, seed: int):
    """Random float32 numpy arrays with the shapes of `tree` (abstract params), drawn by leaf name."""
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


def random_pipeline(
    arch: str | Mapping[str, Mapping[str, Any]], seed: int = 0, *, base: str = "stable-diffusion-v1-5"
) -> StableDiffusionPipeline:
    """An in-memory float32 pipeline with random weights (component k drawn with seed + k).

    `arch` is a name of ARCHS, or {"unet": config, "vae": config, "text_encoder": config} dicts (diffusers
    config.json keys; SDXL: and "text_encoder_2", with `base` an SDXL folder); the tokenizer(s) and
    scheduler config are those of the shipped folder `base`.
    """
    pipe = abstract_pipeline(arch, base=base)
    params = {
        part: jax.tree.map(jnp.asarray, random_like(shapes, seed + i))
        for i, (part, shapes) in enumerate(pipe.params.items())
    }
    return dataclasses.replace(pipe, params=params)


def abstract_pipeline(
    arch: str | Mapping[str, Mapping[str, Any]], dtype=jnp.float32, *, base: str = "stable-diffusion-v1-5"
) -> StableDiffusionPipeline:
    """A pipeline of `arch` (as `random_pipeline`) whose parameters are `jax.ShapeDtypeStruct`s of `dtype`:
    enough to lower and compile its programs (for any target) without a byte of weights."""
    if isinstance(arch, str):
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        folder = DATA / ARCHS[arch]
        tiny = {"tiny": TINY, "micro": MICRO, "tiny-sdxl": TINY_SDXL}.get(arch)
        if tiny is not None:
            raw = {part: dict(config) for part, config in tiny.items()}
        else:
            raw = {
                name: read_json(folder / name / "config.json")
                for name in ("unet", "vae", "text_encoder", "text_encoder_2")
                if (folder / name).is_dir()
            }
        label = arch
    else:
        folder, raw, label = DATA / base, {part: dict(config) for part, config in arch.items()}, "random"
    dtype = resolve_dtype(dtype)
    modules, params = {}, {}
    sdxl, first = "text_encoder_2" in raw, "text_encoder" in raw
    modules["text_encoder"] = None
    for spec in [s for s in MODEL_COMPONENTS + (TEXT_ENCODER_2,) if s.folder in raw]:
        config = spec.config_cls.from_dict(raw[spec.folder], what=f"{label} {spec.folder}")
        modules[spec.folder] = spec.module_cls(config, dtype=dtype)
        shapes = abstract_params(modules[spec.folder])
        params[spec.folder] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), shapes)
    index = read_json(folder / "model_index.json")
    return StableDiffusionPipeline(
        **modules,
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer") if first else None,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        params=params,
        dtype=dtype,
        tokenizer_2=CLIPTokenizer.from_folder(folder / "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )


__all__ = [
    "ARCHS",
    "DATA",
    "MICRO",
    "MICRO_CLIP",
    "MICRO_UNET",
    "MICRO_VAE",
    "SMALL_CLIP",
    "SMALL_UNET",
    "SMALL_VAE",
    "TINY_CLIP",
    "TINY_SDXL",
    "TINY_SDXL_CLIP",
    "TINY_SDXL_CLIP_2",
    "TINY_SDXL_REFINER_UNET",
    "TINY_SDXL_UNET",
    "TINY_UNET",
    "TINY_VAE",
    "abstract_pipeline",
    "random_like",
    "random_pipeline",
]
