"""ControlNet weights: diffusers folders and the single files users download (lllyasviel's
`control_v11p_sd15_canny.safetensors` / `.pth`: the LDM names under `control_model.`, or bare as in
thibaud's SD 2.1 files), both into (ControlNetModel, params).

A single file's architecture is the shipped SD 1.5 or SD 2.1 ControlNet config (sdjax/data/models), chosen
by the width of its cross-attention keys, with `in_channels` and `conditioning_channels` read off its
tensors; or the config.json of a folder the caller names. `.pth` files go through torch's safe loader only
(`tensor_files.read_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdjax.convert import ldm_keys
from sdjax.convert.diffusers_folder import CONTROLNET, load_controlnet_folder, params_as_shapes
from sdjax.convert.keymap import params_to_torch
from sdjax.convert.single_file import (
    SHIPPED_MODELS,
    _check_file,
    _convert,
    _expected_shapes,
    _is_skipped,
    _keymap,
    _refuse_pickle,
)
from sdjax.convert.tensor_files import CheckpointError, read_checkpoint, shape_of
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.nn.controlnet import ControlNetConfig, ControlNetModel

# cross-attention width of a file -> the shipped config of that family
_CONFIG_BY_CONTEXT_WIDTH = {768: "controlnet-sd15", 1024: "controlnet-sd21"}
_ATTN2_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def load_controlnet(
    path: str | Path, dtype, config: str | Path | None = None, *, weights: bool = True
) -> tuple[ControlNetModel, dict]:
    """A diffusers ControlNet folder or a single ControlNet file -> (module, params in `dtype`). `config`
    (a folder with config.json, or the file itself) overrides a single file's detected architecture.
    `weights=False` reads a folder's config.json, or checks a `.safetensors` file's names and shapes (its
    header), and returns the params as `jax.ShapeDtypeStruct`s; a `.pth`/`.ckpt` pickle is refused."""
    path = Path(path).expanduser()
    if path.is_dir():
        return load_controlnet_folder(path, dtype, weights=weights)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet {path} does not exist")
    if not weights:
        _refuse_pickle(path)
    return _load_file(path, resolve_dtype(dtype), config, weights)


def _strip_prefix(tensors: Mapping[str, np.ndarray], path: Path) -> str:
    """The prefix of the file's ControlNet keys ("control_model." or ""), or a one-line error."""
    keys = set(tensors)
    if any(k.startswith(ldm_keys.CONTROLNET_PREFIX) for k in keys):
        return ldm_keys.CONTROLNET_PREFIX
    if "time_embed.0.weight" in keys and "input_hint_block.0.weight" in keys:
        return ""
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        raise CheckpointError(
            f"{path} holds a ControlNet in diffusers' names: load the folder of it and its config.json"
        )
    raise CheckpointError(f"{path} is not a ControlNet file (no control_model.* or input_hint_block.* keys)")


def _file_config(tensors: Mapping[str, np.ndarray], prefix: str, path: Path, config) -> ControlNetConfig:
    if config is not None:
        folder = Path(config).expanduser()
        folder = folder if folder.is_dir() else folder.parent
        return ControlNetConfig.from_dict(read_json(folder / "config.json"), what=f"{folder}/config.json")
    if any(k.startswith(prefix + "label_emb.") for k in tensors):
        raise CheckpointError(f"{path} is an SDXL ControlNet; sdjax's ControlNets are for SD 1.x and 2.x")
    key = prefix + _ATTN2_KEY
    width = shape_of(tensors, key)[1] if key in tensors else None
    if width not in _CONFIG_BY_CONTEXT_WIDTH:
        raise CheckpointError(
            f"{path}: cannot tell the ControlNet's architecture (cross-attention width {width}); pass the folder "
            "of its config.json"
        )
    raw = read_json(SHIPPED_MODELS / _CONFIG_BY_CONTEXT_WIDTH[width] / "config.json")
    raw["in_channels"] = shape_of(tensors, prefix + "input_blocks.0.0.weight")[1]
    raw["conditioning_channels"] = shape_of(tensors, prefix + "input_hint_block.0.weight")[1]
    return ControlNetConfig.from_dict(raw, what=f"the shipped {_CONFIG_BY_CONTEXT_WIDTH[width]} config")


def _load_file(path: Path, dtype, config, weights: bool) -> tuple[ControlNetModel, dict]:
    tensors = read_checkpoint(path)
    prefix = _strip_prefix(tensors, path)
    module = ControlNetModel(_file_config(tensors, prefix, path, config), dtype=dtype)
    keymap = _keymap(CONTROLNET, module)
    entries = ldm_keys.build_entries(ldm_keys.controlnet_rules(module.config), list(keymap), prefix)

    def skip(key: str) -> bool:
        return not key.startswith(prefix) or _is_skipped(key) or key.startswith("lora_")

    _check_file(tensors, _expected_shapes(entries, keymap), skip, f"ControlNet file {path}")
    if not weights:
        return module, params_as_shapes(module, dtype)
    return module, _convert(tensors, entries, keymap, dtype, f"ControlNet file {path}")


def to_single_file_tensors(module: ControlNetModel, params, dtype=None) -> dict[str, np.ndarray]:
    """The ControlNet's tensors under lllyasviel's `control_model.` names (what `load_controlnet` reads)."""
    keymap = _keymap(CONTROLNET, module)
    torch_named = params_to_torch(params, keymap, dtype)
    entries = ldm_keys.build_entries(ldm_keys.controlnet_rules(module.config), list(keymap), ldm_keys.CONTROLNET_PREFIX)
    return {e.ldm_key: ldm_keys.to_ldm(e, [torch_named[k] for k in e.diffusers_keys]) for e in entries}
