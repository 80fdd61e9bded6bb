"""The options of a generation request (`GenerateOptions`, diffusers' names), checked as they are given."""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class GenerateOptions:
    """Every option of `StableDiffusionPipeline.generate` (as keyword arguments), with diffusers' names.

    Traced (changing them does not recompile): prompts, seed, guidance_scale, guidance_rescale, strength,
    num_inference_steps (up to max_steps), the init image and mask, LoRA scales and same-shaped LoRAs.

    num_inference_steps: inference steps (default 50).
    guidance_scale: classifier-free guidance scale (default 7.5, SDXL models 5.0, as diffusers' pipelines; <= 1
      uses the prompt alone, as diffusers).
    scheduler: a name from `sdjax.schedulers.NAMES` (e.g. "euler_a", "dpmpp_2m_karras"), a Scheduler, or
      None for the model's own scheduler config.
    height, width: pixels, multiples of the VAE factor (8); default: the init image's size, else the
      model's sample size.
    num_images_per_prompt: images per prompt; B = len(prompts) * num_images_per_prompt.
    seed: image k of the call uses seed + k (A1111's convention), whatever the batch size; or one seed per
      image.
    latents: optional (B, H/8, W/8, 4) NHWC standard-normal noise: the initial latents before scaling by
      the scheduler's initial sigma (txt2img), or the noise added to the init image's latents.
    image, mask_image: paths, PIL images or uint8 (H, W[, C]) arrays; the mask is white where to repaint.
      A list (or a uint8 (N, H, W, C) array) gives one per prompt, all of one size. 9-channel inpainting
      UNets work as diffusers' StableDiffusionInpaintPipeline; regular UNets blend the latents with the
      re-noised init image after every step (diffusers' behaviour for them).
    strength: img2img/inpaint denoising strength in [0, 1] (default 0.8).
    guidance_rescale, clip_skip: as diffusers (clip_skip=1 is A1111's "Clip skip: 2").
    max_steps: the step count the program is compiled for (default: the next multiple of 50).
    micro_batch_size: images per UNet call. 1 makes each image bit-identical whatever the batch size (the
      default on the CPU); larger groups are faster on GPUs/TPUs and change images only by float rounding
      (the default there: every image of a device in one call).
    mesh: "all" (default: the batch split over every device; plain on a single device), a spec such as
      "data=2,fsdp=4", a `jax.sharding.Mesh`, or None (one device). Images are bit-identical whatever the
      mesh.
    loras: unmerged LoRAs applied inside the compiled program, [(file or adapter, scale), ...]; a scale is
      a float or {"unet": a, "text_encoder": b}.
    vae_tiling: decode the latents in overlapping 512-pixel tiles, as diffusers' `enable_vae_tiling`:
      bounded memory for large images.
    controlnet, control_image: a `sdjax.ControlNet` (or a list: their residuals are summed) and its
      condition image (or a list, one per ControlNet); each is one image for every prompt, or a list with
      one per prompt; resized to the output size, read as RGB in [0, 1] (diffusers' control image
      processor). Works with txt2img, img2img and inpainting.
    controlnet_conditioning_scale, control_guidance_start, control_guidance_end: per ControlNet (or one
      for all): the residuals' scale and the fractions of the model calls where it acts, as diffusers.
    guess_mode: diffusers' guess mode (the ControlNet sees the conditional half only, its residuals scaled
      from 0.1 at the shallowest to 1 at the mid block). Traced: the condition images, scales, start/end.

    SDXL only (diffusers' `StableDiffusionXLPipeline` names; all traced):
    prompt_2, negative_prompt_2: the prompts of the second text encoder (default: prompt and
      negative_prompt). With no negative prompt at all, SDXL base models (`force_zeros_for_empty_prompt`)
      use zero embeddings for the unconditional half, as diffusers.
    original_size, target_size: (height, width) pixels told to the UNet (default: the image size);
      crops_coords_top_left: (top, left) (default (0, 0)). negative_original_size,
      negative_crops_coords_top_left, negative_target_size: the unconditional half's (default: the
      prompt's ids; once one is given, the others default to the prompt's sizes and crop (0, 0), as
      diffusers, which however uses them only when both negative sizes are given).
    aesthetic_score, negative_aesthetic_score: the refiner's (`requires_aesthetics_score`) instead of the
      target size (defaults 6.0 and 2.5).

    Hand-over between models (diffusers' "ensemble of experts": SDXL base, then refiner; any model):
    denoising_end: a fraction in (0, 1): stop once the timesteps fall below (1 - denoising_end) of the
      training schedule, as diffusers (e.g. 0.8 with output_type="latent").
    output_type: "image" (uint8 (B, H, W, 3)) or "latent": the latents where sampling stopped, float32
      (B, H/8, W/8, 4) NHWC, in the UNet's (scaled) latent space, not decoded.
    denoising_start: img2img: a fraction in (0, 1): start where the timesteps fall below (1 -
      denoising_start) of the schedule, from `image` as it is (no noise added; `strength` is ignored), as
      diffusers. `image` may then be latents: a float (B, h, w, 4) NHWC array (one per image), such as
      another call's output_type="latent".
    """

    num_inference_steps: int = 50
    guidance_scale: float | None = None
    scheduler: Any = None
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    seed: int | Sequence[int] = 0
    latents: Any = None
    image: Any = None
    strength: float = 0.8
    mask_image: Any = None
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    max_steps: int | None = None
    micro_batch_size: int | None = None
    mesh: Any = "all"
    loras: Sequence | None = None
    vae_tiling: bool = False
    controlnet: Any = None
    control_image: Any = None
    controlnet_conditioning_scale: float | Sequence[float] = 1.0
    control_guidance_start: float | Sequence[float] = 0.0
    control_guidance_end: float | Sequence[float] = 1.0
    guess_mode: bool = False
    prompt_2: str | Sequence[str] | None = None
    negative_prompt_2: str | Sequence[str] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None
    output_type: str = "image"

    def __post_init__(self):
        steps, per_prompt = (
            integer("num_inference_steps", self.num_inference_steps),
            integer("num_images_per_prompt", self.num_images_per_prompt),
        )
        for name in ("guidance_scale", "guidance_rescale", "strength", "aesthetic_score", "negative_aesthetic_score"):
            if getattr(self, name) is not None:
                finite_number(name, getattr(self, name))
        for name in ("denoising_start", "denoising_end"):
            value = getattr(self, name)
            if value is not None and not 0.0 < finite_number(name, value) < 1.0:
                raise ValueError(f"{name} must be a fraction strictly between 0 and 1, got {value!r}")
        if self.denoising_start is not None and self.denoising_end is not None:
            if float(self.denoising_end) <= float(self.denoising_start):
                raise ValueError(
                    f"denoising_end {self.denoising_end} must be above denoising_start {self.denoising_start}"
                )
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}")
        for name in SIZE_OPTIONS:
            value = getattr(self, name)
            if value is not None:
                pair(name, value)
        for name in ("micro_batch_size", "clip_skip", "max_steps", "height", "width"):
            if getattr(self, name) is not None:
                integer(name, getattr(self, name))
        checks = (
            (steps >= 1, f"num_inference_steps must be >= 1, got {self.num_inference_steps}"),
            (steps <= MAX_STEPS, f"num_inference_steps must be <= {MAX_STEPS}, got {self.num_inference_steps}"),
            (per_prompt >= 1, f"num_images_per_prompt must be >= 1, got {self.num_images_per_prompt}"),
            (0.0 <= float(self.strength) <= 1.0, f"strength must be in [0, 1], got {self.strength}"),
            (
                0.0 <= float(self.guidance_rescale) <= 1.0,
                f"guidance_rescale must be in [0, 1], got {self.guidance_rescale}",
            ),
            (self.clip_skip is None or int(self.clip_skip) >= 0, f"clip_skip must be >= 0, got {self.clip_skip}"),
            (
                self.micro_batch_size is None or int(self.micro_batch_size) >= 1,
                f"micro_batch_size must be >= 1, got {self.micro_batch_size}",
            ),
            (self.mask_image is None or self.image is not None, "mask_image needs an init image (image=...)"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_steps is not None and steps > int(self.max_steps):
            raise ValueError(f"num_inference_steps={steps} is above max_steps={self.max_steps}")

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> GenerateOptions:
        """The options of a keyword-argument call, with a one-line error naming an unknown option."""
        known = {f.name for f in dataclasses.fields(cls)}
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"generate() got an unknown option {name!r}{hint}; see sdjax.GenerateOptions")
        return cls(**options)

    @property
    def steps(self) -> int:
        return int(self.num_inference_steps)

    @property
    def padded_steps(self) -> int:
        """The static step bound of the program (`max_steps`, or the next multiple of 50)."""
        return default_max_steps(self.steps) if self.max_steps is None else int(self.max_steps)


# the largest step count (the training schedule's length: more steps would repeat timesteps)
MAX_STEPS = 1000


def integer(name: str, value) -> int:
    """`value` as an int, or a one-line error naming the option (a bool or a fraction is not an integer)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        if not (isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


OUTPUT_TYPES = ("image", "latent")

# SDXL's micro-conditioning (height, width) / (top, left) pairs
SIZE_OPTIONS = (
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
)


def pair(name: str, value) -> tuple[int, int]:
    """`value` as a pair of non-negative integers, or a one-line error naming the option."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair of integers such as (1024, 1024), got {value!r}")
    first, second = (integer(name, v) for v in value)
    if first < 0 or second < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return first, second


def finite_number(name: str, value) -> float:
    """`value` as a finite float, or a one-line error naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def default_max_steps(num_steps: int) -> int:
    """The padded table length for a step count: the next multiple of 50, so 1..50 steps share a program."""
    return 50 * max(1, -(-num_steps // 50))


__all__ = [
    "MAX_STEPS",
    "OUTPUT_TYPES",
    "SIZE_OPTIONS",
    "GenerateOptions",
    "default_max_steps",
    "finite_number",
    "integer",
    "pair",
]
