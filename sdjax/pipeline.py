"""A Stable Diffusion model as modules + plain parameter pytrees: loading and saving diffusers folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sdjax.convert.diffusers_folder import TEXT_ENCODER, UNET, VAE, load_component, save_component
from sdjax.nn.clip import CLIPTextModel
from sdjax.nn.config_utils import read_json
from sdjax.nn.unet import UNet2DConditionModel
from sdjax.nn.vae import AutoencoderKL
from sdjax.tokenizer import CLIPTokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _resolve_dtype(dtype) -> jnp.dtype:
    name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {list(_DTYPES)}")
    return jnp.dtype(_DTYPES[name])


@dataclasses.dataclass(frozen=True)
class StableDiffusionPipeline:
    """The modules (stateless Flax definitions) and their parameters, kept apart.

    `params` is {"unet": ..., "vae": ..., "text_encoder": ...}, nested dicts of arrays whose paths joined
    with "." are the diffusers/transformers state-dict names. Apply a module functionally, e.g.
    `pipe.unet.apply({"params": pipe.params["unet"]}, latents_BHWC, timesteps_B, context_BLD)`.
    """

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict[str, Any]
    params: dict[str, Any]
    dtype: jnp.dtype
    source: Path | None = None  # the folder it was loaded from (tokenizer files are copied from it)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return self.vae.config.downscale

    def save_pretrained(self, directory: str | Path, dtype=None) -> Path:
        """Writes a diffusers-format folder that diffusers/transformers `from_pretrained` load.

        Weights are stored in `dtype` (default: the pipeline's dtype) under the standard file names.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        store = None if dtype is None else _resolve_dtype(dtype)
        for spec, module in ((UNET, self.unet), (VAE, self.vae), (TEXT_ENCODER, self.text_encoder)):
            save_component(out, spec, module, self.params[spec.folder], store)
        self.tokenizer.save(out / "tokenizer")
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2) + "\n")
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", self.scheduler_config.get("_class_name", "PNDMScheduler")],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return out


def load_pipeline(path: str | Path | None = None, dtype=jnp.float32, variant: str | None = None):
    """Loads a diffusers-format Stable Diffusion folder (SD 1.x, 2.x, inpainting) without torch.

    Args:
      path: the folder holding `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
        `scheduler/`.
      dtype: parameter and compute dtype: float32 (parity mode), bfloat16 or float16.
      variant: weight-file variant to read (e.g. "fp16"); by default the plain files, else fp16 ones.
    """
    if path is None:
        raise ValueError("no model path given: pass the path of a diffusers-format Stable Diffusion folder")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"model path {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"{root} is a file; load_pipeline expects a diffusers-format folder")
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    dtype = _resolve_dtype(dtype)
    modules, params = {}, {}
    for spec in (UNET, VAE, TEXT_ENCODER):
        modules[spec.folder], params[spec.folder] = load_component(root, spec, dtype, variant)
    for folder in ("tokenizer", "scheduler"):
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root} has no '{folder}/' component folder")
    return StableDiffusionPipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_folder(root / "tokenizer"),
        scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
        params=params,
        dtype=dtype,
        source=root,
    )


__all__ = ["StableDiffusionPipeline", "load_pipeline"]
