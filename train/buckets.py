"""Aspect-ratio buckets: images trained at their own shape instead of a square crop (kohya's and diffusers'
SDXL scripts' bucketing).

A bucket is a (width, height), both multiples of the model's size step (64 for SD: the VAE's 8 times the
UNet's 8), of at most resolution^2 pixels and an aspect ratio within [1/2, 2]: for each width the tallest
height that fits, and the square. Each image goes to the
bucket nearest its aspect ratio (in log ratio), is resized to cover it and cropped to it (centered or at
random, as square crops are). Every optimizer step draws all its images (all micro-batches, all
processes) from one bucket, so a step is one shape: the train step compiles once per bucket shape met.

Order: epoch e shuffles the images of each bucket (from the seed, the epoch and the bucket), cuts each
bucket into groups of one step's images (the last group of a bucket is filled up from its start, so
every image of every bucket is seen each epoch), and shuffles the groups. Micro-batch m of step s holds
rows [m * b, (m + 1) * b) of group s, and process i its slice of those, so a step depends on the step
number alone: resuming and multi-host reading work as without buckets.
"""

from __future__ import annotations

import functools
import math

import numpy as np

MAX_RATIO = 2.0


def bucket_sizes(resolution: int, multiple: int = 64) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets for `resolution` (a multiple of `multiple`), sorted by aspect ratio."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} must be a multiple of {multiple} for aspect-ratio buckets")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(multiple, 2 * resolution + 1, multiple):
        height = area // width // multiple * multiple
        if height >= multiple and 1 / MAX_RATIO <= width / height <= MAX_RATIO:
            sizes.add((width, height))
            sizes.add((height, width))
    return tuple(sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0])))


def nearest_bucket(size: tuple[int, int], sizes: tuple[tuple[int, int], ...]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) to an image's (width, height); of
    equally near ones, the larger."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i][0] / sizes[i][1]) - ratio), -sizes[i][0]))


class BucketOrder:
    """Which bucket and which examples each optimizer step reads (see the module doc)."""

    def __init__(self, assignment: list[int], sizes: tuple[tuple[int, int], ...], per_step: int, seed: int):
        """`assignment`: each example's bucket index; `per_step`: images per step (batch_size * grad_accum)."""
        self.sizes, self.per_step, self.seed = sizes, per_step, seed
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(assignment):
            members.setdefault(bucket, []).append(index)
        self.members = {b: np.asarray(m) for b, m in sorted(members.items())}
        self.steps_per_epoch = sum(-(-len(m) // per_step) for m in self.members.values())

    def used(self) -> dict[tuple[int, int], int]:
        """{(width, height): images} of the buckets that hold images."""
        return {self.sizes[b]: len(m) for b, m in self.members.items()}

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one object per run; an epoch is reused by its steps)
    def _epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        groups = []
        for bucket, members in self.members.items():
            rng = np.random.default_rng([self.seed, 2, epoch, bucket])
            shuffled = members[rng.permutation(len(members))]
            count = -(-len(shuffled) // self.per_step)
            filled = np.resize(shuffled, count * self.per_step)  # the last group wraps to the start
            groups += [(bucket, filled[g * self.per_step : (g + 1) * self.per_step]) for g in range(count)]
        order = np.random.default_rng([self.seed, 3, epoch]).permutation(len(groups))
        return [groups[i] for i in order]

    def step(self, step: int) -> tuple[tuple[int, int], np.ndarray]:
        """((width, height), example indices int (per_step,)) of optimizer step `step` (0-based)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        bucket, indices = self._epoch(epoch)[offset]
        return self.sizes[bucket], indices
