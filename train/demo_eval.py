"""The demo model's figures, for any model folder: is the named colour drawn, and the named shape?

    python -m train.demo_eval [--model runs/emoji-unet/final] [--schedulers euler_a,euler,...] \
        [--dtypes float32,bfloat16] [--guidance 4,7.5,9] [--json F]

The held-out prompts (HELD_OUT: 36 colour-and-shape captions of the data set, six per colour, drawn by a
fixed seed before the recipe was chosen; the recipe was never judged on them) are drawn for every scheduler,
dtype and guidance scale, 30 steps, each guidance at its own seed (GUIDANCE_SEEDS). Two figures each:
  - hue: the share of images whose dominant hue (the hue rule, `dominant_colour`) is the named colour;
  - retrieval top-5: the share of images for which an image of the prompt's own caption is among the 5
    nearest training images (pixel L2 at 32x32 among the thumbnails of tests/data/emoji_colours_32.npz).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

THUMBNAILS = Path(__file__).parents[1] / "tests" / "data" / "emoji_colours_32.npz"
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
# Hue bins in degrees, [start, end): red wraps around 0.
HUE_BINS = {"red": (340, 15), "orange": (15, 42), "yellow": (42, 70), "green": (70, 170), "blue": (170, 255)}
HUE_BINS["purple"] = (255, 340)
STEPS = 30
SCHEDULERS = ("euler_a", "euler", "dpmpp_2m_karras", "ddim", "unipc")
DTYPES = ("float32", "bfloat16")
GUIDANCE_SEEDS = {4.0: 0, 7.5: 1000, 9.0: 2000}  # guidance scale -> the seed of its first image
HELD_OUT_SEED = 2026
PER_COLOUR = 6


def dominant_colour(image_HW3: np.ndarray) -> str | None:
    """The hue bin holding most of the saturated, non-white pixels of a uint8 RGB image (None if none)."""
    rgb = image_HW3.reshape(-1, 3).astype(np.float64) / 255.0
    top, bottom = rgb.max(1), rgb.min(1)
    spread = top - bottom
    saturation = np.divide(spread, top, out=np.zeros_like(top), where=top > 0)
    keep = (saturation > 0.35) & (top > 0.25)
    if not keep.any():
        return None
    r, g, b = rgb[keep].T
    top, spread = top[keep], spread[keep]  # spread > 0 where kept: saturation > 0.35
    hue = np.where(r == top, (g - b) / spread, np.where(g == top, 2.0 + (b - r) / spread, 4.0 + (r - g) / spread))
    hue = (hue / 6.0) % 1.0 * 360.0  # colorsys.rgb_to_hsv's hue, in degrees
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


def held_out(per_colour: int = PER_COLOUR, seed: int = HELD_OUT_SEED) -> list[tuple[str, str]]:
    """(caption, colour) pairs: for each colour, `per_colour` shapes of the data set other than the heart
    (the hearts are the test's own), drawn without replacement by a numpy generator seeded `seed`."""
    from train.emoji_colours import SHAPES

    shapes = sorted(s for s in SHAPES if s != "heart")
    rng = np.random.default_rng(seed)
    return [
        (f"an emoji of {colour} {shapes[k]}", colour)
        for colour in COLOURS
        for k in sorted(rng.choice(len(shapes), per_colour, replace=False).tolist())
    ]


HELD_OUT = held_out()


def retrieval_ranks(generated: np.ndarray, wanted: list[str], images: np.ndarray, captions: list[str]) -> list[int]:
    """For each generated uint8 (64, 64, 3) image: how many training thumbnails of other captions are nearer
    (pixel L2) than the nearest thumbnail of its wanted caption (0: an image of its caption is the nearest)."""
    flat = images.reshape(len(images), -1)
    own = {caption: np.array([c == caption for c in captions]) for caption in set(wanted)}
    ranks = []
    for image, caption in zip(generated, wanted, strict=True):
        if not own[caption].any():
            raise ValueError(f"{caption!r} is not a caption of the training set")
        distances = ((flat - thumbnail(image).reshape(1, -1)) ** 2).sum(1)
        ranks.append(int((distances[~own[caption]] < distances[own[caption]].min()).sum()))
    return ranks


def heart_colours(pipe, seed: int = 0, **options) -> list[str | None]:
    """The dominant colour of each of the six coloured hearts, drawn in one call at `seed`."""
    prompts = [f"an emoji of {colour} heart" for colour in COLOURS]
    images = np.asarray(pipe.generate(prompts, num_inference_steps=STEPS, seed=seed, **options))
    return [dominant_colour(image) for image in images]


def score(pipe, prompts: list[tuple[str, str]], images, captions, **options) -> dict:
    """Draws the prompts once (30 steps, `options` for generate) and returns the hue and retrieval figures:
    {"hue": share in the named hue, "top5": share retrieved in the top 5, "misses": [(caption, drawn hue,
    rank)] of the images that failed either}."""
    texts = [text for text, _ in prompts]
    generated = np.asarray(pipe.generate(texts, num_inference_steps=STEPS, **options))
    hues = [dominant_colour(image) for image in generated]
    ranks = retrieval_ranks(generated, texts, images, captions)
    right = [hue == colour for hue, (_, colour) in zip(hues, prompts, strict=True)]
    misses = [
        (text, hue, rank)
        for (text, _), hue, rank, ok in zip(prompts, hues, ranks, right, strict=True)
        if not ok or rank >= 5
    ]
    return {"hue": float(np.mean(right)), "top5": float(np.mean([r < 5 for r in ranks])), "misses": misses}


def evaluate(model: str | None, schedulers, dtypes, guidances) -> list[dict]:
    """One row per scheduler and dtype: hue and top-5 shares per guidance and over all of them."""
    import jax.numpy as jnp

    import sdjax

    images, captions = load_thumbnails()
    rows = []
    for dtype in dtypes:
        pipe = sdjax.load_pipeline(model, dtype=getattr(jnp, dtype))  # model None: the bundled one
        for scheduler in schedulers:
            start = time.perf_counter()
            row = {"scheduler": scheduler, "dtype": dtype, "by_guidance": {}, "misses": []}
            for guidance in guidances:
                seed = GUIDANCE_SEEDS.get(guidance, int(guidance * 1000))
                result = score(
                    pipe, HELD_OUT, images, captions, scheduler=scheduler, guidance_scale=guidance, seed=seed
                )
                row["by_guidance"][guidance] = {"hue": result["hue"], "top5": result["top5"]}
                row["misses"] += [(guidance, *miss) for miss in result["misses"]]
            row["hue"] = float(np.mean([g["hue"] for g in row["by_guidance"].values()]))
            row["top5"] = float(np.mean([g["top5"] for g in row["by_guidance"].values()]))
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
            by = " ".join(f"g{g}: {v['hue']:.0%}/{v['top5']:.0%}" for g, v in row["by_guidance"].items())
            figures = f"hue {row['hue']:.1%} top-5 {row['top5']:.1%}  ({by}; {row['seconds']:.0f} s)"
            print(f"{scheduler:16s} {dtype:9s} {figures}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled demo model)")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="comma-separated sdjax names")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: float32, bfloat16, float16")
    parser.add_argument("--guidance", default="4,7.5,9", help="comma-separated guidance scales (default 4,7.5,9)")
    parser.add_argument("--json", help="also write the rows (with every miss) to this JSON file")
    args = parser.parse_args(argv)
    guidances = [float(g) for g in args.guidance.split(",") if g]
    rows = evaluate(args.model, args.schedulers.split(","), args.dtypes.split(","), guidances)
    cells = [cell for row in rows for cell in row["by_guidance"].values()]
    worst_hue, worst_top5 = min(c["hue"] for c in cells), min(c["top5"] for c in cells)
    print(f"held-out prompts: {len(HELD_OUT)}; of any row and guidance:", end=" ")
    print(f"worst hue {worst_hue:.1%}, worst top-5 {worst_top5:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
