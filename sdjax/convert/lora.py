"""LoRA files for the UNet and the text encoder(s): kohya-ss/A1111 and diffusers/PEFT formats, read and written.

A LoRA adds a low-rank update to linear and conv weights: in PyTorch layout
W' = W + scale * s_m * up_m @ down_m, with per module m a rank r_m, `down` (r, in[, kh, kw]) and `up`
(out, r[, 1, 1]), and s_m = alpha_m / r_m (alpha_m / sqrt(r_m) for PEFT's rsLoRA).

- kohya-ss / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha` (0-d; missing means
  alpha = rank), `lora_te_<module>...` for the text encoder (SDXL: `lora_te1_`, `lora_te2_`). `<module>` is
  the diffusers module path with
  "." replaced by "_"; it is matched against the model's own module names (and, for the UNet, their
  original LDM names), never split on "_".
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...` (with or
  without `text_model.`). No alpha is stored (alpha = rank) unless the safetensors header holds
  `lora_adapter_metadata` (PEFT's LoraConfig: lora_alpha, alpha_pattern, use_rslora).

A file becomes an adapter pytree (`lora_adapter`, every module matched to the model and shape-checked);
the adapter math (merging, or applying inside a compiled program) is `sdjax.nn.lora`'s. `lora_file_tensors`
writes factors back in both formats (what train/ exports).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert import ldm_keys
from sdjax.convert.parts import ModelParts
from sdjax.convert.tensor_files import check_finite, check_float, dtype_of, read_checkpoint

# SDXL's kohya files name the two text encoders lora_te1_ / lora_te2_ and the UNet's modules by their
# original (LDM) names (lora_unet_input_blocks_4_1_...), which the UNet lookup knows.
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}
_PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# Network types sdjax does not implement, recognised by a key fragment.
_UNSUPPORTED = {
    "hada_w1": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "lora_mid": "LoCon with a CP-decomposed mid weight (LyCORIS)",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "lora_embedding_A": "embedding LoRA",
    "lora_B.bias": "LoRA with bias",
    "processor.to_q_lora": "the pre-PEFT diffusers attention-processor format",
}


class LoraError(ValueError):
    """A LoRA file that cannot be applied: unknown format, unsupported network type, or a mismatch with the
    model (unknown module, wrong shapes), with a one-line message naming it."""


@dataclasses.dataclass(frozen=True, eq=False)
class LoraModule:
    """One module's update in PyTorch layout: down (r, in) or (r, in, kh, kw), up (out, r) or (out, r, 1, 1);
    `alpha` None means alpha = rank."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None = None
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def multiplier(self) -> float:
        """alpha / rank (alpha / sqrt(rank) for rsLoRA), the factor in front of up @ down."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: per component ("unet", "text_encoder"), the module name as written in the file
    (kohya: "down_blocks_0_..._to_q"; PEFT: "down_blocks.0....to_q") -> its update."""

    path: Path
    format: str  # "kohya" | "peft"
    modules: Mapping[str, Mapping[str, LoraModule]]


# ---------------------------------------------------------------------------------------------- reading


def _split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    for suffix, role in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _peft_config(metadata: Mapping[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """Per component, PEFT's LoraConfig fields from the `lora_adapter_metadata` header entry (or {})."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoraError(f"{path}: unreadable lora_adapter_metadata ({err})") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        out.setdefault(part, {})[field] = value
    return out


def _peft_alpha(name: str, config: Mapping[str, Any]) -> float | None:
    """alpha of module `name` under a PEFT LoraConfig: the first matching alpha_pattern, else lora_alpha."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        for candidate in (name, "text_model." + name):
            if re.match(rf"(.*\.)?({pattern})$", candidate):
                return float(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else float(alpha)


def _group(tensors: Mapping[str, np.ndarray], path: Path, fmt: str) -> dict[str, dict[str, dict[str, str]]]:
    """component -> module name -> {"down", "up", "alpha"} -> the file's key."""
    grouped: dict[str, dict[str, dict[str, str]]] = {}
    suffixes = _KOHYA_SUFFIXES if fmt == "kohya" else _PEFT_SUFFIXES
    for key in tensors:
        split = _split_key(key, suffixes)
        if split is None:
            raise LoraError(f"{path}: unexpected key {key} in a {fmt} LoRA file")
        name, role = split
        if fmt == "kohya":
            prefix = next((p for p in _KOHYA_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                raise LoraError(f"{path}: key {key} belongs to neither the UNet nor a text encoder")
            part, name = _KOHYA_PREFIXES[prefix], name[len(prefix) :]
        else:
            name = name.removeprefix("base_model.model.")
            prefix = next((p for p in _PEFT_PREFIXES if name.startswith(p)), None)
            part, name = (_PEFT_PREFIXES[prefix], name[len(prefix) :]) if prefix else ("unet", name)
            if part.startswith("text_encoder"):
                name = name.removeprefix("text_model.")
        grouped.setdefault(part, {}).setdefault(name, {})[role] = key
    return grouped


def _factor(tensors: Mapping[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    """A down or up weight as float32, refused when it is not a float tensor or holds NaN/Inf."""
    check_float(dtype_of(tensors, key), str(path), key)
    array = np.asarray(tensors[key], np.float32)
    check_finite(array, str(path), key)
    return array


def _alpha(tensors: Mapping[str, np.ndarray], key: str, path: Path) -> float:
    """A module's alpha (a 0-d tensor, float or integer: a number, not a weight), refused when NaN/Inf."""
    alpha = np.asarray(tensors[key], np.float64).reshape(())
    check_finite(alpha, str(path), key)
    return float(alpha)


def read_lora(path: str | Path) -> LoraFile:
    """Reads a kohya-ss/A1111 or diffusers/PEFT LoRA file (`.safetensors`; `.pt` through torch's safe loader).

    Raises `LoraError` (one line) for LyCORIS LoHa/LoKr, DoRA, unknown keys, a module with a
    down but no up weight (or the reverse), or ranks that disagree; `TensorDataError` for a weight that is
    not a float tensor or holds NaN/Inf.
    """
    path = Path(path).expanduser()
    tensors = read_checkpoint(path)
    keys = list(tensors)
    if not keys:
        raise LoraError(f"{path} holds no tensors")
    for fragment, kind in _UNSUPPORTED.items():
        if any(fragment in k for k in keys):
            raise LoraError(f"{path} is a {kind} file, which sdjax does not support")
    if any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in keys):
        fmt = "kohya"
    elif any(".lora_A." in k or ".lora_B." in k for k in keys):
        fmt = "peft"
    else:
        raise LoraError(f"{path} is not a LoRA file (no lora_down/lora_up or lora_A/lora_B keys; e.g. {keys[0]})")
    peft = _peft_config(getattr(tensors, "metadata", {}), path) if fmt == "peft" else {}
    for part, config in peft.items():
        if config.get("use_dora"):
            raise LoraError(f"{path} is a DoRA file ({part}.use_dora), which sdjax does not support")
    modules: dict[str, dict[str, LoraModule]] = {}
    for part, by_name in _group(tensors, path, fmt).items():
        for name, roles in by_name.items():
            if "down" not in roles or "up" not in roles:
                missing = "up" if "down" in roles else "down"
                raise LoraError(f"{path}: module {name} has no {missing} weight")
            down, up = _factor(tensors, roles["down"], path), _factor(tensors, roles["up"], path)
            if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
                raise LoraError(f"{path}: module {name} has down {down.shape} and up {up.shape} of different ranks")
            if "alpha" in roles:
                alpha = _alpha(tensors, roles["alpha"], path)
            elif fmt == "peft":
                alpha = _peft_alpha(name, peft.get(part, {}))
            else:
                alpha = None
            rslora = bool(peft.get(part, {}).get("use_rslora", False))
            modules.setdefault(part, {})[name] = LoraModule(down, up, alpha, rslora)
    return LoraFile(path, fmt, modules)


# ---------------------------------------------------------------------------------------------- matching


def _kernels(params: Mapping) -> dict[tuple[str, ...], tuple[int, ...]]:
    """module path -> kernel shape, for every linear (in, out) and conv (kh, kw, in, out) weight."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in key_path)
        if path[-1] == "kernel" and len(leaf.shape) in (2, 4):
            out[path[:-1]] = tuple(leaf.shape)
    return out


def _lookup(parts: ModelParts, part: str, kernels, fmt: str) -> dict[str, tuple[str, ...]]:
    """File module name -> module path. kohya: "." -> "_" of the diffusers name (text encoder with and
    without "text_model_"; UNet also by its LDM name). Ambiguous names are left out."""
    names: dict[str, set[tuple[str, ...]]] = {}

    def add(name: str, path: tuple[str, ...]) -> None:
        names.setdefault(name.replace(".", "_") if fmt == "kohya" else name, set()).add(path)

    for path in kernels:
        dotted = ".".join(path)
        add(dotted, path)
        if part.startswith("text_encoder") and fmt == "kohya":
            add("text_model." + dotted, path)
    if part == "unet" and fmt == "kohya":
        rules = ldm_keys.unet_rules(parts.unet.config)
        unnamed = ldm_keys.UNET_WITHOUT_LDM_NAME if parts.unet.config.addition_embed_type == "text" else ()
        by_dotted = {".".join(p): p for p in kernels if p[0] not in unnamed}
        for entry in ldm_keys.build_entries(rules, [d + ".weight" for d in by_dotted], ""):
            add(entry.ldm_key.removesuffix(".weight"), by_dotted[entry.diffusers_keys[0].removesuffix(".weight")])
    return {name: next(iter(paths)) for name, paths in names.items() if len(paths) == 1}


def _fit(module: LoraModule, kernel_shape: tuple[int, ...], name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) in sdjax layout with A @ B (contracting the rank) = up @ down laid out like the kernel:
    A (in, r) and B (r, out) for a linear kernel (in, out); A (kh, kw, in, r) for a conv kernel."""
    r = module.rank
    if len(kernel_shape) == 2:
        fan_in, out, kh, kw = kernel_shape[0], kernel_shape[1], 1, 1
    else:
        kh, kw, fan_in, out = kernel_shape
    down, up = module.down, module.up
    pointwise = ((r, fan_in), (r, fan_in, 1, 1)) if kh == kw == 1 else ()
    fits = (down.shape == (r, fan_in, kh, kw) or down.shape in pointwise) and up.shape in ((out, r), (out, r, 1, 1))
    if not fits:
        torch_shape = (out, fan_in) if len(kernel_shape) == 2 else (out, fan_in, kh, kw)
        raise LoraError(
            f"{path}: LoRA for {name} (down {down.shape}, up {up.shape}) does not fit the model's weight "
            f"{torch_shape}; is it made for another model (SD 1.x vs 2.x)?"
        )
    b = up.reshape(out, r).T
    if len(kernel_shape) == 2:
        return down.reshape(r, fan_in).T, b
    return down.reshape(r, fan_in, kh, kw).transpose(2, 3, 1, 0), b


def lora_adapter(parts: ModelParts, lora: LoraFile | str | Path) -> dict:
    """The LoRA as an adapter pytree (`sdjax.nn.lora`) for this model, every module matched and
    shape-checked: A and B float32 as described in `_fit`, `multiplier` = alpha / rank as an f32[] array.
    """
    lora = lora if isinstance(lora, LoraFile) else read_lora(lora)
    adapter: dict[str, dict[str, dict[str, jax.Array]]] = {}
    for part in lora.modules:
        if parts.params.get(part) is None:
            raise LoraError(
                f"{lora.path} has weights for {part}, which this model does not have (an SDXL LoRA on an SD 1.x/2.x "
                "model, or a base-model LoRA on a refiner?)"
            )
    for part, modules in lora.modules.items():
        kernels = _kernels(parts.params[part])
        lookup = _lookup(parts, part, kernels, lora.format)
        unknown = [name for name in modules if name not in lookup]
        if unknown:
            listing = ", ".join(sorted(unknown)[:3]) + (f", ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
            raise LoraError(f"{lora.path}: {part} has no module named {listing}")
        entries = {}
        for name, module in modules.items():
            path = lookup[name]
            a, b = _fit(module, kernels[path], name, lora.path)
            key = "/".join(path)
            if key in entries:
                raise LoraError(f"{lora.path}: two LoRA entries for {part} module {'.'.join(path)}")
            entries[key] = {
                "A": jnp.asarray(a, jnp.float32),
                "B": jnp.asarray(b, jnp.float32),
                "multiplier": jnp.asarray(module.multiplier, jnp.float32),
            }
        adapter[part] = entries
    return adapter


# ---------------------------------------------------------------------------------------------- writing


def _torch_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sdjax factors (the inverse of `_fit`) -> PyTorch (down (r, in[, kh, kw]), up (out, r[, 1, 1]))."""
    if a.ndim == 2:
        return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
    down = np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    return down, np.ascontiguousarray(b.T[:, :, None, None])


def lora_file_tensors(factors: Mapping, rank: int, alpha: float, unet_config=None) -> tuple[dict, dict, dict]:
    """(PEFT tensors, kohya tensors, PEFT header metadata) of LoRA factors of one rank and alpha.

    `factors` is {"unet": {path: {"A", "B"}}, "text_encoder": {...}} (SDXL: and "text_encoder_2") in the
    adapter layout of `sdjax.nn.lora`. PEFT keys are diffusers' (`unet.<module>.lora_A.weight`, the text
    encoders under `text_encoder[_2].text_model.`), with the LoraConfig (r, lora_alpha, target_modules) as
    the header's `lora_adapter_metadata`; kohya keys are `lora_unet_*` / `lora_te_*` with an `.alpha` each,
    for an SDXL UNet (`unet_config`) as sd-scripts names them: `lora_te1_`, `lora_te2_` and the UNet's
    original (SGM) module names.
    """
    sdxl = unet_config is not None and unet_config.addition_embed_type == "text_time"
    kohya_prefix = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    sgm = {}
    if sdxl:
        names = [p.replace("/", ".") + ".weight" for p in factors.get("unet", {})]
        sgm = {
            e.diffusers_keys[0]: e.ldm_key for e in ldm_keys.build_entries(ldm_keys.unet_rules(unet_config), names, "")
        }
    peft, kohya, metadata = {}, {}, {}
    for part, modules in factors.items():
        targets = set()
        for path, factor in sorted(modules.items()):
            down, up = _torch_factors(np.asarray(factor["A"], np.float32), np.asarray(factor["B"], np.float32))
            dotted = path.replace("/", ".")
            name = f"text_model.{dotted}" if part.startswith("text_encoder") else dotted
            targets.add(path.split("/")[-1])
            peft[f"{part}.{name}.lora_A.weight"] = down
            peft[f"{part}.{name}.lora_B.weight"] = up
            if part == "unet" and sdxl:
                name = sgm[dotted + ".weight"].removesuffix(".weight")
            key = kohya_prefix[part] + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = np.asarray(alpha, np.float32)
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets), "init_lora_weights": "gaussian"}
        metadata.update({f"{part}.{k}": v for k, v in config.items()})
    return peft, kohya, {"lora_adapter_metadata": json.dumps(metadata), "format": "pt"}


# ---------------------------------------------------------------------------------------------- finding

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def find_lora(name: str, lora_dir: str | Path) -> Path:
    """The file of a `<lora:name>` tag: `name` plus a LoRA suffix, under `lora_dir` or any sub-folder
    (A1111 searches recursively); `name` may include a sub-folder. One-line error if none or several."""
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"LoRA folder {root} does not exist")
    found = sorted(p for p in root.rglob("*") if p.suffix in LORA_SUFFIXES and p.is_file() and _matches(p, root, name))
    if not found:
        raise FileNotFoundError(f"no LoRA named {name!r} in {root} (looked for {', '.join(LORA_SUFFIXES)} files)")
    safetensors = [p for p in found if p.suffix == ".safetensors"]
    found = safetensors or found
    if len(found) > 1:
        raise ValueError(f"LoRA name {name!r} is ambiguous in {root}: {', '.join(str(p) for p in found)}")
    return found[0]


def _matches(path: Path, root: Path, name: str) -> bool:
    relative = path.relative_to(root).with_suffix("").as_posix()
    return relative == name or path.stem == name


__all__ = [
    "LORA_SUFFIXES",
    "LoraError",
    "LoraFile",
    "LoraModule",
    "find_lora",
    "lora_adapter",
    "lora_file_tensors",
    "read_lora",
]
