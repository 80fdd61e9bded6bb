"""The run configuration of `python -m train`: a frozen TrainConfig of small groups by concern, run configs in
`configs/*.py`, and overrides from the command line.

TrainConfig holds what the run itself is (model, data, output, mode, precision, seed) and one frozen group
per concern: `optim`, `images`, `objective`, `adapter` (LoRA), `dreambooth`, `inversion`, `parallel`,
`outputs`; each group checks its own fields. Choices are `StrEnum`s, so "lora" and `Mode.LORA` are equal
and a config may give either.

Every field also has a flat name: its own, or with its group's `FLAG_PREFIX` (LoRA's `rank` is
`lora_rank`). The flat names are the command-line flags (`--learning-rate 1e-4`, `--lora-rank 8`,
`--train-text-encoder true`), the keys of `replace` (`config.replace(learning_rate=1e-4)` sets
`config.optim.learning_rate`) and of the flat config.json a run writes (`to_json`), as before the groups.

A run config is a Python file with `get_config(variant: str | None = None) -> TrainConfig`; `--config
configs/sd15_lora.py:tiny` passes "tiny" as the variant (a shrunk run on a random tiny model for quick local
checks, in the manner of big_vision's `runlocal`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.util
import math
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np


class Mode(enum.StrEnum):
    FULL = "full"
    LORA = "lora"
    DREAMBOOTH = "dreambooth"
    TEXTUAL_INVERSION = "textual_inversion"
    VAE = "vae"
    CONTROLNET = "controlnet"


class LRSchedule(enum.StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class Remat(enum.StrEnum):
    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_ALL = "dots_all"


class Component(enum.StrEnum):
    UNET = "unet"
    VAE = "vae"
    TEXT_ENCODER = "text_encoder"


class TimestepBias(enum.StrEnum):
    NONE = "none"
    EARLIER = "earlier"
    LATER = "later"
    RANGE = "range"


class UNetInit(enum.StrEnum):
    FLAX = "flax"
    IDENTITY = "identity"


class NanPolicy(enum.StrEnum):
    STOP = "stop"
    SKIP = "skip"


EXPORT_DTYPES = (None, "float32", "float16", "bfloat16")


def _values(kind: type[enum.StrEnum]) -> tuple[str, ...]:
    return tuple(member.value for member in kind)


def _choose(config, field: str, kind: type[enum.StrEnum]) -> None:
    """Turns the (string) value of `config.field` into its member of `kind`, or raises the one-line error."""
    value = getattr(config, field)
    try:
        object.__setattr__(config, field, kind(value))
    except ValueError:
        raise ValueError(f"{field} must be one of {_values(kind)}, got {value!r}") from None


def _flat_name(owner: type, field: str) -> str:
    return getattr(owner, "FLAG_PREFIX", "") + field


def _typed(owner: type, field: str, hint, value):
    """`value` checked against the field's type hint (int, float, bool, str, enums, optional, tuples) and
    normalised (an integral float for an int, a list for a tuple); a one-line ValueError naming the field
    otherwise. Floats must be finite: a NaN learning rate would train a model of NaNs."""
    name = _flat_name(owner, field)
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str) or not isinstance(value, list | tuple):
            raise ValueError(f"{name} takes a list of values, got {type(value).__name__} {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(_typed(owner, field, item, v) for v in value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value  # checked against its members by `_choose`
    if hint is bool:
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{name} takes true or false, got {type(value).__name__} {value!r}")
        return bool(value)
    if hint is int:
        if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} takes an integer, got {type(value).__name__} {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise ValueError(f"{name} takes a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{name} takes a string, got {type(value).__name__} {value!r}")
    return value


def _check_types(config) -> None:
    """Checks (and normalises) every field of a config dataclass against its type hint (see `_typed`)."""
    owner = type(config)
    for field, hint in _hints(owner).items():
        if dataclasses.is_dataclass(hint):  # a group: checked by its own __post_init__
            continue
        object.__setattr__(config, field, _typed(owner, field, hint, getattr(config, field)))


@functools.cache
def _hints(owner: type) -> dict[str, Any]:
    """The type hints of a config dataclass's fields (ClassVars excluded)."""
    names = {f.name for f in dataclasses.fields(owner)}
    return {k: v for k, v in typing.get_type_hints(owner).items() if k in names}


def _check(*checks: tuple[bool, str]) -> None:
    """Raises ValueError(message) for the first (ok, message) that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class Optim:
    """The optimisation: updates, batches, AdamW, the learning-rate schedule, clipping and the EMA.

    Steps are optimizer updates; `batch_size` is the global number of images per micro-batch (all hosts),
    so one update sees batch_size * grad_accum images (DreamBooth adds as many class images)."""

    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    lr_schedule: LRSchedule = LRSchedule.CONSTANT  # after warmup: constant, or cosine decay to 0 at `steps`
    warmup_steps: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA of the trained parameters
    # an update whose loss or gradients are not finite is never applied; "stop" then ends the run with an
    # error (its checkpoints are all finite), "skip" goes on with the next batch (and stops after
    # MAX_SKIPPED_IN_A_ROW such updates in a row)
    nan_policy: NanPolicy = NanPolicy.STOP

    def __post_init__(self):
        _check_types(self)
        _choose(self, "lr_schedule", LRSchedule)
        _choose(self, "nan_policy", NanPolicy)
        _check(
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.adam_b1 < 1.0 and 0.0 <= self.adam_b2 < 1.0, "adam_b1 and adam_b2 must be in [0, 1)"),
            (self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
        )


@dataclasses.dataclass(frozen=True)
class Images:
    """The training images: size, crops, flips, the latent cache, captions and how often each is drawn."""

    resolution: int = 512
    center_crop: bool = True  # False: random crops
    random_flip: bool = False
    cache_latents: bool = False  # encode every image once (center crop; both flips when random_flip)
    # encode every distinct caption once with the frozen text encoder(s), which then stay off the devices
    cache_text_embeddings: bool = False
    skip_bad_images: bool = False  # log and skip unreadable images / missing captions instead of failing
    caption_dropout: float = 0.0  # probability of training a row on the empty prompt (for CFG)
    # draw images in proportion to metadata.jsonl's "weight" per image raised to this power (1: as given,
    # 0.5: their square roots); 0 (default): every image once per epoch, weights ignored
    sampling_weight_power: float = 0.0
    instance_prompt: str | None = None  # caption of every image (default: the data set's captions)
    # processes that read and decode the steps ahead (grain); 0: one background thread
    loader_workers: int = 0
    # aspect-ratio buckets: each step's images at one of the shapes of about resolution^2 pixels nearest
    # their own (train.buckets) instead of square crops
    buckets: bool = False

    def __post_init__(self):
        _check_types(self)
        _check(
            (self.resolution >= 8 and self.resolution % 8 == 0, "resolution must be a positive multiple of 8"),
            (0.0 <= self.caption_dropout <= 1.0, "caption_dropout must be in [0, 1]"),
            (self.sampling_weight_power >= 0, "sampling_weight_power must be >= 0"),
            (self.loader_workers >= 0, f"loader_workers must be >= 0, got {self.loader_workers}"),
            (
                not (self.cache_latents and not self.center_crop),
                "cache_latents needs center_crop (a cached latent cannot be re-cropped)",
            ),
            (not (self.cache_latents and self.buckets), "cache_latents caches square crops: drop one of --buckets"),
        )


@dataclasses.dataclass(frozen=True)
class Objective:
    """The loss: noise, loss weighting and timestep sampling of the diffusion loss; the VAE's KL weight."""

    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 disables min-SNR weighting (Hang et al. 2023); 5 is the usual value
    # x0-loss weight at least this SNR (truncated SNR, Salimans & Ho 2022: 1): more weight on the noisiest
    # timesteps, which decide an image's layout and colours; 0 disables
    snr_floor: float = 0.0
    # timestep sampling as diffusers' SDXL scripts: "later" draws the noisiest `portion` of the timesteps
    # `multiplier` times as often, "earlier" the least noisy, "range" those in [begin, end)
    timestep_bias_strategy: TimestepBias = TimestepBias.NONE
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    kl_weight: float = 1e-6  # mode vae: reconstruction MSE + kl_weight * KL

    def __post_init__(self):
        _check_types(self)
        _choose(self, "timestep_bias_strategy", TimestepBias)
        _check(
            (self.noise_offset >= 0, f"noise_offset must be >= 0, got {self.noise_offset}"),
            (self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}"),
            (self.min_snr_gamma >= 0 and self.snr_floor >= 0, "min_snr_gamma and snr_floor must be >= 0"),
            (
                not (self.min_snr_gamma and self.snr_floor > self.min_snr_gamma),
                "snr_floor must not exceed min_snr_gamma",
            ),
            (self.timestep_bias_multiplier > 0, "timestep_bias_multiplier must be > 0"),
            (0.0 < self.timestep_bias_portion <= 1.0, "timestep_bias_portion must be in (0, 1]"),
            (
                0 <= self.timestep_bias_begin < self.timestep_bias_end,
                "timestep_bias_begin must be >= 0 and < timestep_bias_end",
            ),
        )


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The LoRA adapter of mode lora (or dreambooth with lora): rank, alpha, adapted modules; flags lora_*."""

    FLAG_PREFIX: ClassVar[str] = "lora_"

    rank: int = 4
    alpha: float = 4.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet modules adapted, by last name
    text_encoder: bool = False  # also adapt the text encoder's q/k/v/out projections

    def __post_init__(self):
        _check_types(self)
        _check(
            (self.rank >= 1, "lora_rank must be >= 1"), (self.alpha > 0, f"lora_alpha must be > 0, got {self.alpha}")
        )


@dataclasses.dataclass(frozen=True)
class DreamBooth:
    """DreamBooth's prior preservation: the class images and their loss weight; LoRA instead of the UNet."""

    class_prompt: str | None = None
    class_data: str | None = None  # folder of class images; generated with sdjax when missing or short
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_sample_steps: int = 25
    lora: bool = False  # train a LoRA adapter (`adapter`) instead of the UNet

    def __post_init__(self):
        _check_types(self)
        _check(
            (self.num_class_images >= 0, f"num_class_images must be >= 0, got {self.num_class_images}"),
            (self.prior_loss_weight >= 0, f"prior_loss_weight must be >= 0, got {self.prior_loss_weight}"),
            (self.class_sample_steps >= 1, f"class_sample_steps must be >= 1, got {self.class_sample_steps}"),
        )


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """Textual inversion: the new token and how its embedding vectors start."""

    placeholder_token: str = "<concept>"
    initializer_token: str | None = None  # a word whose embedding initialises the new vectors
    num_vectors: int = 1

    def __post_init__(self):
        _check_types(self)
        _check(
            (self.num_vectors >= 1, "num_vectors must be >= 1"),
            (bool(self.placeholder_token.strip()), "placeholder_token must not be empty"),
        )


@dataclasses.dataclass(frozen=True)
class ControlNetTraining:
    """Mode controlnet: where the ControlNet starts and where the condition images are; flags controlnet_*."""

    FLAG_PREFIX: ClassVar[str] = "controlnet_"

    # a ControlNet (diffusers folder or single file) to train further; default: a new one made from the
    # UNet (its encoder copied, zero output convolutions: diffusers' ControlNetModel.from_unet)
    model: str | None = None
    # the metadata.jsonl key of each image's condition image, a path relative to the data folder (as
    # diffusers' train_controlnet.py --conditioning_image_column; Hugging Face imagefolder's
    # "conditioning_image_file_name" is read too)
    conditioning_column: str = "conditioning_image"
    # a new ControlNet's condition embedding: channels per level; 2^(levels - 1) is the VAE's downscale
    embedding_channels: tuple[int, ...] = (16, 32, 96, 256)
    # condition images of the sample prompts (one, or one per prompt); default: those of the first
    # training images
    sample_images: tuple[str, ...] = ()

    def __post_init__(self):
        _check_types(self)
        _check(
            (bool(self.conditioning_column.strip()), "controlnet_conditioning_column must not be empty"),
            (
                len(self.embedding_channels) >= 1 and all(c >= 1 for c in self.embedding_channels),
                f"controlnet_embedding_channels takes positive channel counts, got {list(self.embedding_channels)}",
            ),
        )


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Devices and hosts: the mesh and the multi-host rendezvous (as sample.py's flags)."""

    mesh: str | None = None  # e.g. "data=2,fsdp=4"; default: every device on "data"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        _check_types(self)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the run writes besides the weights: checkpoints, metrics, progress, samples, the export dtype."""

    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    progress: bool = True
    sample_every: int = 0  # 0: sample images only at the end
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_seed: int = 0
    export_dtype: str | None = None  # weights of the exported diffusers folder (e.g. float16); default float32
    # start over in an output folder that holds a finished run, another run's files, or a checkpoint written
    # with other settings (their files are deleted); a compatible unfinished checkpoint is always resumed
    overwrite: bool = False

    def __post_init__(self):
        _check_types(self)
        _check(
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.sample_every >= 0, f"sample_every must be >= 0 (0: only at the end), got {self.sample_every}"),
            (self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}"),
            (
                self.export_dtype in EXPORT_DTYPES,
                f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}",
            ),
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on: the run itself here, the rest in one group per concern."""

    model: str | None = None  # diffusers folder or single file; "random:ARCH" (tiny, sd15, ...) for tests
    data: str | None = None  # image folder (metadata.jsonl or .txt captions)
    output: str | None = None
    mode: Mode = Mode.FULL
    # the diffusers folder (configs, tokenizer, scheduler; no weights needed) whose architecture `scratch`
    # components take; default: `model`
    architecture: str | None = None
    # components to initialise fresh from the architecture's configs; the others are loaded from `model`
    # (all are fresh when there is no model)
    scratch: tuple[Component, ...] = ()
    # how a scratch UNet starts: "flax" (the modules' own initialisers) or "identity" (its noise
    # prediction starts as its input; see train.model.identity_init)
    unet_init: UNetInit = UNetInit.FLAX
    train_text_encoder: bool = False  # full / dreambooth: train the text encoder with the UNet
    dtype: DType = DType.FLOAT32  # compute dtype; parameters and optimizer state stay float32
    remat: Remat = Remat.NONE  # gradient checkpointing of the UNet's blocks
    seed: int = 0
    optim: Optim = dataclasses.field(default_factory=Optim)
    images: Images = dataclasses.field(default_factory=Images)
    objective: Objective = dataclasses.field(default_factory=Objective)
    adapter: LoRA = dataclasses.field(default_factory=LoRA)
    dreambooth: DreamBooth = dataclasses.field(default_factory=DreamBooth)
    inversion: TextualInversion = dataclasses.field(default_factory=TextualInversion)
    controlnet: ControlNetTraining = dataclasses.field(default_factory=ControlNetTraining)
    parallel: Parallel = dataclasses.field(default_factory=Parallel)
    outputs: Outputs = dataclasses.field(default_factory=Outputs)

    def __post_init__(self):
        _check_types(self)
        for name, kind in _hints(TrainConfig).items():
            group = getattr(self, name)
            if dataclasses.is_dataclass(kind) and not isinstance(group, kind):
                raise ValueError(f"{name} must be a train.config.{kind.__name__}, got {type(group).__name__}")
        _check((0 <= self.seed < 2**32, f"seed must be in [0, {2**32 - 1}], got {self.seed}"))
        _choose(self, "mode", Mode)
        try:
            object.__setattr__(self, "scratch", tuple(Component(c) for c in self.scratch))
        except ValueError:
            raise ValueError(f"scratch takes components of {_values(Component)}, got {self.scratch}") from None
        _choose(self, "unet_init", UNetInit)
        _choose(self, "dtype", DType)
        _choose(self, "remat", Remat)
        if self.images.cache_text_embeddings:
            trains_text = self.train_text_encoder or self.mode == Mode.TEXTUAL_INVERSION
            trains_text = trains_text or (self.uses_lora and self.adapter.text_encoder)
            _check(
                (self.mode != Mode.VAE, "mode vae has no text: drop --cache-text-embeddings"),
                (
                    not trains_text,
                    "cache_text_embeddings needs frozen text encoders: drop --cache-text-embeddings, or stop "
                    "training the text encoder (--train-text-encoder, --lora-text-encoder, textual_inversion)",
                ),
            )
        if self.mode == Mode.CONTROLNET:
            _check(
                (not self.train_text_encoder, "mode controlnet trains the ControlNet alone: drop --train-text-encoder")
            )
            images, prompts = self.controlnet.sample_images, self.outputs.sample_prompts
            _check(
                (
                    not images or len(images) in (1, len(prompts)),
                    f"{len(images)} controlnet_sample_images for {len(prompts)} sample_prompts: "
                    "give one, or one per prompt",
                )
            )

    @property
    def uses_lora(self) -> bool:
        return self.mode == Mode.LORA or (self.mode == Mode.DREAMBOOTH and self.dreambooth.lora)

    def replace(self, **changes) -> TrainConfig:
        """A copy with `changes`: top-level fields, whole groups (`optim=Optim(...)`) and flat names
        (`learning_rate=1e-4`, `lora_rank=8`), each routed to its group, after any whole group given."""
        top, grouped = {}, {}
        for key, value in changes.items():
            option = FIELDS.get(key)
            if key in GROUPS or (option is not None and option.group is None):
                top[key] = value
            elif option is not None:
                grouped.setdefault(option.group, {})[option.field] = value
            else:
                raise TypeError(f"TrainConfig has no field, group or flat option {key!r}")
        for group, fields in grouped.items():
            top[group] = dataclasses.replace(top.get(group, getattr(self, group)), **fields)
        return dataclasses.replace(self, **top)

    def tiny(self, **changes) -> TrainConfig:
        """The quick local variant of a run config: the random tiny model (random:tiny), 64x64 images,
        20 steps of batch 2 in float32 without remat or periodic samples, then `changes`."""
        quick = dict(
            model="random:tiny",
            steps=20,
            batch_size=2,
            grad_accum=1,
            resolution=64,
            dtype="float32",
            remat="none",
            checkpoint_every=10,
            sample_every=0,
            sample_steps=4,
        )
        return self.replace(**{**quick, **changes})


def variant_of(config: TrainConfig, variant: str | None, name: str, **tiny_changes) -> TrainConfig:
    """What a run config's get_config returns: `config` itself, or for variant "tiny" `config.tiny(...)`."""
    if variant is None:
        return config
    if variant == "tiny":
        return config.tiny(**tiny_changes)
    raise ValueError(f"unknown variant {variant!r} of {name} (known: tiny)")


def _plain(value):
    """A config value with enums as their strings (what config.json and --help show)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class Option:
    """A flat name (a command-line flag, a `replace` keyword, a config.json key) and the field it sets."""

    name: str
    group: str | None  # the TrainConfig group holding the field; None: a top-level field
    field: str  # the field's name in its group
    hint: Any  # its type
    default: Any  # plain (enums as strings)

    def get(self, config: TrainConfig):
        return getattr(getattr(config, self.group) if self.group else config, self.field)

    @property
    def choices(self) -> tuple[str, ...]:
        """The values a choice field (or each item of a tuple of choices) takes; () for other fields."""
        kind = (typing.get_args(self.hint) or (self.hint,))[0]
        return _values(kind) if isinstance(kind, type) and issubclass(kind, enum.Enum) else ()


def _options() -> tuple[dict[str, type], dict[str, Option]]:
    """(group name -> group class, flat name -> Option), read off the dataclasses."""
    groups, options = {}, {}
    top_hints = typing.get_type_hints(TrainConfig)
    for top in dataclasses.fields(TrainConfig):
        hint = top_hints[top.name]
        if dataclasses.is_dataclass(hint):
            groups[top.name] = hint
            owner, group, prefix = hint, top.name, getattr(hint, "FLAG_PREFIX", "")
            fields = dataclasses.fields(hint)
        else:
            owner, group, prefix, fields = TrainConfig, None, "", (top,)
        hints = typing.get_type_hints(owner)
        for f in fields:
            name = prefix + f.name
            if name in options:
                raise TypeError(f"two config fields have the flat name {name!r}")
            options[name] = Option(name, group, f.name, hints[f.name], _plain(f.default))
    if clash := groups.keys() & options.keys():
        raise TypeError(f"config groups named like flat options: {sorted(clash)}")
    return groups, options


GROUPS, FIELDS = _options()


def parse_value(name: str, text: str):
    """A command-line string -> the flat field's type (bool: true/false/1/0/yes/no; tuples: comma-separated;
    "none" for optional fields; choices stay strings, checked by the config)."""
    hint = FIELDS[name].hint
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and text.lower() in ("none", "null", ""):
        return None
    base = hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        base = next(a for a in args if a is not type(None))
    if base is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name.replace('_', '-')} takes true or false, got {text!r}")
    if typing.get_origin(base) is tuple:
        parts = tuple(part.strip() for part in text.split(",") if part.strip()) if text else ()
        item = typing.get_args(base)[0]
        if item in (int, float):
            try:
                return tuple(item(part) for part in parts)
            except ValueError:
                raise ValueError(
                    f"--{name.replace('_', '-')} takes comma-separated {item.__name__}s, got {text!r}"
                ) from None
        return parts
    if issubclass(base, str):
        return text
    try:
        return base(text)
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} takes a {base.__name__}, got {text!r}") from None


def load_config_file(spec: str) -> TrainConfig:
    """`path/to/config.py[:variant]` -> the TrainConfig its `get_config(variant)` returns."""
    path_text, _, variant = spec.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_sdjax_run_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(variant=None) function")
    config = module.get_config(variant or None)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"{path}: get_config must return a train.config.TrainConfig")
    return config


def from_args(config: TrainConfig, overrides: Sequence[tuple[str, str]]) -> TrainConfig:
    """`config` with command-line (flat name, text) overrides applied; unknown names are an error."""
    changes = {}
    for raw_name, text in overrides:
        name = raw_name.replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"unknown option --{raw_name}; see `python -m train --help` for the config keys")
        changes[name] = parse_value(name, text)
    return config.replace(**changes)


def to_json(config: TrainConfig) -> dict:
    """The flat {flat name: value} dict of config.json and the checkpoints' meta, enums as their strings:
    the same keys as before the fields were grouped, so older runs' checkpoints still compare."""
    return {name: _plain(option.get(config)) for name, option in FIELDS.items()}
