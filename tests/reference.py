"""PyTorch reference models (diffusers/transformers) with random weights, saved as diffusers folders.

Every parameter is drawn at random, norm scales and biases included (no parameter may hide at 1 or 0),
with weights scaled by 1/sqrt(fan_in) so activations stay O(1) through deep stacks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sdjax import testing  # noqa: E402
from sdjax.convert.tensor_files import save_safetensors  # noqa: E402

DATA = testing.DATA
SD15 = DATA / "stable-diffusion-v1-5"
SD21 = DATA / "stable-diffusion-2-1"


# The shared tiny architectures (sdjax.testing); the reference CLIP configs pool at the largest token id
# (eos_token_id 2, transformers' legacy rule), as diffusers' own tests do.
TINY_UNET, TINY_VAE, SMALL_UNET, SMALL_VAE, MICRO_UNET = (
    dict(c) for c in (testing.TINY_UNET, testing.TINY_VAE, testing.SMALL_UNET, testing.SMALL_VAE, testing.MICRO_UNET)
)
TINY_CLIP = dict(testing.TINY_CLIP, eos_token_id=2)
SMALL_CLIP = dict(testing.SMALL_CLIP, eos_token_id=2)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fills every parameter of `model` with seeded random values (in place) and returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.ndim == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif "embedding" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = int(np.prod(p.shape[1:]))
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def build_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return randomize_(UNet2DConditionModel(**_clean(config)), seed)


def build_vae(config: dict, seed: int = 1):
    from diffusers import AutoencoderKL

    return randomize_(AutoencoderKL(**_clean(config)), seed)


def build_text_encoder(config: dict, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    return randomize_(CLIPTextModel(CLIPTextConfig(**_clean(config))), seed)


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def save_folder(
    root: Path,
    unet,
    vae,
    text_encoder,
    tokenizer_from: Path = SD15,
    scheduler_from: Path = SD15,
) -> Path:
    """Saves the three torch models as a diffusers folder with the tokenizer/scheduler of a real model."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    text_encoder.save_pretrained(root / "text_encoder")
    for folder, src in (("tokenizer", tokenizer_from), ("scheduler", scheduler_from)):
        if (root / folder).exists():
            shutil.rmtree(root / folder)
        shutil.copytree(src / folder, root / folder)
    index = json.loads((SD15 / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_same_images_but_rounding(actual, desired, err_msg: str = "") -> None:
    """uint8 images of a run over several CPU devices against one device's: the same but for float rounding.
    Each device runs one device's program on its own images, yet XLA:CPU in a process that runs 8 devices at
    once rounds a few values 1 ulp apart on some hosts (bit-identical on the earlier sessions' host; on an
    AMD EPYC (Zen 3) one: 1 to 6 of 98,304 values one level apart). So: the same shape, at most one level
    apart, in at most 0.1% of the values (a wrong per-image key or a misplaced image changes most of them)."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, (actual.shape, desired.shape, err_msg)
    diff = np.abs(actual.astype(np.int32) - desired.astype(np.int32))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-3 * diff.size, (
        f"{err_msg}: {np.count_nonzero(diff)} of {diff.size} values differ, by up to {diff.max()}"
    )


def nchw(x_nhwc) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return x_nchw.detach().numpy().transpose(0, 2, 3, 1)


def lora_targets(torch_model) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of every linear/conv layer a LoCon-style kohya LoRA trains."""
    out = {}
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and name not in ("conv_in", "conv_out"):
            if not name.startswith("time_embedding"):
                out[name] = tuple(m.weight.shape)
    return out


def kohya_lora_file(path: Path, torch_models: dict, seed: int, alpha=lambda rng, name: 2.0, names=None) -> Path:
    """A kohya LoRA over every linear and conv layer: rank 4, rank 2 for 3x3 convs (as LoCon files), up
    weights non-zero. `alpha(rng, name)` gives each module's alpha (None: no alpha key, so alpha = rank)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for prefix, part in (("lora_unet_", "unet"), ("lora_te_text_model_", "text_encoder")):
        for name, shape in lora_targets(torch_models[part]).items():
            rank = 2 if len(shape) == 4 and shape[2] == 3 else 4
            fan_in = int(np.prod(shape[1:]))
            key = prefix + (names or {}).get(name, name).replace(".", "_")
            down_shape = (rank,) + shape[1:]
            up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
            tensors[key + ".lora_down.weight"] = rng.standard_normal(down_shape, dtype=np.float32) / fan_in**0.5
            tensors[key + ".lora_up.weight"] = 0.2 * rng.standard_normal(up_shape, dtype=np.float32)
            value = alpha(rng, name)
            if value is not None:
                tensors[key + ".alpha"] = np.array(value, np.float16)  # real files often store fp16 alphas
    save_safetensors(path, tensors)
    return path
