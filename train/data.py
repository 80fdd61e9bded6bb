"""Training data: a folder of captioned images, read in a deterministic order from the seed.

Captions come from `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per line, the Hugging Face
imagefolder convention) or, without it, from a `.txt` file beside each image (the kohya convention).
Images are resized (shorter side to the resolution, bilinear, as diffusers' training scripts), center- or
randomly cropped, optionally flipped, and scaled to [-1, 1], NHWC float32. In mode controlnet each image's
condition image (named in metadata.jsonl) goes through the same resize, crop and flip, in [0, 1].

Order: the data set is a sequence of epochs, each a permutation drawn from (seed, epoch); global position p
is image perm_{p // N}[p % N]. With sampling weights (a "weight" per image in metadata.jsonl, raised to
`sampling_weight_power`), an epoch is instead N draws with replacement in proportion to the weights.
Crop offsets, flips and caption dropout of position p are drawn from (seed, p) too, so a batch depends only
on its positions: a resumed run reads exactly the batches an uninterrupted one would, and under multi-host
each process reads its own rows of every global batch.

`Batches` turns positions into a process's host arrays of an optimizer step (pixels, or the VAE posterior
moments of `encode_latent_cache` with cache_latents; token ids, or the `TextCache` rows of `encode_text_cache`
with cache_text_embeddings; row ids, loss weights), and `global_batch`
places them as global arrays split over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, UnidentifiedImageError

from sdjax import images as image_io
from sdjax import sharding
from train.buckets import BucketOrder, bucket_sizes, nearest_bucket
from train.shards import IMAGE_SUFFIXES, Member, scan_shard, shard_paths

if TYPE_CHECKING:
    from train.model import Setup

log = logging.getLogger("train")


class DataError(ValueError):
    """A data set problem, with a one-line message naming the file."""


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path | Member  # an image file, or an image inside a tar shard
    caption: str
    weight: float = 1.0  # relative sampling frequency (metadata.jsonl "weight"; used with sampling weights)
    condition: Path | None = None  # mode controlnet: the condition image (metadata.jsonl conditioning column)


def _check_image(path: Path) -> str | None:
    """None if `path` opens as an image in a mode `load_image` reads (header and checksums only, no
    decoding), else why not."""
    try:
        with Image.open(path) as img:
            img.verify()
            image_io.check_mode(img.mode)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        return f"cannot read image {path}: {err}"
    return None


def _condition_of(folder: Path, record: dict, column: str, where: str, problems: list[str]) -> Path | None:
    """The condition image path of a metadata record (key `column`, or imagefolder's `column`_file_name),
    or None after noting the problem."""
    name = record.get(column, record.get(f"{column}_file_name"))
    if not isinstance(name, str) or not name.strip():
        problems.append(f'{where}: no condition image ("{column}") for {folder / record["file_name"]}')
        return None
    path = folder / name
    if not path.is_file():
        problems.append(f"{where}: condition image {path} does not exist")
        return None
    return path


def _from_metadata(folder: Path, problems: list[str], condition_column: str | None = None) -> list[Example]:
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
        elif condition_column is None:
            examples.append(Example(path, caption.strip(), float(weight)))
        elif (condition := _condition_of(folder, record, condition_column, where, problems)) is not None:
            examples.append(Example(path, caption.strip(), float(weight), condition))
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


def scan_folder(
    folder: str | Path, *, skip_bad: bool = False, need_captions: bool = True, condition_column: str | None = None
) -> list[Example]:
    """The captioned images of `folder`, sorted by path.

    Unreadable images and missing captions raise `DataError` naming the file, or with `skip_bad` are
    logged (each one) and left out. `need_captions=False` accepts images without captions (DreamBooth and
    textual inversion with a fixed prompt). With `condition_column` (mode controlnet) every image also
    needs a readable condition image named in metadata.jsonl under that key.
    """
    root = Path(folder).expanduser()
    if root.is_file() and root.suffix == ".tar":
        return _from_shards(root, [root], skip_bad, condition_column)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data {root} is a file: give the folder of training images (or a .tar shard)")
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    problems: list[str] = []
    shards = shard_paths(root) if not (root / "metadata.jsonl").is_file() else []
    if shards and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*")):
        return _from_shards(root, shards, skip_bad, condition_column)
    if (root / "metadata.jsonl").is_file():
        examples = _from_metadata(root, problems, condition_column)
    elif condition_column is not None:
        raise DataError(
            f"data folder {root} has no metadata.jsonl: mode controlnet reads each image's condition image from "
            f'its "{condition_column}" key ({{"file_name": ..., "{condition_column}": ..., "text": ...}} per line)'
        )
    else:
        examples = _from_sidecars(root, problems, need_captions)
    readable = []
    for example in examples:
        problem = _check_image(example.path)
        if problem is None and example.condition is not None:
            problem = _check_image(example.condition)
        if problem:
            problems.append(problem)
        else:
            readable.append(example)
    _report(problems, skip_bad)
    if not readable:
        raise DataError(f"data folder {root} has no usable images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(readable, key=lambda e: str(e.path))


def _report(problems: list[str], skip_bad: bool) -> None:
    """Raises a DataError for the first of `problems` (counting the rest), or with `skip_bad` logs them."""
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the data or pass --skip-bad-images true to skip them")
    for problem in problems:
        log.warning("skipping: %s", problem)


def _from_shards(root: Path, shards: list[Path], skip_bad: bool, condition_column: str | None) -> list[Example]:
    """The samples of WebDataset tar shards (`train.shards`), in shard order. Their images are not opened
    ahead (a pass over a data set too big for a folder): an unreadable one stops the run naming it."""
    if condition_column is not None:
        raise DataError(f"{root}: mode controlnet reads a data folder with metadata.jsonl, not tar shards")
    problems: list[str] = []
    examples = [Example(member, caption) for shard in shards for member, caption in scan_shard(shard, problems)]
    _report(problems, skip_bad)
    if not examples:
        raise DataError(f"{root} has no complete samples (an image and a .txt or .json caption per key)")
    log.info("%d samples in %d tar shards of %s", len(examples), len(shards), root)
    return examples


def load_image(path: Path | Member, resolution, crop_xy: tuple[float, float] | None, flip: bool) -> np.ndarray:
    """An image of any mode -> float32 (height, width, 3) in [-1, 1], read as 8-bit RGB by value range
    (`sdjax.images.to_rgb8`: 16-bit and float images scaled, alpha dropped; of an animation the first
    frame). `resolution` is the side of a square, or the (width, height) of an aspect-ratio bucket.

    The image is resized (bilinear) to cover the target (for a square: its shorter side to `resolution`),
    then the target is cut: centered when `crop_xy` is None, else at fractions (x, y) in [0, 1] of the free
    range. `flip` mirrors it left-right.
    """
    target = _target(resolution)
    try:
        with Image.open(_readable(path)) as img:
            img = image_io.to_rgb8(img)
            size = _resized(img.size, target)
            img = img.resize(size, Image.BILINEAR) if size != img.size else img
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None
    left, top = _crop_origin(img.size, target, crop_xy)
    array = np.asarray(img.crop((left, top, left + target[0], top + target[1])), np.float32)
    if flip:
        array = array[:, ::-1]
    return array / 127.5 - 1.0


def _readable(path: Path | Member):
    """What PIL opens for an image file or a tar member."""
    return path.open() if isinstance(path, Member) else path


def _target(resolution) -> tuple[int, int]:
    """(width, height) of a square side or a (width, height) pair."""
    return (resolution, resolution) if isinstance(resolution, int | np.integer) else tuple(resolution)


def _resized(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing (width, height) `size` to the smallest size covering `target`."""
    w, h = size
    scale = max(target[0] / w, target[1] / h)
    return max(target[0], round(w * scale)), max(target[1], round(h * scale))


def _crop_origin(
    size: tuple[int, int], target: tuple[int, int], crop_xy: tuple[float, float] | None
) -> tuple[int, int]:
    """(left, top) of the `target` cut from a resized (width, height) image: centered for None, else at
    fractions (x, y) of the free range (diffusers' center crop rounds the same way)."""
    fx, fy = (0.5, 0.5) if crop_xy is None else crop_xy
    return int(round((size[0] - target[0]) * fx)), int(round((size[1] - target[1]) * fy))


def image_size(path: Path | Member) -> tuple[int, int]:
    """(width, height) of an image, from its header."""
    try:
        with Image.open(_readable(path)) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def image_time_ids(path: Path | Member, resolution, crop_xy: tuple[float, float] | None, flip: bool) -> np.ndarray:
    """SDXL's micro-conditioning of a training image as `load_image` cuts it: float32 (6,) [original height,
    original width, crop top, crop left, target height, target width], as diffusers'
    train_text_to_image_sdxl.py records them (after a flip it records the left edge as width - left)."""
    target = _target(resolution)
    size = image_size(path)
    left, top = _crop_origin(_resized(size, target), target, crop_xy)
    if flip:
        left = target[0] - left
    return np.array([size[1], size[0], top, left, target[1], target[0]], np.float32)


def load_condition(path: Path, resolution: int, crop_xy: tuple[float, float] | None, flip: bool) -> np.ndarray:
    """A condition image -> float32 (resolution, resolution, 3) in [0, 1] (as diffusers' train_controlnet.py:
    no normalisation), resized, cropped and flipped exactly as `load_image` does its training image, so
    the two stay aligned pixel for pixel when they have the same size."""
    return (load_image(path, resolution, crop_xy, flip) + 1.0) * 0.5


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


# ------------------------------------------------------------------------------------------ batches


def _sampling_weights(examples: Sequence[Example], power: float) -> tuple[float, ...] | None:
    """Per-example sampling weights (metadata "weight" ** power), or None for plain epochs (power 0)."""
    if not power:
        return None
    if all(e.weight == 1.0 for e in examples):
        log.warning("sampling_weight_power is set but no image has a weight in metadata.jsonl: plain epochs")
        return None
    weights = np.array([e.weight**power for e in examples])
    log.info(
        "drawing images by weight ** %g: the most drawn %.1fx as often as in plain epochs, the least %.2fx",
        power,
        weights.max() * len(weights) / weights.sum(),
        weights.min() * len(weights) / weights.sum(),
    )
    return tuple(weights.tolist())


class Batches:
    """Host-side micro-batches of one process: images (or cached latent moments), token ids (or cached text
    embeddings), row ids, weights; padded to a multiple of this process's devices with rows of weight 0."""

    def __init__(
        self,
        setup: Setup,
        examples,
        class_examples,
        local_devices: int,
        latent_cache=None,
        text_cache=None,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        """`process_index`/`process_count` (default: JAX's) fix which rows this process reads, so that the
        object reads the same rows in a loader's worker processes, where JAX knows no other process."""
        cfg = setup.config
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        self.cfg, self.images = cfg, cfg.images
        self.examples, self.class_examples = examples, class_examples
        weights = _sampling_weights(examples, cfg.images.sampling_weight_power)
        self.order = Order(len(examples), cfg.seed, stream=0, weights=weights)
        self.class_order = Order(len(class_examples), cfg.seed, stream=1) if class_examples else None
        captions = [cfg.images.instance_prompt or e.caption for e in examples]
        self.sdxl = setup.pipe.text_encoder_2 is not None
        self.tokens = {}  # "" and "_2" (SDXL's second tokenizer): (caption ids, empty-caption ids, class ids)
        self.text_cache = text_cache
        if text_cache is not None:  # rows of the cache instead of token ids
            row = {text: i for i, text in enumerate(text_cache.texts)}
            class_row = row[cfg.dreambooth.class_prompt or ""] if class_examples else None
            self.tokens["cache"] = (np.array([row[c] for c in captions]), row[""], class_row)
        else:
            for suffix, tok in (("", setup.pipe.tokenizer), ("_2", setup.pipe.tokenizer_2 if self.sdxl else None)):
                if tok is not None:
                    class_ids = tok([cfg.dreambooth.class_prompt or ""])[0] if class_examples else None
                    self.tokens[suffix] = (tok(captions), tok([""])[0], class_ids)
        self.local_devices = local_devices
        self.cache = latent_cache
        self.buckets = _bucket_order(setup, examples) if cfg.images.buckets else None

    def _rows(self, order, examples, positions, *, class_rows: bool, indices=None, target=None):
        """The rows at `positions`: their examples from `order` (or `indices`, a bucket's), cut to the square
        resolution (or `target`, a bucket's (width, height))."""
        images = self.images
        rows = rows_for(order, positions, random_flip=images.random_flip, caption_dropout=images.caption_dropout)
        if indices is not None:
            rows = dataclasses.replace(rows, indices=np.asarray(indices))
        size = images.resolution if target is None else target
        out = {}
        if self.cache is not None and not class_rows:
            out["moments"] = np.stack([self.cache[int(f)][i] for i, f in zip(rows.indices, rows.flips, strict=True)])
        else:
            out["pixels"] = np.stack(
                [
                    load_image(examples[i].path, size, None if images.center_crop else tuple(c), bool(f))
                    for i, c, f in zip(rows.indices, rows.crops, rows.flips, strict=True)
                ]
            )
        if not class_rows and examples[0].condition is not None:
            out["control"] = np.stack(
                [
                    load_condition(examples[i].condition, size, None if images.center_crop else tuple(c), bool(f))
                    for i, c, f in zip(rows.indices, rows.crops, rows.flips, strict=True)
                ]
            )
        for suffix, (captions, empty, class_ids) in self.tokens.items():
            if class_rows:  # class images: one prompt
                chosen = np.repeat(np.asarray(class_ids)[None], len(positions), axis=0)
            else:
                empty = np.asarray(empty)
                chosen = np.where(rows.drop_caption.reshape(-1, *[1] * empty.ndim), empty[None], captions[rows.indices])
            if suffix != "cache":
                out["ids" + suffix] = chosen
                continue
            out["context"] = self.text_cache.context[chosen]
            if self.text_cache.pooled is not None:
                out["text_embeds"] = self.text_cache.pooled[chosen]
        if self.sdxl:
            crops = [None if images.center_crop or "moments" in out else tuple(c) for c in rows.crops]
            out["time_ids"] = np.stack(
                [
                    image_time_ids(examples[i].path, size, c, bool(f))
                    for i, c, f in zip(rows.indices, crops, rows.flips, strict=True)
                ]
            )
        positions = np.asarray(list(positions), np.int64)
        out["row"] = (2 * positions + int(class_rows)).astype(np.int32)
        weight = self.cfg.dreambooth.prior_loss_weight if class_rows else 1.0
        out["weight"] = np.full(len(positions), weight, np.float32)
        out["count"] = np.full(len(positions), 0.0 if class_rows else 1.0, np.float32)
        return out

    def micro(self, step: int, micro: int) -> dict[str, np.ndarray]:
        optim = self.cfg.optim
        positions = host_positions(
            step,
            micro,
            batch_size=optim.batch_size,
            grad_accum=optim.grad_accum,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        indices = target = None
        if self.buckets is not None:  # the step's bucket and its images; this micro-batch's, this process's
            target, group = self.buckets.step(step)
            first = micro * optim.batch_size + self.process_index * len(positions)
            indices = group[first : first + len(positions)]
        parts = [self._rows(self.order, self.examples, positions, class_rows=False, indices=indices, target=target)]
        if self.class_order is not None:
            # class images at the step's bucket shape too (cropped to it), so the rows stack
            parts.append(self._rows(self.class_order, self.class_examples, positions, class_rows=True, target=target))
        if len(parts) == 2 and "moments" in parts[0]:
            raise ValueError("cache_latents is not supported with DreamBooth class images")
        rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        n = len(rows["row"])
        pad = -n % self.local_devices
        if pad:
            rows = {k: np.concatenate([v, np.repeat(v[:1], pad, axis=0)]) for k, v in rows.items()}
            rows["weight"][n:] = 0.0
            rows["count"][n:] = 0.0
        return rows

    def step(self, step: int) -> dict[str, np.ndarray]:
        """(grad_accum, local rows, ...) arrays of optimizer step `step`."""
        micros = [self.micro(step, m) for m in range(self.cfg.optim.grad_accum)]
        return {k: np.stack([m[k] for m in micros]) for k in micros[0]}


def _bucket_order(setup: Setup, examples) -> BucketOrder:
    """The aspect-ratio buckets of a run (`train.buckets`) with every example in the nearest one; sizes
    step by the model's factor (VAE downscale x UNet downsampling)."""
    cfg = setup.config
    pipe = setup.pipe
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    sizes = bucket_sizes(cfg.images.resolution, multiple)
    assignment = [nearest_bucket(image_size(e.path), sizes) for e in examples]
    order = BucketOrder(assignment, sizes, cfg.optim.batch_size * cfg.optim.grad_accum, cfg.seed)
    used = ", ".join(f"{w}x{h}: {n}" for (w, h), n in order.used().items())
    log.info("aspect-ratio buckets (images): %s; %d steps per epoch", used, order.steps_per_epoch)
    return order


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict:
    """Host rows (accum, b_local, ...) -> global arrays (accum, b, ...) split over the batch axes."""
    spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)

    def one(x):
        return jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), x)

    return {k: one(v) for k, v in batch.items()}


def encode_latent_cache(setup: Setup, examples) -> list[np.ndarray]:
    """VAE posterior moments (N, h, w, 2C) float32 of every example, center-cropped; [unflipped, flipped]
    when random_flip (else the unflipped one only)."""
    images = setup.config.images
    vae = setup.pipe.vae  # float32: the cache is the posterior the run samples from

    @jax.jit
    def encode(params, pixels):
        mean, logvar = vae.apply({"params": params}, pixels, method="encode")
        return jnp.concatenate([mean, logvar], axis=-1)

    params = setup.pipe.params["vae"]
    flips = (False, True) if images.random_flip else (False,)
    out = []
    chunk = 16
    for flip in flips:
        parts = []
        for start in range(0, len(examples), chunk):
            group = examples[start : start + chunk]
            pixels = np.stack([load_image(e.path, images.resolution, None, flip) for e in group])
            padded = np.concatenate([pixels, np.repeat(pixels[:1], chunk - len(group), axis=0)])
            parts.append(np.asarray(encode(params, padded))[: len(group)])
        out.append(np.concatenate(parts))
    return out


@dataclasses.dataclass(frozen=True)
class TextCache:
    """The frozen text encoders' outputs for every distinct text of a run (cache_text_embeddings): row i
    of `context` (U, 77, D) and `pooled` (U, P) (SDXL; else None) encodes texts[i], in the compute dtype."""

    texts: tuple[str, ...]
    context: np.ndarray
    pooled: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return self.context.nbytes + (0 if self.pooled is None else self.pooled.nbytes)


def run_texts(config, examples, class_examples) -> tuple[str, ...]:
    """The distinct texts a run conditions on (sorted): its captions (or the instance prompt), the empty
    caption (caption dropout) and the DreamBooth class prompt when there are class images."""
    texts = {config.images.instance_prompt or e.caption for e in examples} | {""}
    if class_examples:
        texts.add(config.dreambooth.class_prompt or "")
    return tuple(sorted(texts))


def encode_text_cache(setup: Setup, texts: Sequence[str], chunk: int = 16) -> TextCache:
    """`TextCache` of `texts`: `train.objective.encode_text` with the frozen float32 parameters and the
    run's compute-dtype modules, exactly what the step computes from token ids, in chunks of `chunk`."""
    from train.objective import encode_text

    pipe = setup.pipe
    params = {k: pipe.params[k] for k in ("text_encoder", "text_encoder_2") if pipe.params.get(k) is not None}
    encode = jax.jit(functools.partial(encode_text, setup))
    contexts, pooled = [], []
    for start in range(0, len(texts), chunk):
        group = list(texts[start : start + chunk])
        group += [group[0]] * (chunk - len(group))  # one shape: one compile
        ids_2 = pipe.tokenizer_2(group) if setup.text_encoder_2 is not None else None
        context, embeds = jax.device_get(encode(params, pipe.tokenizer(group), ids_2))
        n = min(chunk, len(texts) - start)
        contexts.append(context[:n])
        if embeds is not None:
            pooled.append(embeds[:n])
    cache = TextCache(tuple(texts), np.concatenate(contexts), np.concatenate(pooled) if pooled else None)
    log.info("cached the text embeddings of %d distinct captions: %.1f MiB", len(texts), cache.nbytes / 2**20)
    return cache
