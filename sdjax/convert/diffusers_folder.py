"""Loading and saving diffusers-format folders: the model components, tokenizer and scheduler config.

A folder holds `model_index.json` and one sub-folder per component: `unet/` and `vae/`
(`diffusion_pytorch_model[.fp16].safetensors`), `text_encoder/` (`model[.fp16].safetensors`), each with a
`config.json`, possibly sharded (`*.safetensors.index.json` + shards); and `tokenizer/`, `scheduler/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from sdjax import files
from sdjax.convert.keymap import Entry, TorchTensors, build_keymap, torch_to_params
from sdjax.convert.param_shapes import abstract_params
from sdjax.convert.parts import ModelParts
from sdjax.convert.tensor_files import ShardedTensors, save_safetensors
from sdjax.convert.textual_inversion import restore_multi_vector
from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.nn.controlnet import ControlNetConfig, ControlNetModel
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig
from sdjax.tokenizer import CLIPTokenizer

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
TEXT_ENCODER_2 = ComponentSpec("text_encoder_2", "model", CLIPTextConfig, CLIPTextModel)  # SDXL's second
# a ControlNet folder holds config.json and its weights at the top (folder "")
CONTROLNET = ComponentSpec("", "diffusion_pytorch_model", ControlNetConfig, ControlNetModel)


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
    if spec.config_cls is CLIPTextConfig:
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
    return module, params_as_shapes(module, dtype)


def params_as_shapes(module, dtype) -> dict:
    """The parameters a total conversion fills for `module`, as `jax.ShapeDtypeStruct`s of `dtype` (nothing
    allocated): what a program is compiled against before the weights are read."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), abstract_params(module))


def save_component(root: Path, spec: ComponentSpec, module, params, dtype=None) -> None:
    """Writes `root/<folder>/config.json` and the weights in the PyTorch layout diffusers/transformers load.

    The text encoder is written with the `text_model.` prefix that real SD folders use (transformers 4
    needs it; transformers 5 accepts it).
    """
    directory = root / spec.folder
    directory.mkdir(parents=True, exist_ok=True)
    keymap = keymap_for(spec, module)
    tensors = TorchTensors(params, keymap, dtype)  # converted one at a time while written
    config = module.config.to_dict()
    if spec.config_cls is CLIPTextConfig:  # CLIPTextModelWithProjection keeps text_projection at the top
        tensors = tensors.renamed(lambda k: k if k.startswith("text_projection.") else f"text_model.{k}")
        config["torch_dtype"] = tensors.dtype(next(iter(tensors))).name
    save_safetensors(directory / f"{spec.stem}.safetensors", tensors, {"format": "pt"})
    files.write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


def load_controlnet_folder(
    root: Path, dtype, variant: str | None = None, *, weights: bool = True
) -> tuple[ControlNetModel, dict]:
    """A diffusers ControlNet folder (config.json of `ControlNetModel` + diffusion_pytorch_model.safetensors)
    -> (module, params cast to `dtype`); `weights=False` reads config.json alone (params as shapes)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ControlNet folder {root} does not exist")
    config = read_json(root / "config.json")
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ValueError(f"{root} holds a {config['_class_name']}, not a ControlNetModel")
    if not weights:
        return abstract_component(root, CONTROLNET, resolve_dtype(dtype))
    return load_component(root, CONTROLNET, resolve_dtype(dtype), variant)


def load_folder(root: Path, dtype, variant: str | None = None, *, weights: bool = True) -> ModelParts:
    """The parts of a diffusers-format folder, parameters cast to `dtype`; `weights=False` reads only the
    configs (parameters as `jax.ShapeDtypeStruct`s, enough to compile)."""
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(f"{root} is not a diffusers model folder (no model_index.json)")
    index = read_json(root / "model_index.json")
    dtype = resolve_dtype(dtype)
    sdxl = _listed(index, "text_encoder_2")
    first = not sdxl or _listed(index, "text_encoder")  # an SDXL refiner has text_encoder_2 only
    modules, params = {"text_encoder": None}, {}
    for spec in _components(first, sdxl):
        if weights:
            modules[spec.folder], params[spec.folder] = load_component(root, spec, dtype, variant)
        else:
            modules[spec.folder], params[spec.folder] = abstract_component(root, spec, dtype)
    if modules["unet"].config.addition_embed_type == "text_time" and not sdxl:
        raise ValueError(f"{root} has an SDXL UNet but model_index.json names no text_encoder_2")
    folders = (("tokenizer",) if first else ()) + ("scheduler",) + (("tokenizer_2",) if sdxl else ())
    for folder in folders:
        if not (root / folder).is_dir():
            raise FileNotFoundError(f"{root} has no '{folder}/' component folder")
    if sdxl and modules["text_encoder_2"].config.projection_dim is None:
        raise ValueError(
            f"{root}/text_encoder_2 is a CLIPTextModel; SDXL's second encoder is a CLIPTextModelWithProjection"
        )
    return ModelParts(
        **modules,
        tokenizer=restore_multi_vector(CLIPTokenizer.from_folder(root / "tokenizer")) if first else None,
        scheduler_config=read_json(root / "scheduler" / "scheduler_config.json"),
        params=params,
        dtype=dtype,
        source=root,
        tokenizer_2=restore_multi_vector(CLIPTokenizer.from_folder(root / "tokenizer_2")) if sdxl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score", False)),
    )


def _components(first: bool, second: bool) -> tuple[ComponentSpec, ...]:
    """The model components of a folder: UNet, VAE, and the text encoders it has."""
    return (UNET, VAE) + ((TEXT_ENCODER,) if first else ()) + ((TEXT_ENCODER_2,) if second else ())


def _listed(index: dict, component: str) -> bool:
    """Whether model_index.json names a component (an entry of [library, class], not [null, null])."""
    entry = index.get(component)
    return isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is not None


def save_folder(out: Path, parts: ModelParts, dtype=None) -> Path:
    """Writes `parts` as a diffusers-format folder that diffusers/transformers `from_pretrained` load, the
    weights in `dtype` (default: the parts' dtype) under the standard file names. Every file is written
    atomically (`sdjax.files`), model_index.json last."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = None if dtype is None else resolve_dtype(dtype)
    for spec in model_components(parts):
        save_component(out, spec, getattr(parts, spec.folder), parts.params[spec.folder], store)
    return save_folder_index(out, parts)


def model_components(parts: ModelParts) -> tuple[ComponentSpec, ...]:
    """The weight components of a pipeline: UNet, VAE and its text encoders."""
    return _components(parts.text_encoder is not None, parts.text_encoder_2 is not None)


def save_folder_index(out: Path, parts: ModelParts) -> Path:
    """Writes what a diffusers folder holds besides the weights: tokenizer(s), scheduler config and, last,
    model_index.json (the components' weights must be written before: `save_component`)."""
    sdxl, first = parts.text_encoder_2 is not None, parts.text_encoder is not None
    if first:
        parts.tokenizer.save(out / "tokenizer")
    if sdxl:
        parts.tokenizer_2.save(out / "tokenizer_2")
    (out / "scheduler").mkdir(exist_ok=True)
    files.write_text(out / "scheduler" / "scheduler_config.json", json.dumps(parts.scheduler_config, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", parts.scheduler_config.get("_class_name", "PNDMScheduler")],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if sdxl:
        index.update(
            _class_name="StableDiffusionXLImg2ImgPipeline" if not first else "StableDiffusionXLPipeline",
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        )
        if not first:
            index.update(text_encoder=[None, None], tokenizer=[None, None], requires_aesthetics_score=True)
        elif parts.requires_aesthetics_score:
            index["requires_aesthetics_score"] = True
        for key in ("feature_extractor", "requires_safety_checker", "safety_checker"):
            del index[key]
    files.write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")  # last: the folder is complete
    return out
