"""The run configuration of `python -m train`: one frozen dataclass, run configs in `configs/*.py`, and
overrides from the command line.

A run config is a Python file with `get_config(variant: str | None = None) -> TrainConfig`; `--config
configs/sd15_lora.py:tiny` passes "tiny" as the variant (a shrunk run on a random tiny model for quick local
checks, in the manner of big_vision's `runlocal`). Every field can be overridden as `--field value`
(`--learning-rate 1e-4`, `--lora-rank 8`, `--train-text-encoder true`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from collections.abc import Sequence
from pathlib import Path

MODES = ("full", "lora", "dreambooth", "textual_inversion", "vae")
LR_SCHEDULES = ("constant", "cosine")
DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots", "dots_all")
COMPONENTS = ("unet", "vae", "text_encoder")
TIMESTEP_BIAS = ("none", "earlier", "later", "range")
UNET_INITS = ("flax", "identity")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Units: steps are optimizer updates; `batch_size` is the
    global number of images per micro-batch (all hosts), so one update sees batch_size * grad_accum
    images (DreamBooth adds as many class images)."""

    # what to train, on what, where
    model: str | None = None  # diffusers folder or single file; "random:ARCH" (tiny, sd15, ...) for tests
    data: str | None = None  # image folder (metadata.jsonl or .txt captions)
    output: str | None = None
    mode: str = "full"
    # components ("unet", "vae", "text_encoder") to initialise fresh from the architecture's configs; the
    # others are loaded from `model` (all are fresh when there is no model)
    scratch: tuple[str, ...] = ()
    # how a scratch UNet starts: "flax" (the modules' own initialisers) or "identity" (its noise
    # prediction starts as its input; see train.model.identity_init)
    unet_init: str = "flax"
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-5
    lr_schedule: str = "constant"  # after warmup: constant, or cosine decay to 0 at `steps`
    warmup_steps: int = 0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables the EMA of the trained parameters
    # data
    resolution: int = 512
    center_crop: bool = True  # False: random crops
    random_flip: bool = False
    cache_latents: bool = False  # encode every image once (center crop; both flips when random_flip)
    skip_bad_images: bool = False  # log and skip unreadable images / missing captions instead of failing
    caption_dropout: float = 0.0  # probability of training a row on the empty prompt (for CFG)
    # draw images in proportion to metadata.jsonl's "weight" per image raised to this power (1: as given,
    # 0.5: their square roots); 0 (default): every image once per epoch, weights ignored
    sampling_weight_power: float = 0.0
    # objective
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 disables min-SNR weighting (Hang et al. 2023); 5 is the usual value
    # x0-loss weight at least this SNR (truncated SNR, Salimans & Ho 2022: 1): more weight on the noisiest
    # timesteps, which decide an image's layout and colours; 0 disables
    snr_floor: float = 0.0
    # timestep sampling as diffusers' SDXL scripts: "later" draws the noisiest `portion` of the timesteps
    # `multiplier` times as often, "earlier" the least noisy, "range" those in [begin, end)
    timestep_bias_strategy: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    train_text_encoder: bool = False  # full / dreambooth: train the text encoder with the UNet
    # precision and memory
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    remat: str = "none"  # gradient checkpointing of the UNet's blocks: none, full, dots, dots_all
    # sharding and hosts
    mesh: str | None = None  # e.g. "data=2,fsdp=4"; default: every device on "data"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # checkpoints and logs
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 1
    sample_every: int = 0  # 0: sample images only at the end
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_seed: int = 0
    progress: bool = True
    export_dtype: str | None = None  # weights of the exported diffusers folder (e.g. float16); default float32
    # LoRA (mode lora, or dreambooth with lora=True)
    lora: bool = False
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    lora_text_encoder: bool = False  # also adapt the text encoder's q/k/v/out projections
    # DreamBooth
    instance_prompt: str | None = None  # caption of every instance image (default: the data set's captions)
    class_prompt: str | None = None
    class_data: str | None = None  # folder of class images; generated with sdjax when missing or short
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_sample_steps: int = 25
    # textual inversion
    placeholder_token: str = "<concept>"
    initializer_token: str | None = None  # a word whose embedding initialises the new vectors
    num_vectors: int = 1
    # VAE training (mode vae)
    kl_weight: float = 1e-6
    # the diffusers folder (configs, tokenizer, scheduler; no weights needed) whose architecture `scratch`
    # components take; default: `model`
    architecture: str | None = None

    def __post_init__(self):
        checks = (
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (set(self.scratch) <= set(COMPONENTS), f"scratch takes components of {COMPONENTS}, got {self.scratch}"),
            (self.unet_init in UNET_INITS, f"unet_init must be one of {UNET_INITS}, got {self.unet_init!r}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.remat in REMAT, f"remat must be one of {REMAT}, got {self.remat!r}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.resolution >= 8 and self.resolution % 8 == 0, "resolution must be a positive multiple of 8"),
            (0.0 <= self.caption_dropout <= 1.0, "caption_dropout must be in [0, 1]"),
            (self.sampling_weight_power >= 0, "sampling_weight_power must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay must be in [0, 1)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (self.num_vectors >= 1, "num_vectors must be >= 1"),
            (
                self.timestep_bias_strategy in TIMESTEP_BIAS,
                f"timestep_bias_strategy must be one of {TIMESTEP_BIAS}, got {self.timestep_bias_strategy!r}",
            ),
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
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.export_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}")
        if self.cache_latents and not self.center_crop:
            raise ValueError("cache_latents needs center_crop (a cached latent cannot be re-cropped)")

    @property
    def uses_lora(self) -> bool:
        return self.mode == "lora" or (self.mode == "dreambooth" and self.lora)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

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


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def parse_value(name: str, text: str):
    """A command-line string -> the field's type (bool: true/false/1/0/yes/no; tuples: comma-separated;
    "none" for optional fields)."""
    hint = _HINTS[name]
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
        return tuple(part.strip() for part in text.split(",") if part.strip()) if text else ()
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
    """`config` with command-line (name, text) overrides applied; unknown names are an error."""
    changes = {}
    for raw_name, text in overrides:
        name = raw_name.replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"unknown option --{raw_name}; see `python -m train --help` for the config keys")
        changes[name] = parse_value(name, text)
    return config.replace(**changes)


def to_json(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)
