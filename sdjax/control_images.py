"""Condition images for ControlNet that need no network of their own: Canny edges, thresholded scribbles,
the tile model's blurred copy, grayscale maps as RGB, and fitting a map to the output size.

Every function takes a PIL image (any mode `sdjax.images.to_rgb8` reads) or an array (H, W[, C]) of uint8
(uint16, bool and float [0, 1] arrays too, as `sdjax.images.array_to_image` reads them), and returns a
uint8 (H, W, 3) numpy array: what diffusers' ControlNet pipelines and A1111's ControlNet extension take.

`canny` is OpenCV's `cv2.Canny(image, low, high)` (aperture 3, L1 gradient) rewritten in numpy, pixel for
pixel:
  1. Grayscale as `cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)` computes it for uint8 (fixed point, 15 bits:
     (9798 R + 19235 G + 3735 B + 2**14) >> 15), or, with `color=True`, all three channels, as
     `cv2.Canny(rgb, ...)` treats a colour array (what diffusers' docs and lllyasviel's annotator do).
  2. 3x3 Sobel derivatives, the border replicated; magnitude |gx| + |gy| (integers). Of several channels,
     the one with the largest magnitude (the first on ties) gives the pixel's gradient.
  3. Non-maximum suppression along the gradient, quantised to 4 directions by tan(22.5 degrees) in
     15-bit fixed point; beyond the image the magnitude is 0. Horizontal: larger than the left neighbour,
     at least the right one; vertical: larger than the upper, at least the lower; diagonal: larger than both.
  4. Candidates: the local maxima above floor(low); strong: above floor(high) (thresholds swapped if low >
     high). Edges: the candidates 8-connected to a strong one (hysteresis, by labelling the candidates).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
from PIL import Image

from sdjax import images

ImageLike = Image.Image | np.ndarray | str | os.PathLike

# cv2.cvtColor's uint8 RGB -> gray weights, 15-bit fixed point (they sum to 2**15): 0.299, 0.587, 0.114.
_GRAY_WEIGHTS = (9798, 19235, 3735)
_GRAY_SHIFT = 15
# tan(22.5 degrees) in 15-bit fixed point: the sector boundaries of the non-maximum suppression.
_TAN22_SHIFT = 15
_TAN22 = 13573

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "area": Image.BOX,
}
FIT_MODES = ("resize", "crop", "pad")


def _rgb(image: ImageLike, what: str = "control image") -> np.ndarray:
    """uint8 (H, W, 3) of a PIL image, array or image file, read by value range (`images.to_rgb8`)."""
    if not isinstance(image, Image.Image | np.ndarray | str | os.PathLike):
        raise TypeError(f"{what} must be a PIL image, a numpy array or a path, got {type(image).__name__}")
    return np.asarray(images.to_rgb8(images.open_image(image, what), what))


def _three(gray_HW: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W, 3), the channel repeated."""
    return np.repeat(gray_HW[:, :, None], 3, axis=2)


def gray_levels(rgb_HW3: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H, W) luma, bit-identical to `cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)`
    (0.299 R + 0.587 G + 0.114 B in 15-bit fixed point, rounded half up)."""
    rgb = rgb_HW3.astype(np.int32)
    r, g, b = _GRAY_WEIGHTS
    total = rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b + (1 << (_GRAY_SHIFT - 1))
    return (total >> _GRAY_SHIFT).astype(np.uint8)


def sobel(levels_HWC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel derivatives of uint8 (H, W, C), border replicated -> int32 (gx, gy), each (H, W, C), in
    levels (|g| <= 4 * 255); gx grows to the right, gy downwards."""
    p = np.pad(levels_HWC.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]  # vertical smoothing, (H, W + 2, C)
    cols = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]  # horizontal smoothing, (H + 2, W, C)
    return rows[:, 2:] - rows[:, :-2], cols[2:] - cols[:-2]


def _strongest_channel(gx: np.ndarray, gy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int32 (H, W, C) derivatives -> (gx, gy, |gx| + |gy|), each (H, W), of the channel with the largest
    magnitude at each pixel (the first of equals)."""
    magnitude = np.abs(gx) + np.abs(gy)
    pick = np.argmax(magnitude, axis=2)[:, :, None]
    return tuple(np.take_along_axis(a, pick, axis=2)[:, :, 0] for a in (gx, gy, magnitude))


def _local_maxima(gx: np.ndarray, gy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """bool (H, W): where the int32 (H, W) `magnitude` is a maximum along the gradient direction (module
    doc, step 3); neighbours beyond the image count as 0."""
    m = np.pad(magnitude, 1)
    centre = m[1:-1, 1:-1]
    x = np.abs(gx).astype(np.int64)
    y = np.abs(gy).astype(np.int64) << _TAN22_SHIFT
    tan22_x = x * _TAN22
    horizontal = y < tan22_x
    vertical = ~horizontal & (y > tan22_x + (x << (_TAN22_SHIFT + 1)))
    diagonal = ~horizontal & ~vertical
    falling = (gx < 0) != (gy < 0)  # gradient along (+x, -y) or (-x, +y): the anti-diagonal neighbours
    diag_before = np.where(falling, m[:-2, 2:], m[:-2, :-2])  # above right / above left
    diag_after = np.where(falling, m[2:, :-2], m[2:, 2:])  # below left / below right
    return (
        (horizontal & (centre > m[1:-1, :-2]) & (centre >= m[1:-1, 2:]))
        | (vertical & (centre > m[:-2, 1:-1]) & (centre >= m[2:, 1:-1]))
        | (diagonal & (centre > diag_before) & (centre > diag_after))
    )


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """bool (H, W): the `candidates` pixels 8-connected (through candidates) to a `strong` one."""
    from scipy import ndimage  # here: the import is slow, and most processes never draw an edge map

    labels, count = ndimage.label(candidates, structure=np.ones((3, 3), bool))
    keep = np.zeros(count + 1, bool)
    keep[labels[strong]] = True
    keep[0] = False
    return keep[labels]


def _check_threshold(value: float, name: str) -> None:
    """ValueError unless `value` is a finite number (a threshold on the gradient magnitude, in levels)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number (a gradient magnitude, e.g. 100), got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}: pass a gradient magnitude such as 100")


def canny_edges(levels_HWC: np.ndarray, low_threshold: float, high_threshold: float) -> np.ndarray:
    """bool (H, W) Canny edges of uint8 (H, W, C) levels, as `cv2.Canny` (aperture 3, L1 gradient) finds
    them (module doc); thresholds on |gx| + |gy| in levels of the 3x3 Sobel filter (up to 2040)."""
    low, high = sorted((math.floor(low_threshold), math.floor(high_threshold)))
    gx, gy, magnitude = _strongest_channel(*sobel(levels_HWC))
    candidates = (magnitude > low) & _local_maxima(gx, gy, magnitude)
    return _hysteresis(candidates, candidates & (magnitude > high))


def canny(image: ImageLike, low_threshold: float = 100, high_threshold: float = 200, color: bool = True) -> np.ndarray:
    """uint8 (H, W, 3) Canny edge map, 255 on 0: `cv2.Canny(rgb, low, high)` on the image's three channels
    (the default: the ControlNet annotator's and diffusers' docs' recipe, what ControlNet canny models were
    trained on), or `cv2.Canny(gray, low, high)` on its OpenCV grayscale with `color=False`; thresholds on
    |gx| + |gy| of 3x3 Sobel, in levels."""
    _check_threshold(low_threshold, "low_threshold")
    _check_threshold(high_threshold, "high_threshold")
    rgb = _rgb(image)
    levels = rgb if color else gray_levels(rgb)[:, :, None]
    return _three(canny_edges(levels, low_threshold, high_threshold).astype(np.uint8) * 255)


def threshold_scribble(image: ImageLike, threshold: int = 128, invert: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) scribble map: 255 where the grayscale (`gray_levels`) is above `threshold` (0..255),
    else 0 (white lines on black, as the scribble models take); `invert=True` for black-on-white drawings
    (255 where it is at most `threshold`)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | np.integer) or not 0 <= threshold <= 255:
        raise ValueError(f"threshold must be an integer level in 0..255, got {threshold!r}")
    lines = gray_levels(_rgb(image, "scribble")) > threshold
    return _three(((lines != invert) * 255).astype(np.uint8))


def grayscale_to_rgb(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3) of a one-channel map (depth, normals' luma...): its 8-bit levels by value range
    (a 16-bit or float depth map too, `images.to_gray8`) in all three channels; a colour image is taken
    by its luminance (Pillow's "L")."""
    if not isinstance(image, Image.Image | np.ndarray | str | os.PathLike):
        raise TypeError(f"map must be a PIL image, a numpy array or a path, got {type(image).__name__}")
    return _three(np.asarray(images.to_gray8(images.open_image(image, "map"), "map")))


def _resample(name: str) -> Image.Resampling:
    """The Pillow filter of a resampling name ("nearest", "bilinear", "bicubic", "lanczos", "area")."""
    if name not in _RESAMPLE:
        raise ValueError(f"unknown resampling {name!r}: use one of {', '.join(_RESAMPLE)}")
    return _RESAMPLE[name]


def _check_size(width: int, height: int) -> None:
    """ValueError unless `width` and `height` are positive integers (pixels)."""
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")


def _resize(rgb_HW3: np.ndarray, width: int, height: int, resample: str) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (height, width, 3), resampled with Pillow (a copy if the size is the same)."""
    if rgb_HW3.shape[:2] == (height, width):
        return rgb_HW3.copy()
    return np.asarray(Image.fromarray(rgb_HW3).resize((width, height), _resample(resample)))


def downscale_for_tile(image: ImageLike, size: tuple[int, int]) -> np.ndarray:
    """uint8 (height, width, 3): the image reduced to `size` = (width, height) pixels by area averaging."""
    if not (isinstance(size, tuple | list) and len(size) == 2):
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    _check_size(*size)
    rgb = _rgb(image, "tile image")
    if size[0] > rgb.shape[1] or size[1] > rgb.shape[0]:
        raise ValueError(
            f"tile size {size[0]}x{size[1]} is larger than the image ({rgb.shape[1]}x{rgb.shape[0]}): "
            "pass a smaller (width, height)"
        )
    return _resize(rgb, *size, "area")


def tile(
    image: ImageLike, factor: float = 2.0, size: tuple[int, int] | None = None, resample: str = "lanczos"
) -> np.ndarray:
    """uint8 (H, W, 3) condition of the tile model: the image reduced `factor` times per side by area
    averaging (each side int(side / factor), at least 1 pixel, as A1111's tile_resample), then resized
    (`resample`) to `size` = (width, height), by default the image's own size; `factor` 1: the image."""
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1.0 <= factor < math.inf:
        raise ValueError(f"factor must be a number >= 1 (how many times smaller per side), got {factor!r}")
    _resample(resample)
    rgb = _rgb(image, "tile image")
    height, width = rgb.shape[:2]
    out_w, out_h = (width, height) if size is None else size
    _check_size(out_w, out_h)
    small = _resize(rgb, max(1, int(width / factor)), max(1, int(height / factor)), "area")
    return _resize(small, out_w, out_h, resample)


def fit_to_size(
    image: ImageLike, width: int, height: int, mode: str = "resize", resample: str = "lanczos"
) -> np.ndarray:
    """uint8 (height, width, 3) of a control map, as A1111's resize modes: "resize" (Just Resize, the
    aspect ratio not kept), "crop" (Crop and Resize: scaled to cover, the centre kept) or "pad" (Resize
    and Fill: scaled to fit, centred, the rest filled with the median colour of the map's border pixels)."""
    _check_size(width, height)
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}: use one of {', '.join(FIT_MODES)}")
    _resample(resample)
    rgb = _rgb(image)
    if mode == "resize":
        return _resize(rgb, width, height, resample)
    h, w = rgb.shape[:2]
    scale = (max if mode == "crop" else min)(width / w, height / h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    scaled = _resize(rgb, new_w, new_h, resample)
    if mode == "crop":
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return scaled[top : top + height, left : left + width].copy()
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.median(border, axis=0).astype(np.uint8)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


PREPROCESSORS: dict[str, Callable[..., np.ndarray]] = {
    "canny": canny,
    "scribble": threshold_scribble,
    "tile": tile,
    "gray": grayscale_to_rgb,
}


def preprocess(name: str, image: ImageLike, **options) -> np.ndarray:
    """uint8 (H, W, 3) condition image of preprocessor `name` (a key of `PREPROCESSORS`) with its options."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}: use one of {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name](image, **options)
