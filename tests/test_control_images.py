"""ControlNet condition images (sdjax.control_images): Canny edges pixel-identical to OpenCV's `cv2.Canny`
on procedural images (shapes, textures, text; several seeds and sizes, threshold pairs, gray and colour),
OpenCV's grayscale, and the other preprocessors' results and errors. Run with -s for the comparison table."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from sdjax import control_images as ci

# (low, high): diffusers' default, softer and harder, swapped (OpenCV swaps them), fractional (floored).
THRESHOLDS = ((100, 200), (50, 150), (20, 60), (200, 100), (100.7, 300.2))
SIZES = ((512, 512), (333, 517))  # (height, width)


def _shapes(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): smooth colour gradients under random ellipses, rectangles and quadrilaterals, plus
    Gaussian noise (sigma 6 levels)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([120 + 100 * np.sin(3 * xx + c) * np.cos(2 * yy - c) for c in (0, 1, 2)], axis=-1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(5, width // 3)), y0 + int(rng.integers(5, height // 3)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.ellipse(box, fill=colour)
        elif kind == 1:
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(4)], fill=colour)
    noisy = np.asarray(image, np.float64) + rng.normal(0.0, 6.0, (height, width, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def _texture(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): six octaves of bicubically upsampled colour noise (a cloudy, natural-ish texture),
    stretched to 0..255."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3))
    for octave in range(1, 7):
        cells = rng.random((2**octave + 1, 2**octave + 1, 3)) * 255
        up = Image.fromarray(cells.astype(np.uint8)).resize((width, height), Image.BICUBIC)
        out += np.asarray(up, np.float64) / 2 ** (7 - octave)
    return ((out - out.min()) / (out.max() - out.min()) * 255).astype(np.uint8)


def _text(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (H, W, 3): lines of random letters rendered at 3x with Pillow's font, Lanczos-downscaled."""
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", (3 * width, 3 * height), (240, 235, 220))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=60)
    for line in range(3 * height // 70):
        letters = "".join(chr(c) for c in rng.integers(65, 123, 30))
        draw.text((10, 10 + 70 * line), letters, fill=tuple(int(c) for c in rng.integers(0, 120, 3)), font=font)
    return np.asarray(page.resize((width, height), Image.LANCZOS))


MAKERS = {"shapes": _shapes, "texture": _texture, "text": _text}
CASES = [(kind, seed, size) for kind in MAKERS for seed in (0, 1) for size in SIZES]


def _opencv_canny(rgb: np.ndarray, low: float, high: float, color: bool) -> np.ndarray:
    """uint8 (H, W) of cv2.Canny on the RGB array (`color`) or its cv2 grayscale."""
    return cv2.Canny(rgb if color else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)


@pytest.mark.parametrize("kind,seed,size", CASES, ids=[f"{k}-s{s}-{h}x{w}" for k, s, (h, w) in CASES])
def test_canny_is_opencv_canny(kind, seed, size):
    rgb = MAKERS[kind](*size, seed)
    differing = []
    for low, high in THRESHOLDS:
        for color in (False, True):
            ours = ci.canny(rgb, low, high, color=color)
            theirs = _opencv_canny(rgb, low, high, color)
            assert ours.shape == (*size, 3) and ours.dtype == np.uint8
            assert (ours == ours[:, :, :1]).all()
            diff = int(np.count_nonzero(ours[:, :, 0] != theirs))
            print(
                f"{kind}-s{seed}-{size[0]}x{size[1]} ({low}, {high}) {'rgb ' if color else 'gray'}: "
                f"{diff} / {theirs.size} pixels differ, edges {np.mean(theirs > 0):.2%}"
            )
            differing.append(diff)
    assert sum(differing) == 0, differing


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (2, 2), (3, 7), (16, 9)])
def test_canny_is_opencv_canny_on_tiny_noise(shape):
    """Borders everywhere: every pixel's Sobel and suppression neighbourhood reaches outside the image."""
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        for low, high in ((10, 30), (100, 200), (0, 0)):
            for color in (False, True):
                np.testing.assert_array_equal(
                    ci.canny(rgb, low, high, color=color)[:, :, 0], _opencv_canny(rgb, low, high, color)
                )


def test_gray_levels_are_opencv_grayscale():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    rgb[0, :256] = np.arange(256, dtype=np.uint8)[:, None]  # every gray level stays itself
    np.testing.assert_array_equal(ci.gray_levels(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))


def test_canny_is_fast():
    rgb = _shapes(512, 512, 0)
    ci.canny(rgb)
    start = time.perf_counter()
    ci.canny(rgb, color=True)
    seconds = time.perf_counter() - start
    print(f"canny 512x512 (colour): {seconds * 1000:.1f} ms")
    assert seconds < 1.0


def test_canny_reads_any_input_as_rgb():
    gray = _texture(64, 80, 3)[:, :, 0]
    expected = cv2.Canny(gray, 20, 60)
    for image in (gray, gray[:, :, None], Image.fromarray(gray), Image.fromarray(gray).convert("RGBA")):
        np.testing.assert_array_equal(ci.canny(image, 20, 60)[:, :, 0], expected)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # mode I;16, read by value range
    np.testing.assert_array_equal(ci.canny(sixteen, 20, 60)[:, :, 0], expected)


@pytest.mark.parametrize("low,high", [("100", 200), (float("nan"), 200), (100, float("inf")), (True, 200)])
def test_canny_refuses_bad_thresholds(low, high):
    with pytest.raises(ValueError, match="threshold must be"):
        ci.canny(np.zeros((8, 8, 3), np.uint8), low, high)


def test_bad_image_types_and_shapes():
    with pytest.raises(TypeError, match="must be a PIL image, a numpy array or a path"):
        ci.canny([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="expected"):
        ci.canny(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="map must be"):
        ci.grayscale_to_rgb(3)


def test_threshold_scribble():
    gray = np.array([[0, 127, 128, 129, 255]], np.uint8)
    assert ci.threshold_scribble(gray).shape == (1, 5, 3)
    np.testing.assert_array_equal(ci.threshold_scribble(gray)[0, :, 0], [0, 0, 0, 255, 255])
    np.testing.assert_array_equal(ci.threshold_scribble(gray, invert=True)[0, :, 0], [255, 255, 255, 0, 0])
    np.testing.assert_array_equal(ci.threshold_scribble(gray, threshold=0)[0, :, 1], [0, 255, 255, 255, 255])
    rgb = np.array([[[255, 0, 0], [0, 255, 0]]], np.uint8)  # luma 76 and 150
    np.testing.assert_array_equal(ci.threshold_scribble(rgb, 100)[0, :, 2], [0, 255])
    for bad in (-1, 256, 1.5, True):
        with pytest.raises(ValueError, match="threshold must be an integer level in 0..255"):
            ci.threshold_scribble(gray, bad)


def test_grayscale_to_rgb():
    depth = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = ci.grayscale_to_rgb(depth)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(depth[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(ci.grayscale_to_rgb(depth[:, :, None]), out)
    sixteen = Image.fromarray(depth.astype(np.uint16) * 257)  # a 16-bit depth PNG: by value range
    np.testing.assert_array_equal(ci.grayscale_to_rgb(sixteen), out)
    np.testing.assert_array_equal(ci.grayscale_to_rgb(depth.astype(np.float32) / 255), out)


def _blocks(height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) of random 4x4 blocks of one colour each."""
    cells = np.random.default_rng(0).integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)
    return cells.repeat(4, axis=0).repeat(4, axis=1)


def test_downscale_for_tile_averages_areas():
    rgb = _blocks(32, 48)
    np.testing.assert_array_equal(ci.downscale_for_tile(rgb, (12, 8)), rgb[::4, ::4])
    noise = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    means = noise.reshape(8, 4, 12, 4, 3).mean(axis=(1, 3))
    # Pillow averages rows, then columns, rounding in between: within 1 level of the block means.
    assert np.abs(ci.downscale_for_tile(noise, (12, 8)) - means).max() <= 1.0
    with pytest.raises(ValueError, match="larger than the image"):
        ci.downscale_for_tile(rgb, (49, 8))
    for bad in ((0, 8), (12,), 12, (12.5, 8)):
        with pytest.raises(ValueError, match="must be"):
            ci.downscale_for_tile(rgb, bad)


def test_tile():
    rgb = _blocks(32, 48)
    np.testing.assert_array_equal(ci.tile(rgb, 1), rgb)
    np.testing.assert_array_equal(ci.tile(rgb, 4, resample="nearest"), rgb)  # blocks survive the round trip
    assert ci.tile(rgb, 3).shape == (32, 48, 3)
    assert ci.tile(rgb, 2.5, size=(64, 40)).shape == (40, 64, 3)
    assert ci.tile(rgb, 1000).shape == (32, 48, 3)  # down to 1x1: one colour
    assert len(np.unique(ci.tile(rgb, 1000).reshape(-1, 3), axis=0)) == 1
    for bad in (0.5, 0, float("inf"), "2", True):
        with pytest.raises(ValueError, match="factor must be a number >= 1"):
            ci.tile(rgb, bad)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        ci.tile(rgb, 2, size=(0, 10))
    with pytest.raises(ValueError, match="unknown resampling 'cubic'"):
        ci.tile(rgb, 1, resample="cubic")


def test_fit_to_size():
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 50:150] = 200  # the centre square
    wide[0, :30] = 7  # a few border pixels of another colour: the border's median stays 0
    out = ci.fit_to_size(wide, 60, 40)
    assert out.shape == (40, 60, 3)
    crop = ci.fit_to_size(wide, 100, 100, "crop", resample="nearest")
    np.testing.assert_array_equal(crop, wide[:, 50:150])
    pad = ci.fit_to_size(wide, 200, 200, "pad", resample="nearest")
    np.testing.assert_array_equal(pad[50:150], wide)
    assert (pad[:50] == 0).all() and (pad[150:] == 0).all()
    white = np.full((10, 20, 3), 255, np.uint8)
    pad = ci.fit_to_size(white, 20, 30, "pad")
    assert pad.shape == (30, 20, 3) and (pad == 255).all()  # filled with the border's colour
    assert ci.fit_to_size(wide, 33, 71, "crop").shape == (71, 33, 3)
    assert ci.fit_to_size(wide, 33, 71, "pad").shape == (71, 33, 3)
    with pytest.raises(ValueError, match="unknown fit mode 'fill': use one of resize, crop, pad"):
        ci.fit_to_size(wide, 10, 10, "fill")
    with pytest.raises(ValueError, match="height must be a positive integer"):
        ci.fit_to_size(wide, 10, -1)


def test_preprocess_dispatches_by_name():
    rgb = _shapes(64, 64, 2)
    assert set(ci.PREPROCESSORS) == {"canny", "scribble", "tile", "gray"}
    np.testing.assert_array_equal(ci.preprocess("canny", rgb, low_threshold=50), ci.canny(rgb, 50))
    np.testing.assert_array_equal(ci.preprocess("scribble", rgb, invert=True), ci.threshold_scribble(rgb, invert=True))
    np.testing.assert_array_equal(ci.preprocess("tile", rgb, factor=4), ci.tile(rgb, 4))
    np.testing.assert_array_equal(ci.preprocess("gray", rgb[:, :, 0]), ci.grayscale_to_rgb(rgb[:, :, 0]))
    with pytest.raises(ValueError, match="unknown preprocessor 'hed': use one of canny, scribble, tile, gray"):
        ci.preprocess("hed", rgb)


def test_the_module_does_not_import_opencv():
    source = open(ci.__file__).read()
    assert "import cv2" not in source and "from cv2" not in source
