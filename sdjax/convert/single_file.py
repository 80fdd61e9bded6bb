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
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sdjax.convert import ldm_keys
from sdjax.convert.diffusers_folder import TEXT_ENCODER, UNET, VAE, keymap_for, load_component
from sdjax.convert.keymap import ConversionError, params_to_torch, torch_to_params
from sdjax.convert.safetensors_io import SafetensorsFile, save_safetensors
from sdjax.nn.clip import CLIPTextConfig, CLIPTextModel
from sdjax.nn.config_utils import read_json, resolve_dtype
from sdjax.nn.unet import UNet2DConditionModel, UNetConfig
from sdjax.nn.vae import AutoencoderKL, VAEConfig
from sdjax.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from sdjax.pipeline import StableDiffusionPipeline

SHIPPED_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# (model type, prediction_type or None) -> (shipped config folder, overrides of its UNet config).
_DEFAULT_CONFIGS: dict[tuple[str, str | None], tuple[str, dict[str, Any]]] = {
    ("sd1", None): ("stable-diffusion-v1-5", {}),
    ("sd1-inpainting", None): ("stable-diffusion-inpainting", {}),
    ("sd2", None): ("stable-diffusion-2-1", {}),  # diffusers' default for SD 2 files: 768 v-prediction
    ("sd2", "epsilon"): ("stable-diffusion-2-1-base", {}),
    ("sd2-inpainting", None): ("stable-diffusion-2-1-base", {"in_channels": 9}),
}

# Text-encoder layout of an export, from the activation (OpenAI CLIP: quick_gelu; OpenCLIP ViT-H: gelu).
_TEXT_LAYOUT_BY_ACTIVATION = {"quick_gelu": "clip", "gelu": "openclip"}


class CheckpointError(ValueError):
    """A file that is not a loadable Stable Diffusion checkpoint (unknown layout, unsupported model, pickle)."""


# ---------------------------------------------------------------------------------------------- reading


class _Tensors(Mapping[str, np.ndarray]):
    """A plain dict of arrays with the `shape(key)` method the converters use (pickle checkpoints)."""

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self._arrays = arrays
        self.path = path
        self.metadata: dict[str, str] = {}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._arrays[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._arrays[key].shape)


def _torch_to_numpy(obj: Any) -> Any:
    """torch tensors (bf16 included) -> numpy, recursively through dicts, lists and tuples."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_torch_to_numpy(v) for v in obj)
    return obj


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_torch_pickle(path: str | Path) -> Any:
    """A PyTorch pickle (`.ckpt`, `.pt`, `.bin`) read only through `torch.load(weights_only=True)`, which
    refuses to run code; tensors become numpy arrays. Never plain unpickling: without torch, an error."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle, which sdjax reads only with torch.load(weights_only=True) and torch is "
            "not installed: install torch, or convert the file to .safetensors"
        ) from None
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.load can memory-map only the zip format
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path}: the safe loader refuses this pickle (it holds Python objects besides tensors): "
                f"{_first_line(err)}"
            ) from None
        reason = _first_line(err)
        raise CheckpointError(f"{path}: cannot read this PyTorch file (truncated or corrupt?): {reason}") from None
    return _torch_to_numpy(obj)


def is_torch_pickle(path: str | Path) -> bool:
    """Whether a file is a PyTorch pickle (zip archive or legacy pickle) rather than a safetensors file,
    told by content: a safetensors file starts with its 8-byte header size and a JSON "{"."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    (header_size,) = struct.unpack("<Q", head[:8].ljust(8, b"\0"))
    if head[8:9] == b"{" and header_size <= path.stat().st_size - 8:
        return False
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch >= 1.6 zip, or pickle protocol >= 2


def read_checkpoint(path: str | Path) -> Mapping[str, np.ndarray]:
    """The tensors of a checkpoint file as a mapping name -> numpy array (read on access for safetensors).

    Safetensors and PyTorch pickles are told apart by content, whatever the extension; pickles go through
    `load_torch_pickle`, their nested `state_dict` is unwrapped and non-tensor entries (`global_step`, ...)
    are dropped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if is_torch_pickle(path):
        obj = load_torch_pickle(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: a PyTorch file holding a {type(obj).__name__}, not a dict of tensors")
        return _Tensors({k: v for k, v in obj.items() if isinstance(v, np.ndarray)}, path)
    return SafetensorsFile(path)


# ---------------------------------------------------------------------------------------------- detection


def _clip_prefix(keys: set[str]) -> str | None:
    for prefix in (ldm_keys.CLIP_PREFIX, "cond_stage_model.transformer."):
        if prefix + "embeddings.token_embedding.weight" in keys:
            return prefix
    return None


def _examples(keys, limit: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") if keys else "none"


def detect_model_type(tensors: Mapping[str, np.ndarray], name: str = "checkpoint") -> str:
    """ "sd1", "sd1-inpainting", "sd2" or "sd2-inpainting" from the keys and shapes of a single file.

    SD 1.x holds an OpenAI CLIP (`cond_stage_model.transformer.*`), SD 2.x an OpenCLIP text tower
    (`cond_stage_model.model.*`); inpainting UNets take 9 input channels. Anything else (SDXL, LoRAs,
    diffusers-layout files, instruct-pix2pix, upscalers) raises a one-line `CheckpointError`.
    """
    keys = set(tensors)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{name} is an SDXL checkpoint (conditioner.embedders.*); sdjax loads SD 1.x and 2.x")
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
    text_encoder: CLIPTextConfig
    tokenizer_dir: Path
    scheduler: dict[str, Any]


def _read_configs(folder: Path, unet_overrides: Mapping[str, Any], prediction_type: str | None) -> _Configs:
    """Architecture configs, tokenizer folder and scheduler config of a diffusers folder (weights not read)."""
    configs = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json")
    for needed in configs:
        if not (folder / needed).is_file():
            raise FileNotFoundError(f"config folder {folder} has no {needed}")
    if not (folder / "tokenizer").is_dir():
        raise FileNotFoundError(f"config folder {folder} has no tokenizer/ folder")
    unet = {**read_json(folder / "unet" / "config.json"), **unet_overrides}
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    return _Configs(
        unet=UNetConfig.from_dict(unet, what=f"{folder}/unet/config.json"),
        vae=VAEConfig.from_dict(read_json(folder / "vae" / "config.json"), what=f"{folder}/vae/config.json"),
        text_encoder=CLIPTextConfig.from_dict(
            read_json(folder / "text_encoder" / "config.json"), what=f"{folder}/text_encoder/config.json"
        ),
        tokenizer_dir=folder / "tokenizer",
        scheduler=scheduler,
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


_SPECS = {"unet": UNET, "vae": VAE, "clip": TEXT_ENCODER, "openclip": TEXT_ENCODER}


@functools.lru_cache(maxsize=32)
def _keymap_cached(spec, module_cls, config, dtype) -> dict:
    return keymap_for(spec, module_cls(config, dtype=dtype))


def _keymap(spec, module) -> dict:
    """`keymap_for`, remembered per architecture (building it traces the model). Read-only."""
    return _keymap_cached(spec, type(module), module.config, jnp.dtype(module.dtype))


def component_entries(
    module, layout: str, keymap: Mapping | None = None, clip_prefix: str = ldm_keys.CLIP_PREFIX
) -> list[ldm_keys.LdmEntry]:
    """The LDM entries of one sdjax module: layout "unet", "vae", "clip" or "openclip" (`keymap`: the
    module's `keymap_for`, if already built)."""
    keys = list(keymap if keymap is not None else _keymap(_SPECS[layout], module))
    if layout == "unet":
        if module.config.addition_embed_type is not None:
            raise ValueError(
                f"a UNet with addition_embed_type {module.config.addition_embed_type!r} has no single-file (LDM) "
                "layout; save it as a diffusers folder (save_pretrained) instead"
            )
        return ldm_keys.build_entries(ldm_keys.unet_rules(module.config), keys, ldm_keys.UNET_PREFIX)
    if layout == "vae":
        return ldm_keys.build_entries(ldm_keys.vae_rules(module.config), keys, ldm_keys.VAE_PREFIX)
    if layout == "clip":
        return ldm_keys.build_entries(None, keys, clip_prefix)
    rules = ldm_keys.openclip_rules(module.config.num_hidden_layers)
    return ldm_keys.build_entries(rules, keys, ldm_keys.OPENCLIP_PREFIX)


class _DiffusersView(Mapping[str, np.ndarray]):
    """The diffusers-named tensors of one component, computed on access from the LDM-named file."""

    def __init__(self, tensors: Mapping[str, np.ndarray], entries: list[ldm_keys.LdmEntry]):
        self._tensors = tensors
        self._where = {k: (e, i) for e in entries for i, k in enumerate(e.diffusers_keys) if e.ldm_key in tensors}
        self._fused: dict[str, list] = {}  # a fused q/k/v tensor is read once, kept until all three are taken

    def _ldm(self, entry: ldm_keys.LdmEntry) -> np.ndarray:
        if len(entry.diffusers_keys) == 1:
            return self._tensors[entry.ldm_key]
        held = self._fused.setdefault(entry.ldm_key, [self._tensors[entry.ldm_key], len(entry.diffusers_keys)])
        held[1] -= 1
        if held[1] == 0:
            del self._fused[entry.ldm_key]
        return held[0]

    def __getitem__(self, key: str) -> np.ndarray:
        entry, slot = self._where[key]
        return ldm_keys.to_diffusers(entry, self._ldm(entry), slot)

    def shape(self, key: str) -> tuple[int, ...]:
        entry, _ = self._where[key]
        return ldm_keys.diffusers_shape(entry, _shape(self._tensors, entry.ldm_key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _shape(tensors: Mapping[str, np.ndarray], key: str) -> tuple[int, ...]:
    shape = getattr(tensors, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(tensors[key].shape)


def _listing(items, limit: int = 6) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


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
        f"{k} {_shape(tensors, k)} (expected {expected[k]})"
        for k in expected
        if k in tensors and _shape(tensors, k) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {_listing(wrong, 3)}")
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


def load_vae(source: str | Path, config: VAEConfig, dtype=jnp.float32) -> tuple[AutoencoderKL, dict]:
    """An external VAE -> (module, params).

    `source` is a diffusers VAE folder (its own config.json decides the architecture), a diffusers model
    folder with a `vae/` sub-folder, or a weight file in the LDM layout (`encoder.down.0.block.0...`, e.g.
    vae-ft-mse-840000-ema-pruned.safetensors, optionally under `first_stage_model.`; a whole SD checkpoint
    works too) or in the diffusers layout; a file is read with `config` as its architecture.
    """
    source = Path(source).expanduser()
    if source.is_dir():
        if (source / "vae" / "config.json").is_file():
            return load_component(source, VAE, dtype)
        if (source / "config.json").is_file():
            return load_component(source.parent, dataclasses.replace(VAE, folder=source.name), dtype)
        raise FileNotFoundError(f"VAE folder {source} has neither config.json nor vae/config.json")
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
    return module, _convert(tensors, entries, keymap, dtype, f"VAE file {source}")


def replace_vae(pipe: StableDiffusionPipeline, source: str | Path) -> StableDiffusionPipeline:
    """A new pipeline whose VAE is read from `source` (see `load_vae`), in the pipeline's dtype."""
    module, params = load_vae(source, pipe.vae.config, pipe.dtype)
    return dataclasses.replace(pipe, vae=module, params={**pipe.params, "vae": params})


# ---------------------------------------------------------------------------------------------- load / save


def load_single_file(
    path: str | Path,
    *,
    config: str | Path | None = None,
    dtype=jnp.float32,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
) -> StableDiffusionPipeline:
    """Loads an SD 1.x / 2.x / inpainting single-file checkpoint into a `StableDiffusionPipeline`.

    Args:
      path: `.safetensors` (read tensor by tensor), or `.ckpt`/`.pt` through torch.load(weights_only=True).
      config: a diffusers-format folder whose config.json files, tokenizer/ and scheduler/ decide the
        architecture (no weights needed); default: the shipped config of the detected model type.
      dtype: parameter dtype (float32, bfloat16, float16); fp16 files are cast.
      prediction_type: "epsilon", "v_prediction" or "sample", written into the scheduler config; default:
        the config's (SD 2.x: v_prediction, else epsilon). For SD 2.x, "epsilon" selects the 512 "base" config.
      vae: an external VAE replacing the file's (see `load_vae`); needed when the file has none.
    Raises:
      CheckpointError (unknown layout, SDXL, unsupported UNet, pickle without torch), ConversionError
      (tensors that do not fit the architecture, all named), each with a one-line message.
    """
    from sdjax.pipeline import StableDiffusionPipeline

    path = Path(path).expanduser()
    dtype = resolve_dtype(dtype)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
    tensors = read_checkpoint(path)
    model_type = detect_model_type(tensors, str(path))
    if config is not None:
        folder, overrides = Path(config).expanduser(), {}
        if not folder.is_dir():
            raise FileNotFoundError(f"config folder {folder} does not exist")
    else:
        folder, overrides = default_config_folder(model_type, prediction_type)
    cfg = _read_configs(folder, overrides, prediction_type)

    modules = {
        "unet": UNet2DConditionModel(cfg.unet, dtype=dtype),
        "vae": AutoencoderKL(cfg.vae, dtype=dtype),
        "text_encoder": CLIPTextModel(cfg.text_encoder, dtype=dtype),
    }
    keys = set(tensors)
    layouts = {"unet": "unet", "vae": "vae", "text_encoder": "openclip" if model_type.startswith("sd2") else "clip"}
    if vae is not None:
        del layouts["vae"]  # the file's VAE, if any, is replaced
    elif not any(k.startswith(ldm_keys.VAE_PREFIX) for k in keys):
        raise CheckpointError(f"{path} holds no VAE (first_stage_model.*): pass vae= a VAE file or folder")
    keymaps = {part: _keymap(_SPECS[layout], modules[part]) for part, layout in layouts.items()}
    clip_prefix = _clip_prefix(keys) or ldm_keys.CLIP_PREFIX
    entries = {
        part: component_entries(modules[part], layout, keymaps[part], clip_prefix) for part, layout in layouts.items()
    }
    expected = {k: v for part in layouts for k, v in _expected_shapes(entries[part], keymaps[part]).items()}
    extra_block = (
        _extra_openclip_block(tensors, cfg.text_encoder.num_hidden_layers)
        if layouts["text_encoder"] == "openclip"
        else lambda key: False
    )

    def skip(key: str) -> bool:
        return _is_skipped(key) or extra_block(key) or (vae is not None and key.startswith(ldm_keys.VAE_PREFIX))

    source_note = f"config {config}" if config is not None else f"the standard {model_type} architecture"
    _check_file(tensors, expected, skip, f"{path} (read as {source_note}; pass config=DIR for other architectures)")

    what = f"weights in {path}"
    params = {part: _convert(tensors, entries[part], keymaps[part], dtype, what) for part in layouts}
    if vae is not None:
        modules["vae"], params["vae"] = load_vae(vae, cfg.vae, dtype)
    return StableDiffusionPipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_folder(cfg.tokenizer_dir),
        scheduler_config=cfg.scheduler,
        params={"unet": params["unet"], "vae": params["vae"], "text_encoder": params["text_encoder"]},
        dtype=dtype,
        source=path,
    )


def to_single_file_tensors(pipe: StableDiffusionPipeline, dtype=None) -> dict[str, np.ndarray]:
    """The pipeline's parameters under their original single-file names, PyTorch layouts (optionally cast).

    SD 2.x text encoders are written with the resblocks they have (23 for SD 2: the unused last OpenCLIP
    block, `text_projection` and `logit_scale` are not kept by sdjax, and loaders do not need them).
    """
    out: dict[str, np.ndarray] = {}
    parts = (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder))
    for part, module in parts:
        layout = text_layout(module) if part == "text_encoder" else part
        keymap = _keymap(_SPECS[layout], module)
        torch_named = params_to_torch(pipe.params[part], keymap, dtype)
        for entry in component_entries(module, layout, keymap):
            out[entry.ldm_key] = ldm_keys.to_ldm(entry, [torch_named[k] for k in entry.diffusers_keys])
    return out


def save_single_file(pipe: StableDiffusionPipeline, path: str | Path, dtype=None) -> Path:
    """Writes the pipeline as one `.safetensors` file in the original layout (the key map run backwards),
    in `dtype` (default: the pipeline's). `load_single_file` reads it back to identical parameters."""
    path = Path(path).expanduser()
    store = None if dtype is None else resolve_dtype(dtype)
    save_safetensors(path, to_single_file_tensors(pipe, store), {"format": "pt"})
    return path


__all__ = [
    "CheckpointError",
    "detect_model_type",
    "is_torch_pickle",
    "default_config_folder",
    "load_single_file",
    "load_torch_pickle",
    "load_vae",
    "read_checkpoint",
    "replace_vae",
    "save_single_file",
    "to_single_file_tensors",
]
