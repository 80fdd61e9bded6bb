"""What a run leaves in OUTPUT/final/, in formats that sample.py and diffusers load.

full, dreambooth, vae   a diffusers folder (save_pretrained)
lora                    pytorch_lora_weights.safetensors (diffusers/PEFT keys, with the LoraConfig in the
                        header's lora_adapter_metadata) and pytorch_lora_weights_kohya.safetensors
                        (kohya-ss/A1111 keys with .alpha)
textual_inversion       learned_embeds.safetensors ({placeholder: (num_vectors, D)}, diffusers' format)
controlnet              a diffusers ControlNet folder (config.json, diffusion_pytorch_model.safetensors)
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from sdjax.convert.lora import lora_file_tensors
from sdjax.convert.tensor_files import save_safetensors
from train.model import TEXT_LORA_TARGETS, Setup, trained_controlnet, trained_pipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
EMBEDDINGS_FILE = "learned_embeds.safetensors"


def export_final(setup: Setup, trainable: dict, directory: str | Path) -> Path:
    """Writes the run's result into `directory` (see the module doc); returns it."""
    cfg = setup.config
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    trainable = jax.device_get(trainable)
    if cfg.uses_lora:
        lora = cfg.adapter
        peft, kohya, metadata = lora_file_tensors(trainable["lora"], lora.rank, lora.alpha, setup.pipe.unet.config)
        save_safetensors(out / LORA_FILE, peft, metadata)
        save_safetensors(
            out / KOHYA_FILE, kohya, {"ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha)}
        )
        return out
    if cfg.mode == "textual_inversion":
        vectors = np.asarray(trainable["embeddings"], np.float32)
        save_safetensors(out / EMBEDDINGS_FILE, {cfg.inversion.placeholder_token: vectors})
        return out
    if cfg.mode == "controlnet":
        trained_controlnet(setup, trainable).save_pretrained(out, dtype=cfg.outputs.export_dtype)
        return out
    trained_pipeline(setup, trainable).save_pretrained(out, dtype=cfg.outputs.export_dtype)
    return out


__all__ = ["EMBEDDINGS_FILE", "KOHYA_FILE", "LORA_FILE", "TEXT_LORA_TARGETS", "export_final"]
