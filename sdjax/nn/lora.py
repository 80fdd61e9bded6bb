"""LoRA adapters as arrays: the low-rank updates of linear and conv kernels, applied inside jitted programs.

An adapter is a pytree {"unet": {path: {"A", "B", "multiplier"}}, "text_encoder": {...}} where `path` is
a kernel owner's parameter path joined with "/" (e.g. "down_blocks.0/attentions.0/transformer_blocks.0/
attn1/to_q"), A is (in, r) for a linear kernel (in, out) or (kh, kw, in, r) for a conv kernel
(kh, kw, in, out), B is (r, out), and `multiplier` (an f32[] array, alpha / rank) scales A @ B. Adapters
of the same shapes are interchangeable inside one compiled program. File formats (kohya, PEFT) are read
and written by `sdjax.convert.lora`; training makes A and B directly (train/model.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL's second


def _replace(tree: Mapping, path: tuple[str, ...], value) -> dict:
    """A copy of nested dict `tree` with the leaf at `path` replaced (only the dicts along the path copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _replace(tree[path[0]], path[1:], value)
    return out


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _part_scales(scales, part: str, count: int) -> jax.Array:
    values = scales[part] if isinstance(scales, Mapping) else scales
    values = jnp.asarray(values, jnp.float32).reshape(-1)
    if values.shape[0] != count:
        raise ValueError(f"{count} adapters but {values.shape[0]} {part} scales")
    return values


def apply_adapters(params: Mapping, adapters: Sequence[Mapping], scales) -> dict:
    """params with W' = W + sum_i scales_i * multiplier * A_i @ B_i for every adapted kernel (pure, jittable).

    Args:
      params: {"unet": ..., "text_encoder": ..., ...} as `StableDiffusionPipeline.params`.
      adapters: n adapter pytrees (see the module doc; arrays: a jitted caller can swap them freely as long
        as the shapes stay the same).
      scales: n weights, an array (n,) for both components, or {"unet": (n,), "text_encoder": (n,)}.
    The update is computed in float32 and the result cast back to each kernel's dtype.
    """
    deltas: dict[tuple[str, ...], jax.Array] = {}
    for part in COMPONENTS:
        if not any(part in adapter for adapter in adapters):
            continue
        weights = _part_scales(scales, part, len(adapters))
        for i, adapter in enumerate(adapters):
            for key, m in adapter.get(part, {}).items():
                path = (part, *key.split("/"), "kernel")
                delta = jnp.tensordot(m["A"], m["B"], axes=1) * (m["multiplier"] * weights[i])
                deltas[path] = deltas[path] + delta if path in deltas else delta
    out = dict(params)
    for path, delta in deltas.items():
        kernel = _get(params, path)
        out = _replace(out, path, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return out


def component_scales(scale) -> dict[str, float]:
    """A LoRA scale (a finite number, or {"unet": a, "text_encoder": b}, a missing part at 1 as in diffusers;
    SDXL's "text_encoder_2" defaults to the "text_encoder" value) -> {component: float}; a one-line
    ValueError for anything else."""
    if isinstance(scale, Mapping):
        unknown = set(scale) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"LoRA scale has unknown parts {sorted(unknown)}: use {list(COMPONENTS)}")
        text = scale.get("text_encoder", 1.0)
        defaults = {"unet": 1.0, "text_encoder": 1.0, "text_encoder_2": text}
        return {part: _scale_number(scale.get(part, defaults[part])) for part in COMPONENTS}
    value = _scale_number(scale)
    return dict.fromkeys(COMPONENTS, value)


def _scale_number(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"a LoRA scale must be a finite number (or {{'unet': a, 'text_encoder': b}}), got {value!r}")
    return number


def merge_lora(params: Mapping, adapter: Mapping, scale: float | Mapping[str, float] = 1.0) -> dict:
    """New params with one adapter folded in at `scale` (a float, or {"unet": s, "text_encoder": s})."""
    scales = {part: [value] for part, value in component_scales(scale).items()}
    return apply_adapters(params, [adapter], scales)


__all__ = ["COMPONENTS", "apply_adapters", "component_scales", "merge_lora"]
