"""Loading and saving the model components of a diffusers-format folder.

A folder holds `model_index.json` and one sub-folder per component: `unet/` and `vae/`
(`diffusion_pytorch_model[.fp16].safetensors`), `text_encoder/` (`model[.fp16].safetensors`), each with a
`config.json`, possibly sharded (`*.safetensors.index.json` + shards); and `tokenizer/`, `scheduler/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.convert.keymap import Entry, build_keymap, params_to_torch, torch_to_params
from sdjax.convert.safetensors_io import SafetensorsFile, save_safetensors
from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig

# The VAE mid-block attention of diffusers folders saved before 0.14 uses these names.
_LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """How one model component is stored: its folder, weight-file stem, config class and module class."""

    folder: str
    stem: str
    config_cls: type
    module_cls: type


UNET = ComponentSpec("unet", "diffusion_pytorch_model", UNetConfig, UNet2DConditionModel)
VAE = ComponentSpec("vae", "diffusion_pytorch_model", VAEConfig, AutoencoderKL)
TEXT_ENCODER = ComponentSpec("text_encoder", "model", CLIPTextConfig, CLIPTextModel)
MODEL_COMPONENTS = (UNET, VAE, TEXT_ENCODER)


class ShardedTensors(Mapping[str, np.ndarray]):
    """One mapping over the tensors of several safetensors files (the shards of one component)."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            shard = SafetensorsFile(path)
            for key in shard:
                if key in self._where:
                    raise ValueError(f"{path}: tensor {key!r} also appears in {self._where[key].path}")
                self._where[key] = shard

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def weight_files(directory: Path, stem: str, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of a component: the plain file, or `variant` (e.g. "fp16") when asked for
    or when it is the only one; a sharded index resolves to its shards."""
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        single = directory / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
        if single.is_file():
            return [single]
        index_names = (
            [f"{stem}.safetensors.index.{v}.json", f"{stem}.{v}.safetensors.index.json"]
            if v
            else [f"{stem}.safetensors.index.json"]
        )
        for name in index_names:
            index = directory / name
            if index.is_file():
                weight_map = read_json(index).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index} has no weight_map")
                return [directory / shard for shard in sorted(set(weight_map.values()))]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.ckpt"))
    if pickles:
        raise FileNotFoundError(
            f"{directory} holds only PyTorch pickle weights ({', '.join(pickles)}); sdjax reads .safetensors: "
            "convert them once with diffusers (`from_pretrained(...).save_pretrained(..., safe_serialization=True)`)"
        )
    wanted = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"
    raise FileNotFoundError(f"no weights in {directory}: expected {wanted} (or a sharded index)")


def abstract_params(module) -> dict:
    """Shapes and dtypes of every parameter of `module`, without allocating them."""
    variables = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())
    return variables["params"]


def keymap_for(spec: ComponentSpec, module) -> dict[str, Entry]:
    """The PyTorch-name -> parameter-path map of `module` (read-only: shared by every caller), remembered
    per architecture because building it traces the model (seconds for a real UNet)."""
    return _keymap_of(type(module), module.config, jnp.dtype(module.dtype))


@functools.lru_cache(maxsize=32)
def _keymap_of(module_cls, config, dtype) -> dict[str, Entry]:
    return build_keymap(abstract_params(module_cls(config, dtype=dtype)))


def _aliases(spec: ComponentSpec, keymap: Mapping[str, Entry], tensors: Mapping) -> dict[str, str]:
    """Other names the same tensors are saved under: `text_model.`-prefixed text encoders (transformers
    < 5 and real SD checkpoints) and the pre-0.14 diffusers VAE attention names."""
    if spec is TEXT_ENCODER:
        return {f"text_model.{k}": k for k in keymap}
    if spec is VAE:
        aliases = {}
        for key in tensors:
            parts = key.split(".")
            if len(parts) >= 3 and parts[-2] in _LEGACY_VAE_ATTENTION:
                aliases[key] = ".".join(parts[:-2] + [_LEGACY_VAE_ATTENTION[parts[-2]], parts[-1]])
        return aliases
    return {}


def _is_buffer(key: str) -> bool:
    """Non-parameter tensors some text-encoder files carry (transformers' position-id buffer)."""
    return key.endswith("embeddings.position_ids")


def load_component(root: Path, spec: ComponentSpec, dtype, variant: str | None = None) -> tuple[Any, dict]:
    """Reads `root/<folder>/config.json` and its weights -> (module, params) with params cast to `dtype`."""
    directory = root / spec.folder
    if not directory.is_dir():
        raise FileNotFoundError(f"{root} has no '{spec.folder}/' component folder")
    config = spec.config_cls.from_dict(read_json(directory / "config.json"), what=f"{directory}/config.json")
    module = spec.module_cls(config, dtype=dtype)
    keymap = keymap_for(spec, module)
    tensors = ShardedTensors(weight_files(directory, spec.stem, variant))
    params = torch_to_params(
        tensors,
        keymap,
        dtype,
        what=f"weights in {directory}",
        aliases=_aliases(spec, keymap, tensors),
        ignore=_is_buffer,
    )
    return module, params


def abstract_component(root: Path, spec: ComponentSpec, dtype) -> tuple[Any, dict]:
    """Reads `root/<folder>/config.json` only -> (module, params as `jax.ShapeDtypeStruct`s of `dtype`): the
    shapes `load_component` would fill (its conversion is total), for compiling before loading."""
    directory = root / spec.folder
    if not directory.is_dir():
        raise FileNotFoundError(f"{root} has no '{spec.folder}/' component folder")
    config = spec.config_cls.from_dict(read_json(directory / "config.json"), what=f"{directory}/config.json")
    module = spec.module_cls(config, dtype=dtype)
    shapes = abstract_params(module)
    return module, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def save_component(root: Path, spec: ComponentSpec, module, params, dtype=None) -> None:
    """Writes `root/<folder>/config.json` and the weights in the PyTorch layout diffusers/transformers load.

    The text encoder is written with the `text_model.` prefix that real SD folders use (transformers 4
    needs it; transformers 5 accepts it).
    """
    directory = root / spec.folder
    directory.mkdir(parents=True, exist_ok=True)
    keymap = keymap_for(spec, module)
    tensors = params_to_torch(params, keymap, dtype)
    config = module.config.to_dict()
    if spec is TEXT_ENCODER:
        tensors = {f"text_model.{k}": v for k, v in tensors.items()}
        config["torch_dtype"] = next(iter(tensors.values())).dtype.name
    save_safetensors(directory / f"{spec.stem}.safetensors", tensors, {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
