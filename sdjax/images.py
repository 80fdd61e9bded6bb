"""Images in and out: reading init images and masks, uint8 conversion, PNG files with A1111 metadata, grids.

Arrays are NHWC. Pre-processing follows diffusers' `VaeImageProcessor`: RGB, Lanczos resize, [0, 1] ->
[-1, 1] for images; grayscale, Lanczos resize, binarised at 0.5 for masks (1 = repaint).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

# A1111's display names of the samplers, for the `parameters` text chunk.
A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "lms_karras": "LMS Karras",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "unipc": "UniPC",
    "ddpm": "DDPM",
}


def open_image(source: str | os.PathLike | Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """A PIL image from a path, a PIL image, or a uint8 array (H, W[, C]); one-line error if unreadable."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8:
            raise ValueError(f"{what} arrays must be uint8 (H, W[, C]), got {source.dtype}")
        return Image.fromarray(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB image -> float32 (1, height, width, 3) in [-1, 1], Lanczos-resized if needed."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0 * 2.0 - 1.0)[None]


def mask_to_array(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """Mask -> float32 (1, height, width, 1) of 0/1 (1 where the image is repainted)."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    values = np.asarray(mask, np.float32) / 255.0
    return (values >= 0.5).astype(np.float32)[None, :, :, None]


def a1111_parameters(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    guidance: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    extra: dict[str, object] | None = None,
) -> str:
    """The `parameters` text A1111 writes into its PNGs (and that image sites and tools parse)."""
    fields = {
        "Steps": steps,
        "Sampler": A1111_SAMPLER_NAMES.get(sampler, sampler),
        "CFG scale": f"{guidance:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    fields.update(extra or {})
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


def save_png(path: str | os.PathLike, image_HWC: np.ndarray, parameters: str | None = None) -> Path:
    """Writes a PNG with an optional `parameters` text chunk, atomically (temporary file, then rename), so
    a killed run never leaves a half-written image that a resumed run would take for a finished one."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.asarray(image_HWC, np.uint8)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def grid(images_BHWC: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tiles B images of one size into a near-square uint8 grid (rows filled left to right)."""
    b, h, w, c = images_BHWC.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    out = np.full((rows * h, columns * w, c), 255, np.uint8)
    for i, img in enumerate(images_BHWC):
        r, col = divmod(i, columns)
        out[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return out
