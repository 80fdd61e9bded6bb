"""A Stable Diffusion model as its parts: what every format reader returns and every writer takes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.nn.clip import CLIPTextModel
from sdjax.nn.unet import UNet2DConditionModel
from sdjax.nn.vae import AutoencoderKL
from sdjax.tokenizer import CLIPTokenizer


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The modules (stateless Flax definitions) and their parameters, kept apart, with the tokenizer and the
    scheduler config.

    `params` is {"unet": ..., "vae": ..., "text_encoder": ...} (SDXL: and "text_encoder_2"), nested dicts
    of arrays whose paths joined with "." are the diffusers/transformers state-dict names. Apply a module
    functionally, e.g.
    `parts.unet.apply({"params": parts.params["unet"]}, latents_BHWC, timesteps_B, context_BLD)`.
    `sdjax.StableDiffusionPipeline` is these parts with the generation and loading methods.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None  # None: an SDXL refiner (text_encoder_2 only)
    tokenizer: CLIPTokenizer | None
    scheduler_config: dict[str, Any]
    params: dict[str, Any]
    dtype: jnp.dtype
    source: Path | None = None  # the folder or file it was loaded from
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer, and two settings of
    # diffusers' SDXL pipelines (model_index.json): zero unconditional embeddings when no negative prompt
    # is given, and micro-conditioning by aesthetic score instead of target size (the refiner)
    text_encoder_2: CLIPTextModel | None = None
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False

    @property
    def is_sdxl(self) -> bool:
        """Whether the UNet takes SDXL's pooled text embedding and micro-conditioning ("text_time")."""
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downscale
