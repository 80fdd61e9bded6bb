"""What a run trains: the model it starts from, the trainable part of the parameters per mode, and how the
trainable and frozen parts are put back together for a forward pass.

Trainable pytrees per mode:
  full / dreambooth   {"unet": ...} (+ {"text_encoder": ...} with train_text_encoder)
  lora (or dreambooth with lora)  {"lora": {"unet": {path: {"A", "B"}}, "text_encoder": {...}}} (SDXL: and
                      "text_encoder_2"; its second text encoder is otherwise always frozen)
  textual_inversion   {"embeddings": (num_vectors, D)}: the new token rows only
  vae                 {"vae": ...}
  controlnet          {"controlnet": ...}: a ControlNet of the UNet (new from it, or loaded), the UNet frozen
Everything else is frozen. LoRA factors use `sdjax.nn.lora`'s adapter layout (A (in, r) or
(kh, kw, in, r), B (r, out)), so the adapter applies through `apply_adapters` and exports to PEFT/kohya
files (`sdjax.convert.lora.lora_file_tensors`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sdjax
from sdjax.convert.textual_inversion import add_embedding
from sdjax.nn.lora import apply_adapters
from sdjax.pipeline import StableDiffusionPipeline
from sdjax.schedulers import NoiseSchedule, from_diffusers_config
from train.config import TrainConfig

TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SetupError(ValueError):
    """A run that cannot start as configured (one line)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """The static side of a run: modules (with the compute dtype), tokenizer, noise schedule, LoRA
    multiplier, textual-inversion token ids. Hashable by identity, so it can be a static jit argument."""

    config: TrainConfig
    pipe: StableDiffusionPipeline  # float32 parameters: the starting point (frozen parts live here)
    unet: Any  # the modules in the compute dtype
    vae: Any
    text_encoder: Any
    schedule: NoiseSchedule
    text_encoder_2: Any = None  # SDXL's second text encoder (frozen), in the compute dtype
    token_ids: tuple[int, ...] = ()  # textual inversion: ids of the new tokens
    lora_multiplier: float = 1.0
    controlnet: Any = None  # mode controlnet: the ControlNet module in the compute dtype
    controlnet_start: Any = None  # ... and the float32 sdjax.ControlNet training starts from

    @property
    def sdxl(self) -> bool:
        return self.pipe.is_sdxl

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @property
    def latent_size(self) -> int:
        return self.config.images.resolution // self.pipe.vae_scale_factor


@functools.partial(jax.jit, static_argnums=0)
def _initial_params(module, key: jax.Array) -> dict:
    """`module`'s parameters from its own initialisers, keyed by `key` (one compile per architecture: equal
    modules share it)."""
    return module.init(key, *module.dummy_inputs())["params"]


def _fresh_components(folder: Path, components, seed: int, unet_init: str = "flax") -> tuple[dict, dict]:
    """(modules, params) for `components`, from the configs in `folder`, with the modules' own
    initialisers (Flax defaults: LeCun-normal kernels, zero biases, unit norm scales) keyed by `seed`; a
    UNet rewired by `identity_init` when unet_init is "identity"."""
    from sdjax.convert.diffusers_folder import MODEL_COMPONENTS
    from sdjax.nn.config_utils import read_json

    modules, params = {}, {}
    for i, spec in enumerate(MODEL_COMPONENTS):
        if spec.folder not in components:
            continue
        raw = read_json(folder / spec.folder / "config.json")
        module = spec.module_cls(spec.config_cls.from_dict(raw, what=f"{folder / spec.folder}/config.json"))
        key = jax.random.fold_in(jax.random.key(seed), i)
        params[spec.folder] = _initial_params(module, key)
        modules[spec.folder] = module
    if "unet" in params and unet_init == "identity":
        params["unet"] = identity_init(params["unet"], modules["unet"].config)
    return modules, params


def _architecture_pipeline(folder: Path, seed: int, unet_init: str = "flax") -> StableDiffusionPipeline:
    from sdjax.nn.config_utils import read_json
    from sdjax.tokenizer import CLIPTokenizer

    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (folder / part).is_dir():
            raise SetupError(f"architecture folder {folder} has no {part}/ (a diffusers folder of configs is needed)")
    modules, params = _fresh_components(folder, ("unet", "vae", "text_encoder"), seed, unet_init)
    return StableDiffusionPipeline(
        unet=modules["unet"],
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
        params=params,
        dtype=jnp.dtype(jnp.float32),
        source=folder,
    )


def load_start(config: TrainConfig) -> StableDiffusionPipeline:
    """The float32 pipeline a run starts from: `--model` (a path, or random:ARCH for random weights of a
    shipped architecture such as random:tiny), with the `scratch` components freshly initialised from the
    architecture folder; every component is fresh when there is no model."""
    if config.model is None:
        if config.architecture is None:
            raise SetupError("no model given: pass --model PATH (a diffusers folder or a single-file checkpoint)")
        return _architecture_pipeline(Path(config.architecture).expanduser(), config.seed, config.unet_init)
    if config.model.startswith("random:"):
        from sdjax.testing import random_pipeline

        pipe = random_pipeline(config.model.removeprefix("random:"), seed=config.seed)
    else:
        pipe = sdjax.load_pipeline(Path(config.model).expanduser())
    if not config.scratch:
        return pipe
    folder = Path(config.architecture).expanduser() if config.architecture else pipe.source
    if folder is None:
        raise SetupError("scratch components need --architecture DIR (a diffusers folder of configs)")
    modules, params = _fresh_components(folder, config.scratch, config.seed, config.unet_init)
    return dataclasses.replace(pipe, **modules, params={**pipe.params, **params})


# conv_norm_out's bias on the pass-through channels: silu(y + 6) = y + 6 to within 2% for |y| < 2
_IDENTITY_SHIFT = 6.0


def _layer_index(name: str) -> int:
    """The index of a block member, 10 for resnets.10: sorting by it keeps their order (strings put 10 before 2)."""
    return int(name.rsplit(".", 1)[1])


def identity_init(unet_params: dict, config) -> dict:
    """A fresh UNet whose noise prediction starts as its (per-channel normalised) input: eps(x_t) = GN(x_t).

    An epsilon model must pass its input through almost exactly at high noise (at t = 999 of SD's schedule
    x_t = 0.07 x0 + 0.998 eps, and every 1% of error in eps is 14% of the image in x0 = (x_t - 0.998 eps) /
    0.07); a small network from random init takes long to learn that identity, and until it has, its
    high-noise x0 predictions are noise. Here the identity is wired in: conv_in copies the latent channels
    into its first C outputs, the last up block's last resnet passes them on through its 1x1 shortcut (its
    residual branch and the following attention add nothing to them), conv_norm_out shifts them into the
    near-linear range of SiLU and conv_out (whose weights are otherwise zero, as ADM initialises its output
    layer) copies them back out. Every other weight keeps its random init, so the network learns the
    correction from there. Needs the last up block's last skip to be conv_in's output (diffusers' layout).
    """
    import numpy as np

    p = jax.tree.map(np.array, unet_params)
    c = config.in_channels
    if config.out_channels != c or p["conv_in"]["kernel"].shape[-1] < c:
        raise SetupError("unet_init=identity needs as many output as input channels and a wider conv_in")
    width = p["conv_in"]["kernel"].shape[-1]
    eye = np.eye(c, dtype=np.float32)
    k = p["conv_in"]["kernel"]
    k[..., :c] = 0.0
    k[1, 1, :, :c] = eye
    p["conv_in"]["bias"][:c] = 0.0
    last = f"up_blocks.{len(config.up_block_types) - 1}"
    resnets = sorted((n for n in p[last] if n.startswith("resnets.")), key=_layer_index)
    res = p[last][resnets[-1]]
    if "conv_shortcut" not in res:
        raise SetupError("unet_init=identity needs a 1x1 shortcut in the last up block's last resnet")
    skip_start = res["conv_shortcut"]["kernel"].shape[2] - width  # input = concat(h, conv_in's output)
    shortcut = res["conv_shortcut"]["kernel"]
    shortcut[..., :c] = 0.0
    shortcut[0, 0, skip_start : skip_start + c, :c] = eye
    res["conv_shortcut"]["bias"][:c] = 0.0
    res["conv2"]["kernel"][..., :c] = 0.0
    res["conv2"]["bias"][:c] = 0.0
    attentions = sorted((n for n in p[last] if n.startswith("attentions.")), key=_layer_index)
    if attentions:
        proj = p[last][attentions[-1]]["proj_out"]
        proj["kernel"][..., :c] = 0.0
        proj["bias"][:c] = 0.0
    p["conv_norm_out"]["scale"][:c] = 1.0
    p["conv_norm_out"]["bias"][:c] = _IDENTITY_SHIFT
    out = p["conv_out"]["kernel"]
    out[...] = 0.0
    out[1, 1, :c, :] = eye
    p["conv_out"]["bias"][:] = -_IDENTITY_SHIFT
    return jax.tree.map(jnp.asarray, p)


def make_setup(config: TrainConfig, pipe: StableDiffusionPipeline) -> Setup:
    """Adds the textual-inversion tokens when needed and builds the compute-dtype modules."""
    dtype = jnp.dtype(config.dtype)
    token_ids: tuple[int, ...] = ()
    if pipe.is_sdxl:
        _check_sdxl(config, pipe)
    if config.mode == "textual_inversion":
        pipe, token_ids = _add_placeholder(config, pipe)
    schedule = from_diffusers_config(pipe.scheduler_config).schedule
    multiplier = config.adapter.alpha / config.adapter.rank
    remat = None if config.remat == "none" else config.remat
    controlnet, start = None, None
    if config.mode == "controlnet":
        start = _controlnet_start(config, pipe)
        controlnet = start.module.clone(dtype=dtype, remat=remat)
    return Setup(
        config=config,
        pipe=pipe,
        unet=pipe.unet.clone(dtype=dtype, remat=remat),
        vae=pipe.vae.clone(dtype=dtype),
        text_encoder=pipe.text_encoder.clone(dtype=dtype),
        text_encoder_2=pipe.text_encoder_2.clone(dtype=dtype) if pipe.text_encoder_2 is not None else None,
        schedule=schedule,
        token_ids=token_ids,
        lora_multiplier=multiplier,
        controlnet=controlnet,
        controlnet_start=start,
    )


def _check_sdxl(config: TrainConfig, pipe: StableDiffusionPipeline) -> None:
    """What SDXL runs support (full, lora, dreambooth and vae; the text encoders frozen except through LoRA;
    base models, which have both encoders), each refusal one line."""
    if pipe.text_encoder is None:
        raise SetupError("--model is an SDXL refiner (one text encoder); sdjax trains SDXL base models")
    if config.mode in ("textual_inversion", "controlnet"):
        raise SetupError(f"--mode {config.mode} is not supported for SDXL models yet (full, lora, dreambooth are)")
    if config.train_text_encoder:
        raise SetupError(
            "--train-text-encoder (full fine-tuning of the text encoders) is not supported for SDXL: train both "
            "encoders through LoRA with --mode lora --lora-text-encoder true"
        )


def _controlnet_start(config: TrainConfig, pipe: StableDiffusionPipeline):
    """The float32 ControlNet a controlnet run starts from: `controlnet_model` (checked against the UNet),
    or a new one made from the UNet (`sdjax.ControlNet.from_unet`, condition embedding keyed by the seed)."""
    from sdjax.request import check_controlnet

    options = config.controlnet
    try:
        if options.model is None:
            return sdjax.ControlNet.from_unet(
                pipe, seed=config.seed, conditioning_embedding_out_channels=options.embedding_channels
            )
        net = sdjax.load_controlnet(Path(options.model).expanduser())
        check_controlnet(pipe, net.module, 0)
    except ValueError as err:
        raise SetupError(f"--controlnet-model: {err}" if options.model else str(err)) from None
    return net


def _add_placeholder(config: TrainConfig, pipe: StableDiffusionPipeline):
    """The pipeline with `num_vectors` new tokens for the placeholder, initialised from the initializer
    token's embedding (or the mean embedding), as diffusers' textual_inversion.py."""
    inversion = config.inversion
    tokenizer, te = pipe.tokenizer, pipe.params["text_encoder"]
    table = np.asarray(te["embeddings.token_embedding"]["embedding"], np.float32)
    if inversion.initializer_token:
        ids = tokenizer.encode_plain(inversion.initializer_token)
        if len(ids) != 1:
            raise SetupError(
                f"initializer_token {inversion.initializer_token!r} is {len(ids)} tokens; choose a single-token word"
            )
        row = table[ids[0]]
    else:
        row = table.mean(axis=0)
    vectors = np.repeat(row[None], inversion.num_vectors, axis=0)
    try:
        tokenizer, text_encoder, te = add_embedding(
            tokenizer, pipe.text_encoder, te, inversion.placeholder_token, vectors
        )
    except ValueError as err:
        raise SetupError(str(err)) from None
    rows = table.shape[0]
    pipe = dataclasses.replace(
        pipe, tokenizer=tokenizer, text_encoder=text_encoder, params={**pipe.params, "text_encoder": te}
    )
    return pipe, tuple(range(rows, rows + inversion.num_vectors))


# ------------------------------------------------------------------------------------------ trainable


def _lora_targets(params, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Module paths (kernel owners) whose last name is one of `targets`, e.g. ("...", "attn1", "to_q")."""
    found = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tuple(k.key for k in key_path)
        if path[-1] == "kernel" and len(path) >= 2 and path[-2] in targets and leaf.ndim in (2, 4):
            found.append(path[:-1])
    return found


def init_lora(setup: Setup, key: jax.Array) -> dict:
    """LoRA factors for every target module: A ~ N(0, 1/rank^2) (PEFT's init_lora_weights="gaussian", as
    diffusers' LoRA training scripts configure it), B = 0, so training starts from the unchanged model."""
    lora = setup.config.adapter
    parts = {"unet": lora.targets}
    if lora.text_encoder:
        parts["text_encoder"] = TEXT_LORA_TARGETS
        if setup.text_encoder_2 is not None:  # SDXL: both encoders, as diffusers' train_dreambooth_lora_sdxl.py
            parts["text_encoder_2"] = TEXT_LORA_TARGETS
    out: dict[str, dict] = {}
    for p, (part, targets) in enumerate(parts.items()):
        params = setup.pipe.params[part]
        paths = _lora_targets(params, targets)
        if not paths:
            raise SetupError(f"no {part} module matches lora_targets {targets}")
        entries = {}
        for i, path in enumerate(paths):
            kernel = params
            for name in (*path, "kernel"):
                kernel = kernel[name]
            shape = kernel.shape
            a_shape = (*shape[:-1], lora.rank)
            k = jax.random.fold_in(jax.random.fold_in(key, p), i)
            entries["/".join(path)] = {
                "A": jax.random.normal(k, a_shape, jnp.float32) / lora.rank,
                "B": jnp.zeros((lora.rank, shape[-1]), jnp.float32),
            }
        out[part] = entries
    return out


def split_params(setup: Setup, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen) float32 pytrees for the run's mode; frozen holds only what the loss reads (no VAE
    with cache_latents, no text encoders with cache_text_embeddings)."""
    cfg = setup.config
    params = setup.pipe.params
    if cfg.mode == "vae":
        return {"vae": params["vae"]}, {}
    frozen: dict[str, Any] = {}
    if not cfg.images.cache_latents:
        frozen["vae"] = params["vae"]
    text_parts = ("text_encoder", "text_encoder_2") if setup.text_encoder_2 is not None else ("text_encoder",)
    if cfg.train_text_encoder:
        text_parts = text_parts[1:]
    if not cfg.images.cache_text_embeddings:
        frozen.update({part: params[part] for part in text_parts})
    if cfg.mode == "controlnet":
        frozen["unet"] = params["unet"]
        return {"controlnet": setup.controlnet_start.params}, frozen
    if cfg.uses_lora:
        frozen["unet"] = params["unet"]
        return {"lora": init_lora(setup, key)}, frozen
    if cfg.mode == "textual_inversion":
        frozen["unet"] = params["unet"]
        table = params["text_encoder"]["embeddings.token_embedding"]["embedding"]
        return {"embeddings": jnp.asarray(table[setup.token_ids[0] : setup.token_ids[-1] + 1])}, frozen
    trainable = {"unet": params["unet"]}
    if cfg.train_text_encoder:
        trainable["text_encoder"] = params["text_encoder"]
    return trainable, frozen


def assemble(setup: Setup, trainable: dict, frozen: dict) -> dict:
    """The model parameters a forward pass uses: frozen parts with the trainable part put in (LoRA merged,
    new embedding rows appended)."""
    params = {**frozen}
    if "lora" in trainable:
        adapter = {
            part: {k: {**m, "multiplier": jnp.float32(setup.lora_multiplier)} for k, m in modules.items()}
            for part, modules in trainable["lora"].items()
        }
        return apply_adapters(params, [adapter], jnp.ones((1,), jnp.float32))
    if "embeddings" in trainable:
        te = params["text_encoder"]
        table = te["embeddings.token_embedding"]["embedding"]
        rows = table.shape[0] - len(setup.token_ids)
        grown = jnp.concatenate([table[:rows], trainable["embeddings"].astype(table.dtype)], axis=0)
        params["text_encoder"] = {**te, "embeddings.token_embedding": {"embedding": grown}}
        return params
    params.update(trainable)
    return params


def trained_controlnet(setup: Setup, trainable: dict):
    """The float32 sdjax.ControlNet with the trained parameters (mode controlnet), for samples and export."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), jax.device_get(trainable["controlnet"]))
    return dataclasses.replace(setup.controlnet_start, params=params)


def trained_pipeline(setup: Setup, trainable: dict) -> StableDiffusionPipeline:
    """The float32 pipeline with the trained parameters in place (LoRA merged), for samples and export."""
    frozen = {
        part: setup.pipe.params[part]
        for part in ("unet", "vae", "text_encoder", "text_encoder_2")
        if setup.pipe.params.get(part) is not None
    }
    params = assemble(setup, jax.device_get(trainable), frozen)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return dataclasses.replace(setup.pipe, params=params)
