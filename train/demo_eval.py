"""The demo model's checks (those of tests/test_demo.py) as numbers, for any model folder: to judge a run.

    python -m train.demo_eval [--model runs/emoji-unet-refine/final] [--seeds 8] [--extra 40]

Prints, with the tests' settings (30 steps, guidance 7.5, the model's scheduler):
  - hearts: the dominant hue of "an emoji of {colour} heart" for the six colours at seed 0 (the test's
    figure), then over seeds 0..seeds-1 (the seed-0 figure swings between neighbouring runs; judge by this);
  - retrieval: the rank of the captioned training image (pixel L2 at 32x32, among the 3,789 thumbnails of
    tests/data/emoji_32.npz) for the test's 20 captions at seed 0, and for `extra` other captions;
  - the median rank over all of them (chance ~1,900).
"""

from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np

THUMBNAILS = Path(__file__).parents[1] / "tests" / "data" / "emoji_32.npz"
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
# Hue bins in degrees, [start, end): red wraps around 0.
HUE_BINS = {"red": (340, 15), "orange": (15, 42), "yellow": (42, 70), "green": (70, 170), "blue": (170, 255)}
HUE_BINS["purple"] = (255, 340)
STEPS = 30
RETRIEVAL_CAPTIONS = 20
RETRIEVAL_SEED = 2026  # draws the test's captions
EXTRA_SEED = 7


def dominant_colour(image_HW3: np.ndarray) -> str | None:
    """The hue bin holding most of the saturated, non-white pixels of a uint8 RGB image (None if none)."""
    rgb = image_HW3.reshape(-1, 3).astype(np.float64) / 255.0
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    keep = (hsv[:, 1] > 0.35) & (hsv[:, 2] > 0.25)
    if not keep.any():
        return None
    hue = hsv[keep, 0] * 360.0
    counts = {}
    for name, (lo, hi) in HUE_BINS.items():
        inside = (hue >= lo) & (hue < hi) if lo < hi else (hue >= lo) | (hue < hi)
        counts[name] = int(inside.sum())
    return max(counts, key=counts.get)


def thumbnail(image_HW3: np.ndarray) -> np.ndarray:
    """64x64 -> 32x32 by 2x2 box averaging, as the shipped thumbnails (PIL BOX) are made."""
    h, w, _ = image_HW3.shape
    return image_HW3.astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))


def load_thumbnails(path: Path = THUMBNAILS) -> tuple[np.ndarray, list[str]]:
    """The training set at 32x32: float32 (N, 32, 32, 3) in 0..255 and the N captions."""
    data = np.load(path)
    return data["images"].astype(np.float32), [str(c) for c in data["captions"]]


def heart_colours(pipe, seed: int = 0) -> list[str | None]:
    """The dominant colour of each of the six coloured hearts, drawn in one call at `seed`."""
    prompts = [f"an emoji of {colour} heart" for colour in COLOURS]
    images = np.asarray(pipe.generate(prompts, num_inference_steps=STEPS, seed=seed))
    return [dominant_colour(image) for image in images]


def retrieval_ranks(pipe, images: np.ndarray, captions: list[str], chosen: list[int], seed: int = 0) -> list[int]:
    """For each chosen caption: how many training thumbnails are nearer (pixel L2) to its generated image
    than its own training image (0: the nearest)."""
    generated = np.asarray(pipe.generate([captions[i] for i in chosen], num_inference_steps=STEPS, seed=seed))
    flat = images.reshape(len(images), -1)
    ranks = []
    for index, image in zip(chosen, generated, strict=True):
        distances = ((flat - thumbnail(image).reshape(1, -1)) ** 2).sum(1)
        ranks.append(int((distances < distances[index]).sum()))
    return ranks


def draw_indices(count: int, how_many: int, seed: int) -> list[int]:
    """`how_many` distinct caption indices out of `count`, sorted, by a numpy generator seeded `seed`."""
    return sorted(np.random.default_rng(seed).choice(count, how_many, replace=False).tolist())


def main(argv: list[str] | None = None) -> int:
    import sdjax

    parser = argparse.ArgumentParser(prog="python -m train.demo_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled demo model)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds of the hearts check (default 8)")
    parser.add_argument("--extra", type=int, default=40, help="captions beyond the test's 20 (default 40)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.extra < 0:
        parser.error(f"--seeds must be >= 1 and --extra >= 0, got {args.seeds} and {args.extra}")
    pipe = sdjax.load_pipeline(args.model) if args.model else sdjax.load_pipeline()
    images, captions = load_thumbnails()

    per_seed = [heart_colours(pipe, seed) for seed in range(args.seeds)]
    hits = [sum(f == c for f, c in zip(found, COLOURS, strict=True)) for found in per_seed]
    print(f"hearts at seed 0: {hits[0]}/6 {per_seed[0]}")
    print(f"hearts over seeds 0-{len(per_seed) - 1}: {sum(hits)}/{6 * len(per_seed)}")
    for k, colour in enumerate(COLOURS):
        print(f"  {colour:7s} " + " ".join(str(found[k]) for found in per_seed))

    ranks = retrieval_ranks(pipe, images, captions, draw_indices(len(captions), RETRIEVAL_CAPTIONS, RETRIEVAL_SEED))
    print(f"retrieval (the test's {RETRIEVAL_CAPTIONS}): top-5 in {sum(r < 5 for r in ranks)}; ranks {ranks}")
    if args.extra > 0:
        extra = retrieval_ranks(pipe, images, captions, draw_indices(len(captions), args.extra, EXTRA_SEED))
        print(f"retrieval ({args.extra} more): top-5 in {sum(r < 5 for r in extra)}")
        ranks += extra
    print(f"median rank: {int(np.median(ranks))} of {len(captions)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
