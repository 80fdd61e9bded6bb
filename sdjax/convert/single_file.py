"""Single-file Stable Diffusion checkpoints (CompVis / Stability / A1111 layout): detect, load, export.

A single `.safetensors` (or, through torch's safe loader only, `.ckpt`/`.pt`) file holds the UNet, the VAE
and the text encoder under their original names (`sdjax.convert.ldm_keys`). It brings no tokenizer and no
scheduler, and the weights cannot tell some architecture settings (attention heads, v-prediction): those
come from a diffusers-format config folder, either the user's (`config=DIR`: config.json files, tokenizer
and scheduler, no weights needed) or one shipped with sdjax for the detected model type:

| detected from the weights                   | shipped config used                                |
|---------------------------------------------|----------------------------------------------------|
| SD 1.x (`cond_stage_model.transformer.*`)   | stable-diffusion-v1-5                              |
| SD 1.x, 9-channel UNet input                | stable-diffusion-inpainting                        |
| SD 2.x (`cond_stage_model.model.*`)         | stable-diffusion-2-1 (768, v-prediction), or       |
|                                             | stable-diffusion-2-1-base with prediction_type="epsilon" |
| SD 2.x, 9-channel UNet input                | stable-diffusion-2-1-base with in_channels 9 (epsilon)  |

v-prediction cannot be seen in the weights; as diffusers' `from_single_file`, SD 2.x files default to
v-prediction (the 768 model) and everything else to epsilon; `prediction_type=` overrides it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sdjax.convert import ldm_keys
from sdjax.convert.diffusers_folder import (
    TEXT_ENCODER,
    UNET,
    VAE,
    abstract_component,
    keymap_for,
    load_component,
    params_as_shapes,
)
from sdjax.convert.keymap import ConversionError, TorchTensors, listing, torch_to_params
from sdjax.convert.parts import ModelParts
from sdjax.convert.tensor_files import (
    CheckpointError,
    dtype_of,
    is_torch_pickle,
    origin_of,
    read_checkpoint,
    save_safetensors,
    shape_of,
)
from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig
from sdjax.schedulers import with_prediction_type
from sdjax.tokenizer import CLIPTokenizer

SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"

# (model type, prediction_type or None) -> (shipped config folder, overrides of its UNet config).
_DEFAULT_CONFIGS: dict[tuple[str, str | None], tuple[str, dict[str, Any]]] = {
    ("sd1", None): ("stable-diffusion-v1-5", {}),
    ("sd1-inpainting", None): ("stable-diffusion-inpainting", {}),
    ("sd2", None): ("stable-diffusion-2-1", {}),  # diffusers' default for SD 2 files: 768 v-prediction
    ("sd2", "epsilon"): ("stable-diffusion-2-1-base", {}),
    ("sd2-inpainting", None): ("stable-diffusion-2-1-base", {"in_channels": 9}),
    ("sdxl", None): ("stable-diffusion-xl-base-1.0", {}),
    ("sdxl-refiner", None): ("stable-diffusion-xl-refiner-1.0", {}),
}

# Text-encoder layout of an export, from the activation (OpenAI CLIP: quick_gelu; OpenCLIP ViT-H: gelu).
_TEXT_LAYOUT_BY_ACTIVATION = {"quick_gelu": "clip", "gelu": "openclip"}


# ---------------------------------------------------------------------------------------------- detection


def _clip_prefix(keys: set[str]) -> str | None:
    for prefix in (ldm_keys.CLIP_PREFIX, "cond_stage_model.transformer."):
        if prefix + "embeddings.token_embedding.weight" in keys:
            return prefix
    return None


def _examples(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") if keys else "none"


def _sdxl_type(tensors, keys: set[str], name: str) -> str:
    """ "sdxl" (CLIP-L + OpenCLIP bigG) or "sdxl-refiner" (bigG alone, as embedder 0)."""
    label = ldm_keys.UNET_PREFIX + "label_emb.0.0.weight"
    conv_in = ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight"
    if label not in keys or conv_in not in keys:
        raise CheckpointError(f"{name} has SDXL text encoders (conditioner.embedders.*) but no SDXL UNet ({label})")
    shape = getattr(tensors, "shape", lambda k: tensors[k].shape)
    if tuple(shape(conv_in))[1] != 4:
        raise CheckpointError(f"{name}: SDXL UNets with {tuple(shape(conv_in))[1]} input channels are not supported")
    return "sdxl-refiner" if ldm_keys.sdxl_openclip_prefix(0) + "token_embedding.weight" in keys else "sdxl"


def detect_model_type(tensors: Mapping[str, np.ndarray], name: str = "checkpoint") -> str:
    """ "sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl" or "sdxl-refiner" from the keys and shapes
    of a single file.

    SD 1.x holds an OpenAI CLIP (`cond_stage_model.transformer.*`), SD 2.x an OpenCLIP text tower
    (`cond_stage_model.model.*`), SDXL both under `conditioner.embedders.*` (the refiner the OpenCLIP one
    alone); inpainting UNets take 9 input channels. Anything else (LoRAs, diffusers-layout files,
    instruct-pix2pix, upscalers) raises a one-line `CheckpointError`.
    """
    keys = set(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return _sdxl_type(tensors, keys, name)
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k or ".lora_down." in k for k in keys):
        raise CheckpointError(f"{name} is a LoRA, not a model checkpoint: apply it to a pipeline with load_lora")
    conv_in = ldm_keys.UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in keys:
        raise CheckpointError(
            f"{name} is not a Stable Diffusion single-file checkpoint (no {conv_in}; keys: {_examples(keys)})"
        )
    shape = getattr(tensors, "shape", lambda k: tensors[k].shape)
    in_channels = tuple(shape(conv_in))[1]
    if _clip_prefix(keys) is not None:
        base = "sd1"
    elif ldm_keys.OPENCLIP_PREFIX + "token_embedding.weight" in keys:
        base = "sd2"
    else:
        raise CheckpointError(
            f"{name} has no SD 1.x or SD 2.x text encoder (cond_stage_model.transformer.* or cond_stage_model.model.*)"
        )
    if in_channels == 4:
        return base
    if in_channels == 9:
        return base + "-inpainting"
    raise CheckpointError(
        f"{name} has a UNet with {in_channels} input channels (instruct-pix2pix: 8, upscaler: 7); "
        "sdjax loads text-to-image (4) and inpainting (9) models"
    )


# ---------------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class _Configs:
    unet: UNetConfig
    vae: VAEConfig
    text_encoder: CLIPTextConfig | None  # None: an SDXL refiner
    tokenizer_dir: Path | None
    scheduler: dict[str, Any]
    text_encoder_2: CLIPTextConfig | None = None  # SDXL
    tokenizer_2_dir: Path | None = None
    index: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # model_index.json


def _read_configs(folder: Path, unet_overrides: Mapping[str, Any], prediction_type: str | None) -> _Configs:
    """Architecture configs, tokenizer folder(s) and scheduler config of a diffusers folder (weights not
    read); SDXL folders have text_encoder_2/ and tokenizer_2/ too, refiners those alone."""
    sdxl = (folder / "text_encoder_2").is_dir()
    first = not sdxl or (folder / "text_encoder").is_dir()
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    needed += ["text_encoder/config.json", "tokenizer"] if first else []
    needed += ["text_encoder_2/config.json", "tokenizer_2"] if sdxl else []
    for name in needed:
        if not (folder / name).exists():
            raise FileNotFoundError(f"config folder {folder} has no {name}")
    unet = {**read_json(folder / "unet" / "config.json"), **unet_overrides}
    scheduler = with_prediction_type(read_json(folder / "scheduler" / "scheduler_config.json"), prediction_type)

    def text(name: str) -> CLIPTextConfig:
        return CLIPTextConfig.from_dict(read_json(folder / name / "config.json"), what=f"{folder}/{name}/config.json")

    index = folder / "model_index.json"
    return _Configs(
        unet=UNetConfig.from_dict(unet, what=f"{folder}/unet/config.json"),
        vae=VAEConfig.from_dict(read_json(folder / "vae" / "config.json"), what=f"{folder}/vae/config.json"),
        text_encoder=text("text_encoder") if first else None,
        tokenizer_dir=folder / "tokenizer" if first else None,
        scheduler=scheduler,
        text_encoder_2=text("text_encoder_2") if sdxl else None,
        tokenizer_2_dir=folder / "tokenizer_2" if sdxl else None,
        index=read_json(index) if index.is_file() else {},
    )


def default_config_folder(model_type: str, prediction_type: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The shipped config folder (and UNet config overrides) for a detected model type."""
    folder, overrides = _DEFAULT_CONFIGS.get((model_type, prediction_type)) or _DEFAULT_CONFIGS[(model_type, None)]
    return SHIPPED_MODELS / folder, overrides


# ---------------------------------------------------------------------------------------------- key maps


def text_layout(text_encoder: CLIPTextModel) -> str:
    """ "clip" (SD 1.x, OpenAI CLIP) or "openclip" (SD 2.x), from the text encoder's activation."""
    act = text_encoder.config.hidden_act
    if act not in _TEXT_LAYOUT_BY_ACTIVATION:
        raise CheckpointError(f"no single-file layout for a text encoder with hidden_act={act!r}")
    return _TEXT_LAYOUT_BY_ACTIVATION[act]


_SPECS = {"unet": UNET, "vae": VAE, "clip": TEXT_ENCODER, "openclip": TEXT_ENCODER}  # (key maps: one per class)


@functools.lru_cache(maxsize=32)
def _keymap_cached(spec, module_cls, config, dtype) -> dict:
    return keymap_for(spec, module_cls(config, dtype=dtype))


def _keymap(spec, module) -> dict:
    """`keymap_for`, remembered per architecture (building it traces the model). Read-only."""
    return _keymap_cached(spec, type(module), module.config, jnp.dtype(module.dtype))


def component_entries(
    module, layout: str, keymap: Mapping | None = None, clip_prefix: str | None = None
) -> list[ldm_keys.LdmEntry]:
    """The LDM entries of one sdjax module: layout "unet", "vae", "clip" or "openclip" (`keymap`: the
    module's `keymap_for`, if already built; `clip_prefix`: a text encoder's prefix in the file, default
    SD 1.x's / SD 2.x's)."""
    keys = list(keymap if keymap is not None else _keymap(_SPECS[layout], module))
    if layout == "unet":
        if module.config.addition_embed_type not in (None, "text_time"):
            raise ValueError(
                f"a UNet with addition_embed_type {module.config.addition_embed_type!r} has no single-file (LDM) "
                "layout; save it as a diffusers folder (save_pretrained) instead"
            )
        return ldm_keys.build_entries(ldm_keys.unet_rules(module.config), keys, ldm_keys.UNET_PREFIX)
    if layout == "vae":
        return ldm_keys.build_entries(ldm_keys.vae_rules(module.config), keys, ldm_keys.VAE_PREFIX)
    if layout == "clip":
        return ldm_keys.build_entries(None, keys, clip_prefix or ldm_keys.CLIP_PREFIX)
    rules = ldm_keys.openclip_rules(module.config.num_hidden_layers, module.config.projection_dim is not None)
    return ldm_keys.build_entries(rules, keys, clip_prefix or ldm_keys.OPENCLIP_PREFIX)


class _DiffusersView(Mapping[str, np.ndarray]):
    """The diffusers-named tensors of one component: views of the LDM-named file's tensors, memory-mapped
    where the file allows (`SafetensorsFile.mapped`), so that a conversion reads each byte once (a fused
    q/k/v tensor too: each third is a slice of the map) and, like a folder's, on several threads."""

    def __init__(self, tensors: Mapping[str, np.ndarray], entries: list[ldm_keys.LdmEntry]):
        self._tensors = tensors
        self._where = {k: (e, i) for e in entries for i, k in enumerate(e.diffusers_keys) if e.ldm_key in tensors}
        self._read = getattr(tensors, "mapped", tensors.__getitem__)
        self.thread_safe = getattr(tensors, "thread_safe", False)

    def __getitem__(self, key: str) -> np.ndarray:
        entry, slot = self._where[key]
        return ldm_keys.to_diffusers(entry, self._read(entry.ldm_key), slot)

    mapped = __getitem__  # a view either way: the converter's layout change or cast is its one copy

    def __contains__(self, key: object) -> bool:  # Mapping's default converts the tensor
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        entry, _ = self._where[key]
        return ldm_keys.diffusers_shape(entry, shape_of(self._tensors, entry.ldm_key))

    def dtype(self, key: str) -> np.dtype:
        return dtype_of(self._tensors, self._where[key][0].ldm_key)

    def origin(self, key: str) -> tuple[str, str]:
        """(file, LDM name) of the tensor a diffusers-named one is taken from, for messages."""
        ldm_key = self._where[key][0].ldm_key
        return origin_of(self._tensors, ldm_key, "checkpoint")

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _check_file(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    skip,
    name: str,
) -> None:
    """Every tensor of the file used or known to be skippable, every expected tensor present with its shape."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected and not skip(k)]
    wrong = [
        f"{k} {shape_of(tensors, k)} (expected {expected[k]})"
        for k in expected
        if k in tensors and shape_of(tensors, k) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {listing(missing, 6)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {listing(unexpected, 6)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {listing(wrong, 3)}")
    if problems:
        raise ConversionError(f"{name} does not fit the model: " + "; ".join(problems))


def _expected_shapes(entries: list[ldm_keys.LdmEntry], keymap: Mapping) -> dict[str, tuple[int, ...]]:
    return {e.ldm_key: ldm_keys.ldm_shape(e, keymap[e.diffusers_keys[0]].torch_shape) for e in entries}


def _is_skipped(key: str) -> bool:
    return key in ldm_keys.SKIP_KEYS or key.startswith(ldm_keys.SKIP_PREFIXES)


def _extra_openclip_block(tensors: Mapping[str, np.ndarray], num_layers: int):
    """SD 2 files hold one OpenCLIP resblock more than diffusers uses (the last; SD 2 takes the penultimate
    layer's output). A predicate for its keys, when the file has exactly that one block more."""
    prefix = f"{ldm_keys.OPENCLIP_PREFIX}transformer.resblocks.{num_layers}."
    beyond = f"{ldm_keys.OPENCLIP_PREFIX}transformer.resblocks.{num_layers + 1}."
    if any(k.startswith(beyond) for k in tensors):
        return lambda key: False
    return lambda key: key.startswith(prefix)


def _convert(tensors, entries, keymap, dtype, what: str) -> dict:
    return torch_to_params(_DiffusersView(tensors, entries), keymap, dtype, what=what)


# ---------------------------------------------------------------------------------------------- VAE


def _vae_layout(keys: set[str]) -> str | None:
    if "encoder.down.0.block.0.conv1.weight" in keys:
        return "ldm"
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        return "diffusers"
    return None


def load_vae(
    source: str | Path, config: VAEConfig, dtype=jnp.float32, *, weights: bool = True
) -> tuple[AutoencoderKL, dict]:
    """An external VAE -> (module, params).

    `source` is a diffusers VAE folder (its own config.json decides the architecture), a diffusers model
    folder with a `vae/` sub-folder, or a weight file in the LDM layout (`encoder.down.0.block.0...`, e.g.
    vae-ft-mse-840000-ema-pruned.safetensors, optionally under `first_stage_model.`; a whole SD checkpoint
    works too) or in the diffusers layout; a file is read with `config` as its architecture. `weights=False`
    returns the params as `jax.ShapeDtypeStruct`s, after checking a file's names and shapes (its header).
    """
    source = Path(source).expanduser()
    read = load_component if weights else abstract_component
    if source.is_dir():
        if (source / "vae" / "config.json").is_file():
            return read(source, VAE, dtype)
        if (source / "config.json").is_file():
            return read(source.parent, dataclasses.replace(VAE, folder=source.name), dtype)
        raise FileNotFoundError(f"VAE folder {source} has neither config.json nor vae/config.json")
    if not weights:
        _refuse_pickle(source)
    tensors = read_checkpoint(source)
    prefixed = any(k.startswith(ldm_keys.VAE_PREFIX) for k in tensors)
    strip = ldm_keys.VAE_PREFIX if prefixed else ""
    keys = {k[len(strip) :] for k in tensors if k.startswith(strip)}
    layout = _vae_layout(keys)
    if layout is None:
        raise CheckpointError(f"{source} is not a VAE file (no encoder.down.* or encoder.down_blocks.* keys)")
    module = AutoencoderKL(config, dtype=dtype)
    keymap = _keymap(VAE, module)
    if layout == "ldm":
        entries = ldm_keys.build_entries(ldm_keys.vae_rules(config), list(keymap), strip)
        expected = _expected_shapes(entries, keymap)
    else:
        entries = [ldm_keys.LdmEntry(strip + k, (k,), "copy") for k in keymap]
        expected = {strip + k: e.torch_shape for k, e in keymap.items()}

    def skip(key: str) -> bool:
        inner = key[len(strip) :] if key.startswith(strip) else None
        return inner is None or _is_skipped(key) or inner.startswith(ldm_keys.VAE_FILE_SKIP_PREFIXES)

    _check_file(tensors, expected, skip, f"VAE file {source}")
    if not weights:
        return module, params_as_shapes(module, dtype)
    return module, _convert(tensors, entries, keymap, dtype, f"VAE file {source}")


def _refuse_pickle(path: Path) -> None:
    """Shapes-only loading (`weights=False`) reads headers; a PyTorch pickle has none (it is read whole), so
    it is refused before it is read."""
    if path.is_file() and is_torch_pickle(path):
        raise ValueError(f"weights=False needs a .safetensors file; {path} is a PyTorch pickle, read whole on load")


# ---------------------------------------------------------------------------------------------- load / save


def load_single_file(
    path: str | Path,
    *,
    config: str | Path | None = None,
    dtype=jnp.float32,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
    weights: bool = True,
) -> ModelParts:
    """The parts of an SD 1.x / 2.x / inpainting / SDXL (base, refiner) single-file checkpoint.

    Args:
      path: `.safetensors` (read tensor by tensor), or `.ckpt`/`.pt` through torch.load(weights_only=True).
      config: a diffusers-format folder whose config.json files, tokenizer/ and scheduler/ decide the
        architecture (no weights needed); default: the shipped config of the detected model type.
      dtype: parameter dtype (float32, bfloat16, float16); fp16 files are cast.
      prediction_type: "epsilon", "v_prediction" or "sample", written into the scheduler config; default:
        the config's (SD 2.x: v_prediction, else epsilon). For SD 2.x, "epsilon" selects the 512 "base" config.
      vae: an external VAE replacing the file's (see `load_vae`); needed when the file has none.
      weights: False checks the file's names and shapes (its header) but reads no tensor: the params are
        `jax.ShapeDtypeStruct`s, enough to compile before loading. `.safetensors` files only.
    Raises:
      CheckpointError (unknown layout, unsupported UNet, pickle without torch), ConversionError
      (tensors that do not fit the architecture, all named), each with a one-line message.
    """
    path = Path(path).expanduser()
    dtype = resolve_dtype(dtype)
    with_prediction_type({}, prediction_type)  # checks the name before the file is read
    if not weights:
        _refuse_pickle(path)
    tensors = read_checkpoint(path)
    model_type = detect_model_type(tensors, str(path))
    if config is not None:
        folder, overrides = Path(config).expanduser(), {}
        if not folder.is_dir():
            raise FileNotFoundError(f"config folder {folder} does not exist")
    else:
        folder, overrides = default_config_folder(model_type, prediction_type)
    cfg = _read_configs(folder, overrides, prediction_type)
    if model_type.startswith("sdxl") != (cfg.text_encoder_2 is not None):
        raise CheckpointError(f"{path} is a {model_type} checkpoint but config {folder} is not of that family")

    modules = {"unet": UNet2DConditionModel(cfg.unet, dtype=dtype), "vae": AutoencoderKL(cfg.vae, dtype=dtype)}
    for part in ("text_encoder", "text_encoder_2"):
        if getattr(cfg, part) is not None:
            modules[part] = CLIPTextModel(getattr(cfg, part), dtype=dtype)
    keys = set(tensors)
    layouts = {"unet": ("unet", None), "vae": ("vae", None)}
    layouts.update(_text_layouts(modules, model_type.startswith("sd2"), _clip_prefix(keys)))
    if vae is not None:
        del layouts["vae"]  # the file's VAE, if any, is replaced
    elif not any(k.startswith(ldm_keys.VAE_PREFIX) for k in keys):
        raise CheckpointError(f"{path} holds no VAE (first_stage_model.*): pass vae= a VAE file or folder")
    keymaps = {part: _keymap(_SPECS[layout], modules[part]) for part, (layout, _) in layouts.items()}
    entries = {
        part: component_entries(modules[part], layout, keymaps[part], prefix)
        for part, (layout, prefix) in layouts.items()
    }
    expected = {k: v for part in layouts for k, v in _expected_shapes(entries[part], keymaps[part]).items()}
    extra_block = (
        _extra_openclip_block(tensors, cfg.text_encoder.num_hidden_layers)
        if layouts.get("text_encoder", ("",))[0] == "openclip" and not model_type.startswith("sdxl")
        else lambda key: False
    )

    def skip(key: str) -> bool:
        return _is_skipped(key) or extra_block(key) or (vae is not None and key.startswith(ldm_keys.VAE_PREFIX))

    source_note = f"config {config}" if config is not None else f"the standard {model_type} architecture"
    _check_file(tensors, expected, skip, f"{path} (read as {source_note}; pass config=DIR for other architectures)")

    what = f"weights in {path}"
    if weights:
        params = {part: _convert(tensors, entries[part], keymaps[part], dtype, what) for part in layouts}
    else:
        params = {part: params_as_shapes(modules[part], dtype) for part in layouts}
    if vae is not None:
        modules["vae"], params["vae"] = load_vae(vae, cfg.vae, dtype, weights=weights)
    sdxl = cfg.text_encoder_2 is not None
    return ModelParts(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules.get("text_encoder"),
        tokenizer=CLIPTokenizer.from_folder(cfg.tokenizer_dir) if cfg.tokenizer_dir else None,
        scheduler_config=cfg.scheduler,
        params=params,
        dtype=dtype,
        source=path,
        text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_folder(cfg.tokenizer_2_dir) if sdxl else None,
        force_zeros_for_empty_prompt=bool(cfg.index.get("force_zeros_for_empty_prompt", sdxl)),
        requires_aesthetics_score=bool(cfg.index.get("requires_aesthetics_score", False)),
    )


def _text_layouts(modules: Mapping, openclip: bool, clip_prefix: str | None) -> dict[str, tuple[str, str]]:
    """{text encoder part: (layout, prefix in the file)}: SD 1.x's CLIP (`clip_prefix`, as found) or SD
    2.x's OpenCLIP (`openclip`) as "text_encoder"; SDXL's CLIP-L and OpenCLIP bigG (embedders 0 and 1;
    the refiner's bigG is embedder 0)."""
    if "text_encoder_2" not in modules:
        return {"text_encoder": ("openclip", ldm_keys.OPENCLIP_PREFIX) if openclip else ("clip", clip_prefix)}
    first = "text_encoder" in modules
    out = {"text_encoder": ("clip", ldm_keys.SDXL_CLIP_PREFIX)} if first else {}
    out["text_encoder_2"] = ("openclip", ldm_keys.sdxl_openclip_prefix(1 if first else 0))
    return out


def to_single_file_tensors(parts: ModelParts, dtype=None) -> dict[str, np.ndarray]:
    """The model's parameters under their original single-file names, PyTorch layouts (optionally cast).

    SD 2.x text encoders are written with the resblocks they have (23 for SD 2: the unused last OpenCLIP
    block, `text_projection` and `logit_scale` are not kept by sdjax, and loaders do not need them).
    """
    out: dict[str, np.ndarray] = {}
    modules = {part: getattr(parts, part) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
    modules = {part: module for part, module in modules.items() if module is not None}
    sd2 = parts.text_encoder is not None and text_layout(parts.text_encoder) == "openclip"
    layouts = {"unet": ("unet", None), "vae": ("vae", None), **_text_layouts(modules, sd2, None)}
    for part, (layout, prefix) in layouts.items():
        keymap = _keymap(_SPECS[layout], modules[part])
        torch_named = TorchTensors(parts.params[part], keymap, dtype)
        for entry in component_entries(modules[part], layout, keymap, prefix):
            out[entry.ldm_key] = ldm_keys.to_ldm(entry, [torch_named[k] for k in entry.diffusers_keys])
    return out


def save_single_file(parts: ModelParts, path: str | Path, dtype=None) -> Path:
    """Writes the model as one `.safetensors` file in the original layout (the key map run backwards),
    in `dtype` (default: the model's). `load_single_file` reads it back to identical parameters."""
    path = Path(path).expanduser()
    store = None if dtype is None else resolve_dtype(dtype)
    save_safetensors(path, to_single_file_tensors(parts, store), {"format": "pt"})
    return path


__all__ = [
    "CheckpointError",
    "detect_model_type",
    "default_config_folder",
    "load_single_file",
    "load_vae",
    "save_single_file",
    "to_single_file_tensors",
]
