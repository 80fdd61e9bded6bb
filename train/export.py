"""What a run leaves in OUTPUT/final/, in formats that sample.py and diffusers load.

full, dreambooth, vae   a diffusers folder (save_pretrained)
lora                    pytorch_lora_weights.safetensors (diffusers/PEFT keys, with the LoraConfig in the
                        header's lora_adapter_metadata) and pytorch_lora_weights_kohya.safetensors
                        (kohya-ss/A1111 keys with .alpha)
textual_inversion       learned_embeds.safetensors ({placeholder: (num_vectors, D)}, diffusers' format)
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from sdjax.convert.tensor_files import save_safetensors
from train.model import TEXT_LORA_TARGETS, Setup, trained_pipeline

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
EMBEDDINGS_FILE = "learned_embeds.safetensors"


def _torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sdjax LoRA factors -> PyTorch (down (r, in[, kh, kw]), up (out, r[, 1, 1]))."""
    if a.ndim == 2:
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    down = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    return down, np.ascontiguousarray(b.T[:, :, None, None])


def _module_name(part: str, path: str) -> str:
    dotted = path.replace("/", ".")
    return f"text_model.{dotted}" if part == "text_encoder" else dotted


def lora_tensors(lora: dict, rank: int, alpha: float) -> tuple[dict, dict, dict]:
    """(PEFT tensors, kohya tensors, PEFT header metadata) of trained LoRA factors."""
    peft, kohya, metadata = {}, {}, {}
    for part, modules in lora.items():
        targets = set()
        for path, factors in sorted(modules.items()):
            down, up = _torch_factors(np.asarray(factors["A"], np.float32), np.asarray(factors["B"], np.float32))
            name = _module_name(part, path)
            targets.add(path.split("/")[-1])
            peft[f"{part}.{name}.lora_A.weight"] = down
            peft[f"{part}.{name}.lora_B.weight"] = up
            prefix = "lora_unet_" if part == "unet" else "lora_te_"
            key = prefix + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = np.asarray(alpha, np.float32)
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "init_lora_weights": "gaussian"}
        metadata.update({f"{part}.{k}": v for k, v in config.items()})
    return peft, kohya, {"lora_adapter_metadata": json.dumps(metadata), "format": "pt"}


def export_final(setup: Setup, trainable: dict, directory: str | Path) -> Path:
    """Writes the run's result into `directory` (see the module doc); returns it."""
    cfg = setup.config
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    trainable = jax.device_get(trainable)
    if cfg.uses_lora:
        lora = cfg.adapter
        peft, kohya, metadata = lora_tensors(trainable["lora"], lora.rank, lora.alpha)
        save_safetensors(out / LORA_FILE, peft, metadata)
        save_safetensors(
            out / KOHYA_FILE, kohya, {"ss_network_dim": str(lora.rank), "ss_network_alpha": str(lora.alpha)}
        )
        return out
    if cfg.mode == "textual_inversion":
        vectors = np.asarray(trainable["embeddings"], np.float32)
        save_safetensors(out / EMBEDDINGS_FILE, {cfg.inversion.placeholder_token: vectors})
        return out
    trained_pipeline(setup, trainable).save_pretrained(out, dtype=cfg.outputs.export_dtype)
    return out


__all__ = ["EMBEDDINGS_FILE", "KOHYA_FILE", "LORA_FILE", "TEXT_LORA_TARGETS", "export_final", "lora_tensors"]
