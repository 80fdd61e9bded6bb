"""Training data: a folder of captioned images, read in a deterministic order from the seed.

Captions come from `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per line, the Hugging Face
imagefolder convention) or, without it, from a `.txt` file beside each image (the kohya convention).
Images are resized (shorter side to the resolution, bilinear, as diffusers' training scripts), center- or
randomly cropped, optionally flipped, and scaled to [-1, 1], NHWC float32.

Order: the data set is a sequence of epochs, each a permutation drawn from (seed, epoch); global position p
is image perm_{p // N}[p % N]. With sampling weights (a "weight" per image in metadata.jsonl, raised to
`sampling_weight_power`), an epoch is instead N draws with replacement in proportion to the weights.
Crop offsets, flips and caption dropout of position p are drawn from (seed, p) too, so a batch depends only
on its positions: a resumed run reads exactly the batches an uninterrupted one would, and under multi-host
each process reads its own rows of every global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
log = logging.getLogger("train")


class DataError(ValueError):
    """A data set problem, with a one-line message naming the file."""


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    weight: float = 1.0  # relative sampling frequency (metadata.jsonl "weight"; used with sampling weights)


def _check_image(path: Path) -> str | None:
    """None if `path` opens as an image, else why not."""
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"cannot read image {path}: {err}"
    return None


def _from_metadata(folder: Path, problems: list[str]) -> list[Example]:
    examples = []
    for number, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{folder / 'metadata.jsonl'} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where} is not JSON: {err}") from None
        if not isinstance(record, dict) or "file_name" not in record:
            raise DataError(f"{where} has no file_name")
        path = folder / record["file_name"]
        caption = record.get("text", record.get("caption"))
        weight = record.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
            raise DataError(f"{where}: weight must be a positive number, got {weight!r}")
        if not isinstance(caption, str) or not caption.strip():
            problems.append(f'{where}: no caption ("text") for {path}')
        elif not path.is_file():
            problems.append(f"{where}: image {path} does not exist")
        else:
            examples.append(Example(path, caption.strip(), float(weight)))
    return examples


def _from_sidecars(folder: Path, problems: list[str], need_captions: bool) -> list[Example]:
    examples = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        sidecar = path.with_suffix(".txt")
        if sidecar.is_file():
            caption = sidecar.read_text().strip()
        else:
            caption = ""
        if not caption and need_captions:
            problems.append(f"no caption for {path} (expected {sidecar} or a metadata.jsonl)")
            continue
        examples.append(Example(path, caption))
    return examples


def scan_folder(folder: str | Path, *, skip_bad: bool = False, need_captions: bool = True) -> list[Example]:
    """The captioned images of `folder`, sorted by path.

    Unreadable images and missing captions raise `DataError` naming the file, or with `skip_bad` are
    logged (each one) and left out. `need_captions=False` accepts images without captions (DreamBooth and
    textual inversion with a fixed prompt).
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    problems: list[str] = []
    if (root / "metadata.jsonl").is_file():
        examples = _from_metadata(root, problems)
    else:
        examples = _from_sidecars(root, problems, need_captions)
    readable = []
    for example in examples:
        problem = _check_image(example.path)
        if problem:
            problems.append(problem)
        else:
            readable.append(example)
    if problems:
        if not skip_bad:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; fix the data or pass --skip-bad-images true to skip them")
        for problem in problems:
            log.warning("skipping: %s", problem)
    if not readable:
        raise DataError(f"data folder {root} has no usable images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(readable, key=lambda e: str(e.path))


def load_image(path: Path, resolution: int, crop_xy: tuple[float, float] | None, flip: bool) -> np.ndarray:
    """An image -> float32 (resolution, resolution, 3) in [-1, 1].

    The shorter side is resized to `resolution` (bilinear), then a square is cut: centered when `crop_xy` is
    None, else at fractions (x, y) in [0, 1] of the free range. `flip` mirrors it left-right.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
            img = img.resize(size, Image.BILINEAR) if size != (w, h) else img
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    w, h = img.size
    fx, fy = (0.5, 0.5) if crop_xy is None else crop_xy
    left, top = int(round((w - resolution) * fx)), int(round((h - resolution) * fy))
    array = np.asarray(img.crop((left, top, left + resolution, top + resolution)), np.float32)
    if flip:
        array = array[:, ::-1]
    return array / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Order:
    """Which example and which augmentations global position p gets (see the module doc)."""

    size: int
    seed: int
    stream: int = 0  # separate streams for instance and class images
    weights: tuple[float, ...] | None = None  # per example; None: each epoch is a permutation

    def __post_init__(self):
        if self.weights is not None and len(self.weights) != self.size:
            raise ValueError(f"{len(self.weights)} sampling weights for {self.size} examples")

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        return int(_epoch(self.size, self.seed, self.stream, epoch, self.weights)[offset])

    def draws(self, position: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, 1, position])


@functools.lru_cache(maxsize=8)
def _epoch(size: int, seed: int, stream: int, epoch: int, weights: tuple[float, ...] | None) -> np.ndarray:
    """The example indices of one epoch (int (size,)): a permutation, or `size` weighted draws."""
    rng = np.random.default_rng([seed, stream, 0, epoch])
    if weights is None:
        return rng.permutation(size)
    p = np.asarray(weights, np.float64)
    return rng.choice(size, size, replace=True, p=p / p.sum())


@dataclasses.dataclass(frozen=True)
class Rows:
    """One host's rows of one micro-batch: positions and what each row gets."""

    indices: np.ndarray  # int (b,) example index
    flips: np.ndarray  # bool (b,)
    crops: np.ndarray  # float (b, 2) crop fractions (ignored with center crops)
    drop_caption: np.ndarray  # bool (b,)


def rows_for(order: Order, positions: Sequence[int], *, random_flip: bool, caption_dropout: float) -> Rows:
    indices, flips, crops, drops = [], [], [], []
    for p in positions:
        rng = order.draws(p)
        crop = rng.random(2)
        flip = bool(rng.random() < 0.5) and random_flip
        drop = bool(rng.random() < caption_dropout)
        indices.append(order.index(p))
        flips.append(flip)
        crops.append(crop)
        drops.append(drop)
    return Rows(np.asarray(indices), np.asarray(flips, bool), np.asarray(crops), np.asarray(drops, bool))


def host_positions(step: int, micro: int, *, batch_size: int, grad_accum: int, process_index: int, process_count: int):
    """Global positions of this host's rows in micro-batch `micro` of optimizer step `step` (0-based)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {process_count} processes")
    local = batch_size // process_count
    base = (step * grad_accum + micro) * batch_size + process_index * local
    return range(base, base + local)
