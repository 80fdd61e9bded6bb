"""Every Pillow mode reads as 8-bit RGB / grayscale by value range: init images (`image_to_array`), masks
(`mask_to_array`) and training images (`train.data.load_image`), in memory and through PNG, TIFF and GIF
files; arrays of uint8, uint16, bool and float; clear errors for what cannot be read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from sdjax import images
from train.data import load_image, scan_folder

SIZE = 8  # one latent pixel of SD's VAE: no resizing anywhere below


def _halves(left, right, dtype) -> np.ndarray:
    """(SIZE, SIZE[, C]) array: `left` in the left half of the columns, `right` in the right half."""
    left, right = np.asarray(left, dtype), np.asarray(right, dtype)
    out = np.empty((SIZE, SIZE, *left.shape), dtype)
    out[:, : SIZE // 2], out[:, SIZE // 2 :] = left, right
    return out


def _raw(mode: str, left, right, dtype) -> Image.Image:
    """An image of `mode` built from the bytes of a two-halves array (modes `fromarray` does not make)."""
    return Image.frombytes(mode, (SIZE, SIZE), _halves(left, right, dtype).tobytes())


def _palette(mode: str = "P", transparency: bytes | int | None = None) -> Image.Image:
    """A P / PA image: red (index 0) on the left, blue (index 1) on the right; `transparency` as Pillow's
    info (alpha per index, or the transparent index)."""
    if mode == "PA":
        image = _raw("PA", (0, 0), (1, 255), np.uint8)
    else:
        image = _raw("P", 0, 1, np.uint8)
    image.putpalette([255, 0, 0, 0, 0, 255])
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


def _animation(path) -> None:
    """Writes an animated GIF whose first frame is gray 40 | 200 (the second: 120 everywhere)."""
    first = Image.fromarray(_halves(40, 200, np.uint8))
    second = Image.fromarray(np.full((SIZE, SIZE), 120, np.uint8))
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Image.Image]
    left: tuple[int, int, int]  # expected 8-bit RGB of the left half
    right: tuple[int, int, int]
    formats: tuple[str, ...] = ()  # files Pillow writes this mode to (besides the in-memory check)


def _gray(value: int) -> tuple[int, int, int]:
    return (value, value, value)


# Raw LAB bytes hold a* and b* signed (Pillow stores them offset by 128): (L, 0, 0) is gray.
CASES = [
    Case("L", lambda: Image.fromarray(_halves(0, 200, np.uint8)), _gray(0), _gray(200), ("png", "tiff")),
    Case("1", lambda: Image.fromarray(_halves(False, True, bool)), _gray(0), _gray(255), ("png", "tiff")),
    Case("I;16", lambda: _raw("I;16", 32768, 65535, "<u2"), _gray(128), _gray(255), ("png", "tiff")),
    Case("I;16 dark", lambda: _raw("I;16", 257, 2570, "<u2"), _gray(1), _gray(10), ("png",)),
    Case("I;16L", lambda: _raw("I;16L", 32768, 16384, "<u2"), _gray(128), _gray(64), ("tiff",)),
    Case("I;16B", lambda: _raw("I;16B", 32768, 65535, ">u2"), _gray(128), _gray(255), ("png", "tiff")),
    Case("I 8-bit", lambda: _raw("I", 100, 200, np.int32), _gray(100), _gray(200), ("tiff",)),
    Case("I 16-bit", lambda: _raw("I", 32768, 65535, np.int32), _gray(128), _gray(255), ("tiff",)),
    Case("I 32-bit", lambda: _raw("I", 2**30, 2**31 - 1, np.int32), _gray(128), _gray(255), ("tiff",)),
    Case("I negative", lambda: _raw("I", -5, 200, np.int32), _gray(0), _gray(200)),
    Case("F [0, 1]", lambda: _raw("F", 0.5, 1.0, np.float32), _gray(128), _gray(255), ("tiff",)),
    Case("F 0..255", lambda: _raw("F", 100.0, 200.0, np.float32), _gray(100), _gray(200), ("tiff",)),
    Case("F 0..65535", lambda: _raw("F", 32768.0, 65535.0, np.float32), _gray(128), _gray(255)),
    Case("F negative, NaN", lambda: _raw("F", np.nan, 0.25, np.float32), _gray(0), _gray(64)),
    Case("P", _palette, (255, 0, 0), (0, 0, 255), ("png", "tiff", "gif")),
    Case("P transparency", lambda: _palette("P", b"\x00\xff"), (255, 0, 0), (0, 0, 255), ("png",)),
    Case("P transparent index", lambda: _palette("P", 0), (255, 0, 0), (0, 0, 255), ("png", "gif")),
    Case("PA", lambda: _palette("PA"), (255, 0, 0), (0, 0, 255), ("tiff",)),
    Case("LA", lambda: _raw("LA", (100, 0), (200, 128), np.uint8), _gray(100), _gray(200), ("png", "tiff")),
    Case("La", lambda: _raw("La", (50, 128), (200, 255), np.uint8), _gray(100), _gray(200)),
    Case("RGB", lambda: Image.fromarray(_halves((10, 20, 30), (200, 100, 50), np.uint8)), (10, 20, 30), (200, 100, 50)),
    Case(
        "RGBA",
        lambda: Image.fromarray(_halves((10, 20, 30, 0), (200, 100, 50, 255), np.uint8)),
        (10, 20, 30),
        (200, 100, 50),
        ("png", "tiff"),
    ),
    Case("RGBa", lambda: _raw("RGBa", (100, 50, 20, 128), (1, 2, 3, 255), np.uint8), (199, 99, 39), (1, 2, 3)),
    Case("RGBX", lambda: _raw("RGBX", (1, 2, 3, 0), (4, 5, 6, 0), np.uint8), (1, 2, 3), (4, 5, 6)),
    Case("CMYK", lambda: _raw("CMYK", (0, 0, 0, 0), (255, 0, 0, 0), np.uint8), _gray(255), (0, 255, 255), ("tiff",)),
    Case("YCbCr", lambda: _raw("YCbCr", (100, 128, 128), (200, 128, 128), np.uint8), _gray(100), _gray(200), ("tiff",)),
    Case("LAB", lambda: _raw("LAB", (0, 0, 0), (255, 0, 0), np.uint8), _gray(0), _gray(255), ("tiff",)),
    Case("HSV", lambda: _raw("HSV", (0, 255, 255), (85, 255, 255), np.uint8), (255, 0, 0), (0, 255, 0)),
]
FILE_CASES = [(case, fmt) for case in CASES for fmt in case.formats]


def _luma(rgb) -> float:
    """Pillow's RGB -> L (ITU-R 601-2)."""
    r, g, b = rgb
    return (299 * r + 587 * g + 114 * b) / 1000


def _expected_rgb(case: Case) -> np.ndarray:
    return _halves(case.left, case.right, np.float32)


def _expected_gray(case: Case) -> np.ndarray:
    return _halves(_luma(case.left), _luma(case.right), np.float32)


def _saved(case: Case, fmt: str, tmp_path):
    path = tmp_path / f"{case.name.replace(' ', '_').replace(';', '')}.{fmt}"
    case.build().save(path)
    return path


def _check_image_and_mask(image: Image.Image, case: Case):
    rgb = (images.image_to_array(image, SIZE, SIZE)[0] + 1.0) * 127.5
    np.testing.assert_allclose(rgb, _expected_rgb(case), atol=1.01)
    gray = np.asarray(images.to_gray8(image), np.float32)
    np.testing.assert_allclose(gray, _expected_gray(case), atol=1.01)
    mask = images.mask_to_array(image, SIZE, SIZE)[0, :, :, 0]
    np.testing.assert_array_equal(mask, (gray >= 127.5).astype(np.float32))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_modes_in_memory(case):
    image = case.build()
    assert image.mode == case.name.split()[0]
    _check_image_and_mask(image, case)
    assert images.to_rgb8(image).mode == "RGB" and images.to_gray8(image).mode == "L"


@pytest.mark.parametrize(("case", "fmt"), FILE_CASES, ids=[f"{c.name}-{f}" for c, f in FILE_CASES])
def test_modes_from_files(case, fmt, tmp_path):
    path = _saved(case, fmt, tmp_path)
    _check_image_and_mask(images.open_image(path), case)
    pixels = (load_image(path, SIZE, None, False) + 1.0) * 127.5
    np.testing.assert_allclose(pixels, _expected_rgb(case), atol=1.01)


def test_sixteen_bit_mask_is_not_clipped():
    """Pillow's own convert("L") makes any 16-bit value above 255 white; by value range 16384 is dark."""
    mask = _raw("I;16", 16384, 49152, "<u2")
    assert np.asarray(mask.convert("L")).min() == 255
    np.testing.assert_array_equal(images.mask_to_array(mask, SIZE, SIZE)[0, :, :, 0], _halves(0, 1, np.float32))


def test_animation_reads_its_first_frame(tmp_path):
    path = tmp_path / "anim.gif"
    _animation(path)
    assert Image.open(path).n_frames == 2
    case = Case("GIF", lambda: Image.open(path), _gray(40), _gray(200))
    _check_image_and_mask(images.open_image(path), case)
    np.testing.assert_allclose((load_image(path, SIZE, None, False) + 1.0) * 127.5, _expected_rgb(case), atol=1.01)


def test_training_folder_accepts_high_depth_images(tmp_path):
    _raw("I;16", 32768, 65535, "<u2").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a gray square")
    [example] = scan_folder(tmp_path)
    np.testing.assert_allclose(
        (load_image(example.path, SIZE, None, False) + 1.0) * 127.5,
        _halves(_gray(128), _gray(255), np.float32),
        atol=1.01,
    )


@pytest.mark.parametrize(
    ("array", "value"),
    [
        (np.full((SIZE, SIZE), 200, np.uint8), 200),
        (np.full((SIZE, SIZE, 1), 200, np.uint8), 200),
        (np.full((SIZE, SIZE, 4), 200, np.uint8), 200),
        (np.full((SIZE, SIZE), 32768, np.uint16), 128),
        (np.full((SIZE, SIZE, 3), 65535, np.uint16), 255),
        (np.full((SIZE, SIZE), 0.5, np.float32), 128),
        (np.full((SIZE, SIZE, 3), 0.25, np.float64), 64),
        (np.ones((SIZE, SIZE), bool), 255),
    ],
    ids=["uint8", "uint8 HW1", "uint8 RGBA", "uint16", "uint16 RGB", "float32", "float64 RGB", "bool"],
)
def test_arrays(array, value):
    image = images.open_image(array)
    rgb = (images.image_to_array(image, SIZE, SIZE) + 1.0) * 127.5
    np.testing.assert_allclose(rgb, value, atol=1.01)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((SIZE, SIZE), np.int64), r"must be uint8, uint16, bool or float in \[0, 1\], got int64"),
        (np.zeros((SIZE, SIZE, 2), np.uint8), r"shape \(8, 8, 2\): expected \(H, W\), \(H, W, 1\)"),
        (np.zeros(SIZE, np.uint8), r"shape \(8,\): expected"),
        (np.full((SIZE, SIZE), -1.0, np.float32), r"values in \[0, 1\], got \[-1, -1\]"),
        (np.full((SIZE, SIZE), np.nan, np.float32), r"values in \[0, 1\], got \[nan, nan\]"),
        (np.zeros((0, SIZE), np.uint8), "is empty"),
    ],
)
def test_array_errors(array, message):
    with pytest.raises(ValueError, match=message):
        images.open_image(array, "mask")


def test_unreadable_mode():
    with pytest.raises(images.ImageModeError, match="Pillow mode 'BGR;15', which cannot be read: save it as RGB"):
        images.check_mode("BGR;15")


def test_tiny_init_image_says_the_minimum():
    """An init image below one latent pixel (8x8) would round to a 0x0 canvas: say so, with the sizes."""
    from sdjax import request, testing

    pipe = testing.abstract_pipeline("tiny")
    with pytest.raises(ValueError, match="init image is 2x2 pixels, below the minimum 8x8"):
        request.prepare(pipe, "a cat", image=np.zeros((2, 2, 3), np.uint8), mask_image=np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="init image is 100x4 pixels"):
        request.prepare(pipe, "a cat", image=np.zeros((4, 100, 3), np.uint8))
    plan, _ = request.prepare(pipe, "a cat", image=np.zeros((2, 2, 3), np.uint8), height=16, width=16)
    assert (plan.height, plan.width) == (16, 16)
