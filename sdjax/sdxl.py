"""SDXL's conditioning on the host: the second tokenizer's prompt rows and the micro-conditioning time ids.

diffusers' `StableDiffusionXLPipeline` conditions its UNet on two text encoders' states (concatenated per
token), the second encoder's projected pooled embedding, and six "time ids" per image: the original size
(height, width), the crop's top-left corner and the target size (the refiner: original size, crop and an
aesthetic score). The unconditional half of classifier-free guidance has its own (`negative_*`) ids.
"""

from __future__ import annotations

import numpy as np

from sdjax.options import SIZE_OPTIONS, GenerateOptions, pair

# the generation options only SDXL models take
OPTIONS = ("prompt_2", "negative_prompt_2", *SIZE_OPTIONS, "aesthetic_score", "negative_aesthetic_score")


def time_id_rows(pipe, opts: GenerateOptions, height: int, width: int, batch: int) -> np.ndarray:
    """float32 (B, 2, N): each image's [negative, positive] time ids (N = 6, or 5 with an aesthetic score).

    Sizes default to the image's (height, width), the crop to (0, 0). The negative ids are the positive
    ones unless a negative value is given; then the others default to the positive sizes and crop (0, 0)
    (diffusers' defaults; diffusers uses negative values only when both negative sizes are given).
    Refuses ids whose count does not fit the UNet's add_embedding (a refiner's UNet on a base model's
    settings, or the reverse), as diffusers does.
    """
    size = (height, width)
    original = pair("original_size", opts.original_size or size)
    crop = pair("crops_coords_top_left", opts.crops_coords_top_left)
    target = pair("target_size", opts.target_size or size)
    negative_original, negative_crop, negative_target = original, crop, target
    given = (opts.negative_original_size, opts.negative_crops_coords_top_left, opts.negative_target_size)
    if any(value is not None for value in given):
        negative_original = pair("negative_original_size", opts.negative_original_size or original)
        negative_crop = pair("negative_crops_coords_top_left", opts.negative_crops_coords_top_left or (0, 0))
        negative_target = pair("negative_target_size", opts.negative_target_size or target)
    if pipe.requires_aesthetics_score:
        positive = (*original, *crop, float(opts.aesthetic_score))
        negative = (*negative_original, *negative_crop, float(opts.negative_aesthetic_score))
    else:
        positive = (*original, *crop, *target)
        negative = (*negative_original, *negative_crop, *negative_target)
    unet = pipe.unet.config
    width_in = unet.addition_time_embed_dim * len(positive) + pipe.text_encoder_2.config.projection_dim
    if width_in != unet.projection_class_embeddings_input_dim:
        which = "an aesthetic score" if pipe.requires_aesthetics_score else "a target size"
        raise ValueError(
            f"{len(positive)} time ids ({which}) and text embeddings of width "
            f"{pipe.text_encoder_2.config.projection_dim} make {width_in} features, but the UNet's add_embedding "
            f"takes {unet.projection_class_embeddings_input_dim}: set requires_aesthetics_score in model_index.json "
            "to match the UNet (true for a refiner, false for a base model)"
        )
    rows = np.asarray([negative, positive], np.float32)
    return np.array(np.broadcast_to(rows, (batch, *rows.shape)))


def second_prompts(
    prompts: list[str], negatives: list[str], opts: GenerateOptions, per_prompt: int
) -> tuple[list[str], list[str]]:
    """(negative, positive) prompts of the second text encoder per image: `negative_prompt_2` and
    `prompt_2` (each one for every prompt or one per prompt; default: the image's own prompts)."""
    count = len(prompts) // per_prompt
    seconds = _per_prompt(opts.prompt_2, prompts[::per_prompt], count, "prompt_2")
    second_negatives = _per_prompt(opts.negative_prompt_2, negatives[::per_prompt], count, "negative_prompt_2")
    seconds = [p for p in seconds for _ in range(per_prompt)]
    second_negatives = [p for p in second_negatives for _ in range(per_prompt)]
    return second_negatives, seconds


def _per_prompt(value, default: list[str], count: int, name: str) -> list[str]:
    """An SDXL second prompt option as one string per prompt: the default, one for all, or one per prompt."""
    if value is None:
        return default
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, list | tuple) else None
    if not values or not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must be a string or a non-empty list of strings")
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        raise ValueError(f"{len(values)} {name} for {count} prompts: give one, or one per prompt")
    return values


__all__ = ["OPTIONS", "second_prompts", "time_id_rows"]
