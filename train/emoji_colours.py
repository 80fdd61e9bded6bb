"""The demo model's data set: emoji shapes in named colours, 64x64 RGB on white.

    python -m train.emoji_colours --out data/emoji-colours [--size 64] [--renderings 3] [--font PATH] \
        [--thumbnails F.npz]

SHAPES names distinct emoji silhouettes (heart, star, apple, rocket, cat face, ...). Each shape is drawn
in its own colours, captioned `an emoji of <shape>`, and recoloured in each of COLOURS, captioned
`an emoji of <colour> <shape>` ("an emoji of blue heart"). Recolouring keeps the glyph's shading: each
opaque pixel gets the colour's hue at a brightness that follows the pixel's luminance around the glyph's
median (dark outlines stay dark, highlights stay light), so the dominant hue of the image is the named one
by the hue rule of train/demo_eval.py. Every caption has --renderings images: the first as drawn, the
others scaled down a little (0.92, 0.84, ...) and, for colours, with the hue moved a few degrees
(HUE_JITTER), so that a colour word means a range of hues. The folder gets one PNG per image and a
metadata.jsonl (Hugging Face imagefolder convention: file_name, text, shape, colour) that `python -m
train` reads.

Needs Debian's fonts-noto-color-emoji (`apt-get install fonts-noto-color-emoji`).
"""

from __future__ import annotations

import argparse
import colorsys
import json
from pathlib import Path

import numpy as np

from train.emoji_data import FONT, EmojiDataError, _font, render, to_square

# shape name -> the emoji drawn for it: silhouettes that differ from each other at 64x64
SHAPES = {
    "heart": "\u2764\ufe0f", "star": "\u2b50", "apple": "\U0001f34e", "circle": "\U0001f534",
    "square": "\U0001f7e5", "triangle": "\U0001f53a", "diamond": "\U0001f537", "crescent moon": "\U0001f319",
    "cloud": "\u2601\ufe0f", "umbrella": "\u2602\ufe0f", "bell": "\U0001f514", "key": "\U0001f511",
    "house": "\U0001f3e0", "car": "\U0001f697", "fish": "\U0001f41f", "cat face": "\U0001f431",
    "dog face": "\U0001f436", "rocket": "\U0001f680", "tree": "\U0001f333", "mushroom": "\U0001f344",
    "flower": "\U0001f338", "maple leaf": "\U0001f341", "balloon": "\U0001f388", "gift": "\U0001f381",
    "crown": "\U0001f451", "butterfly": "\U0001f98b", "bird": "\U0001f426", "ghost": "\U0001f47b",
    "skull": "\U0001f480", "lightning": "\u26a1", "droplet": "\U0001f4a7", "fire": "\U0001f525",
    "sun": "\u2600\ufe0f", "snowflake": "\u2744\ufe0f", "grinning face": "\U0001f600", "thumbs up": "\U0001f44d",
    "guitar": "\U0001f3b8", "music note": "\U0001f3b5", "anchor": "\u2693", "light bulb": "\U0001f4a1",
    "lock": "\U0001f512", "trophy": "\U0001f3c6", "t-shirt": "\U0001f455", "top hat": "\U0001f3a9",
    "cup": "\u2615", "pear": "\U0001f350", "banana": "\U0001f34c", "cherries": "\U0001f352",
    "grapes": "\U0001f347", "strawberry": "\U0001f353", "carrot": "\U0001f955", "ice cream": "\U0001f366",
    "turtle": "\U0001f422", "snail": "\U0001f40c", "octopus": "\U0001f419", "frog": "\U0001f438",
    "penguin": "\U0001f427", "airplane": "\u2708\ufe0f", "bicycle": "\U0001f6b2", "sailboat": "\u26f5",
    "alarm clock": "\u23f0", "scissors": "\u2702\ufe0f", "pencil": "\u270f\ufe0f", "book": "\U0001f4d5",
    "soccer ball": "\u26bd", "cactus": "\U0001f335", "tulip": "\U0001f337", "puzzle piece": "\U0001f9e9",
}  # fmt: skip
# colour word -> hue in degrees, at the middle of its bin in train/demo_eval.py's HUE_BINS
COLOURS = {"red": 0.0, "orange": 28.0, "yellow": 54.0, "green": 125.0, "blue": 215.0, "purple": 290.0}
HUE_JITTER = 7.0  # degrees; renderings after the first move the hue by -7, +7, -7, ...
SATURATION = 0.9


def recolour(rgba: np.ndarray, hue_degrees: float) -> np.ndarray:
    """uint8 RGBA (H, W, 4) -> the same glyph in one hue: each pixel's brightness follows its luminance
    relative to the glyph's median (the median maps to the pure colour, darker pixels towards 30% of it,
    lighter ones part-way to white); alpha unchanged."""
    rgb = rgba[..., :3].astype(np.float64) / 255.0
    alpha = rgba[..., 3]
    luminance = rgb @ np.array([0.299, 0.587, 0.114])
    opaque = alpha > 127
    median = float(np.median(luminance[opaque])) if opaque.any() else 0.5
    relative = np.clip(0.5 + 1.2 * (luminance - median), 0.0, 1.0)
    value = 1.0 if 40.0 <= hue_degrees % 360 <= 70.0 else 0.92  # yellow is only yellow when bright
    pure = np.array(colorsys.hsv_to_rgb((hue_degrees % 360) / 360.0, SATURATION, value))
    dark = np.clip(relative / 0.5, 0.0, 1.0)[..., None]
    light = np.clip((relative - 0.5) / 0.5, 0.0, 1.0)[..., None]
    out = pure * (0.3 + 0.7 * dark)
    out = out + (1.0 - out) * 0.55 * light
    return np.concatenate([np.round(out * 255).astype(np.uint8), alpha[..., None]], axis=-1)


def build(out: Path, size: int = 64, renderings: int = 3, font_path: Path = FONT) -> int:
    """Writes the data set; returns the number of images."""
    if renderings < 1:
        raise EmojiDataError(f"--renderings must be >= 1, got {renderings}")
    font = _font(font_path)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for shape, text in SHAPES.items():
        rgba = render(font, text)
        if rgba is None:
            raise EmojiDataError(f"the font does not draw {shape!r} ({text!r}) as one glyph: use Noto Color Emoji")
        for colour in (None, *COLOURS):
            for k in range(renderings):
                if colour is None:
                    glyph = rgba
                else:
                    jitter = 0.0 if k == 0 else HUE_JITTER * (-1 if k % 2 else 1)
                    glyph = recolour(rgba, COLOURS[colour] + jitter)
                file_name = f"{len(records):05d}.png"
                to_square(glyph, size, scale=1.0 - 0.08 * k).save(out / file_name)
                caption = f"an emoji of {colour} {shape}" if colour else f"an emoji of {shape}"
                records.append({"file_name": file_name, "text": caption, "shape": shape, "colour": colour})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def main(argv=None) -> int:
    from train.emoji_data import run_builder

    p = argparse.ArgumentParser(prog="python -m train.emoji_colours", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--renderings", type=int, default=3, help="images per caption (default 3)")
    p.add_argument("--font", default=str(FONT), help=f"the Noto Color Emoji font (default {FONT})")
    p.add_argument("--thumbnails", help="also write the images at 32x32 with their captions to this .npz")
    args = p.parse_args(argv)
    return run_builder(
        "python -m train.emoji_colours",
        lambda: build(Path(args.out), args.size, args.renderings, Path(args.font)),
        Path(args.out),
        args.thumbnails,
    )


if __name__ == "__main__":
    raise SystemExit(main())
