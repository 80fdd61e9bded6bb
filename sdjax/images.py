"""Images in and out: reading init images and masks, uint8 conversion, PNG files with A1111 metadata, grids.

Arrays are NHWC. Pre-processing follows diffusers' `VaeImageProcessor`: RGB, Lanczos resize, [0, 1] ->
[-1, 1] for images; grayscale, Lanczos resize, binarised at 0.5 for masks (1 = repaint).

Every Pillow mode is read as 8-bit by its value range (`to_rgb8`, `to_gray8`), not by Pillow's `convert`,
which clips high-depth grayscale (a 16-bit image would read as nearly white):
  1, L: as is (1 -> 0/255).
  I;16, I;16L, I;16B, I;16N: 0..65535 -> value / 257, rounded.
  I (signed 32-bit): negatives -> 0; then by the largest value: <= 255 as 8-bit, <= 65535 as 16-bit (/ 257),
    else as 0..2**31 - 1. (So a 16-bit image whose values all stay <= 255 reads as 8-bit.)
  F (float): NaN and negatives -> 0; then by the largest value: <= 1.0 as [0, 1] (x 255), <= 255 as 0..255,
    else as 0..65535 (/ 257, larger values clipped).
  P, PA, LA, La, RGBa, RGBA: palettes (and their transparency) and premultiplied alpha resolved through
    RGBA (LA), then alpha dropped as diffusers' `image.convert("RGB")` does (no compositing onto a colour).
  RGB, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB (8 bits per channel already).
Grayscale (masks) is the RGB result's luminance (ITU-R 601-2, Pillow's "L"), or the single channel directly.
Of an animated image (GIF, APNG, WebP) the current frame is read: the first one of a freshly opened file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sdjax import files


class ImageModeError(ValueError):
    """An image in a pixel format that cannot be read as 8-bit RGB or grayscale."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_SINGLE_CHANNEL = ("1", "L", "I", "F", *_SIXTEEN_BIT)
_WITH_ALPHA = {"P": "RGBA", "PA": "RGBA", "LA": "LA", "La": "LA", "RGBa": "RGBA", "RGBA": "RGBA"}
_COLOUR = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
IMAGE_MODES = frozenset((*_SINGLE_CHANNEL, *_WITH_ALPHA, *_COLOUR))
ARRAY_SHAPES = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"


def check_mode(mode: str, what: str = "image") -> None:
    """Raises `ImageModeError` unless Pillow mode `mode` is one `to_rgb8` / `to_gray8` read."""
    if mode not in IMAGE_MODES:
        raise ImageModeError(f"{what} has Pillow mode {mode!r}, which cannot be read: save it as RGB or grayscale")


def _scale(values: np.ndarray, full: float) -> np.ndarray:
    """uint8 levels of `values` whose range is 0..full: clipped to it, x 255 / full, rounded."""
    return np.round(np.clip(values, 0.0, full) * (255.0 / full)).astype(np.uint8)


def _int_range(values: np.ndarray) -> float:
    """The full scale of mode I values (float64, negatives clipped) by the largest: 8, 16 or 31 bits."""
    top = float(values.max(initial=0.0))
    return 255.0 if top <= 255 else 65535.0 if top <= 65535 else float(2**31 - 1)


def _float_range(values: np.ndarray) -> float:
    """The full scale of mode F values (float64, NaN -> 0, negatives clipped) by the largest: 1, 255 or 65535."""
    top = float(values.max(initial=0.0))
    return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0


def _gray_levels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) levels of a single-channel image, by its mode's value range (module doc)."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    values = np.asarray(image, np.float64)
    values = np.where(np.isnan(values), 0.0, values).clip(min=0.0)
    if image.mode in _SIXTEEN_BIT:
        return _scale(values, 65535.0)
    return _scale(values, _int_range(values) if image.mode == "I" else _float_range(values))


def to_rgb8(image: Image.Image, what: str = "image") -> Image.Image:
    """An 8-bit RGB copy of `image` (its current frame), converted by value range (rules in the module
    doc); alpha dropped. `ImageModeError` for a mode it cannot read."""
    check_mode(image.mode, what)
    if image.mode in _SINGLE_CHANNEL:
        return Image.fromarray(_gray_levels(image)).convert("RGB")
    if image.mode in _WITH_ALPHA:
        image = image.convert(_WITH_ALPHA[image.mode])
    try:
        return image.convert("RGB")
    except ValueError as err:  # e.g. LAB with an older Pillow
        raise ImageModeError(f"cannot convert {what} of mode {image.mode} to RGB ({err}): save it as RGB") from None


def to_gray8(image: Image.Image, what: str = "image") -> Image.Image:
    """An 8-bit grayscale ("L") copy of `image`: a single channel by value range, else the luminance of
    `to_rgb8` (alpha dropped)."""
    check_mode(image.mode, what)
    if image.mode in _SINGLE_CHANNEL:
        return Image.fromarray(_gray_levels(image))
    return to_rgb8(image, what).convert("L")


def _array_levels(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 levels of a uint8, uint16 (/ 257), bool (x 255) or float [0, 1] (x 255) array, rounded."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return _scale(array.astype(np.float64), 65535.0)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (0.0 <= low and high <= 1.0):  # NaN fails too
            raise ValueError(
                f"{what} float arrays must hold values in [0, 1], got [{low:g}, {high:g}]: rescale them "
                "(from [-1, 1]: (x + 1) / 2)"
            )
        return _scale(array.astype(np.float64), 1.0)
    raise ValueError(f"{what} arrays must be uint8, uint16, bool or float in [0, 1], got {array.dtype}")


def array_to_image(array: np.ndarray, what: str = "image") -> Image.Image:
    """A PIL image (L, RGB or RGBA) from an array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4):
    uint8, uint16 (/ 257), bool (0/255) or float in [0, 1] (x 255), rounded."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"{what} array has shape {array.shape}: expected {ARRAY_SHAPES}")
    if array.size == 0:
        raise ValueError(f"{what} array of shape {array.shape} is empty: pass an image of at least one pixel")
    return Image.fromarray(np.ascontiguousarray(_array_levels(array, what)))


def open_image(source: str | os.PathLike | Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """A PIL image from a path (the first frame of an animation), a PIL image (as is), or an array (as
    `array_to_image`); one-line error if unreadable."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return array_to_image(source, what)
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """Image of any mode -> float32 (1, height, width, 3) in [-1, 1]: 8-bit RGB by value range (`to_rgb8`),
    Lanczos-resized if needed."""
    image = to_rgb8(image, "init image")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0 * 2.0 - 1.0)[None]


def control_image_to_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A ControlNet condition image of any mode -> float32 (1, height, width, 3) in [0, 1], Lanczos-resized
    if needed (diffusers' control image processor: RGB, no normalisation to [-1, 1])."""
    image = to_rgb8(image, "control image")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, np.float32) / 255.0)[None]


def mask_to_array(mask: Image.Image, height: int, width: int) -> np.ndarray:
    """Mask of any mode -> float32 (1, height, width, 1) of 0/1 (1 where the image is repainted): 8-bit
    grayscale by value range (`to_gray8`), Lanczos-resized if needed, then >= 0.5."""
    mask = to_gray8(mask, "mask")
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
    """The `parameters` text A1111 writes into its PNGs (and that image sites and tools parse); `sampler` is
    written as given (A1111's name: `sdjax.schedulers.a1111_name`)."""
    fields = {
        "Steps": steps,
        "Sampler": sampler,
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
    with files.replacing(path) as tmp:
        Image.fromarray(np.asarray(image_HWC, np.uint8)).save(tmp, format="PNG", pnginfo=info)
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
