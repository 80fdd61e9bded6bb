"""The emoji data set of the bundled demo model: every emoji of Noto Color Emoji, 64x64 RGB on white.

    python -m train.emoji_data --out data/emoji [--size 64] [--font PATH] [--colour-weight 4] [--thumbnails F.npz]

Each emoji the font draws as one glyph (ZWJ sequences and skin tones included) is rendered at the font's
native 109 px, composited on white, centred on a square canvas and resized to --size (Lanczos). Captions
are `an emoji of <name>`, <name> being the CLDR short name from the `emoji` package (underscores to
spaces: "red heart", "grinning face"), or the lowercased Unicode name where it has none. The folder gets
one PNG per emoji and a metadata.jsonl (Hugging Face imagefolder convention) that `python -m train` reads.
Each row also has a sampling "weight": --colour-weight (default 4) for the 77 emoji whose name has a colour
word (COLOUR_WORDS: "red heart", "green circle", "black cat"; not their skin-tone variants), 1 for the
others, so that training with `--sampling-weight-power 1` (as the demo model's recipe does) draws those
colour-named emoji 4x as often: the only images that teach the colour words.

Needs Debian's fonts-noto-color-emoji (`apt-get install fonts-noto-color-emoji`) and `pip install emoji`.
"""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NATIVE_SIZE = 109  # Noto Color Emoji is a bitmap font with one strike
SKIN_TONES = "".join(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers, light to dark
COLOUR_WORDS = frozenset("red orange yellow green blue purple brown black white".split())


class EmojiDataError(RuntimeError):
    pass


def _emoji_module():
    try:
        import emoji
    except ImportError:
        raise EmojiDataError("the emoji package is missing: pip install emoji") from None
    return emoji


def _font(path: Path) -> ImageFont.FreeTypeFont:
    if not path.is_file():
        raise EmojiDataError(
            f"emoji font {path} not found: install it with `sudo apt-get install fonts-noto-color-emoji` "
            "(Debian/Ubuntu) or pass --font PATH to NotoColorEmoji.ttf"
        )
    return ImageFont.truetype(str(path), NATIVE_SIZE)


def caption_name(text: str, data: dict) -> str:
    """The CLDR short name ("red heart"), else the lowercased Unicode name of a single code point."""
    name = data.get("en", "")
    if name:
        return name.strip(":").replace("_", " ")
    if len(text) == 1:
        return unicodedata.name(text, "").lower()
    return ""


def render(font: ImageFont.FreeTypeFont, text: str) -> np.ndarray | None:
    """RGBA uint8 of `text` drawn in colour on a transparent canvas, cropped to its ink; None when the font
    draws it as more than one glyph (a sequence it does not know)."""
    left, top, right, bottom = font.getbbox(text)
    if right - left > 1.3 * (bottom - top) or right - left <= 0:
        return None
    canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4 - left, 4 - top), text, font=font, embedded_color=True)
    pixels = np.asarray(canvas)
    ink = np.argwhere(pixels[:, :, 3] > 0)
    if len(ink) == 0:
        return None
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0) + 1
    return pixels[y0:y1, x0:x1]


def to_square(rgba: np.ndarray, size: int, scale: float = 1.0) -> Image.Image:
    """Composites on white, centres on a square canvas a little larger than the glyph (by 1 / `scale` more:
    the glyph fills `scale` of what it fills at 1), resizes to `size` (Lanczos)."""
    h, w = rgba.shape[:2]
    side = int(max(h, w) * 1.08 / scale) + 2
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    glyph = Image.fromarray(rgba, "RGBA")
    canvas.paste(glyph, ((side - w) // 2, (side - h) // 2), glyph)
    return canvas.resize((size, size), Image.LANCZOS)


def colour_weights(records: list[dict], factor: float) -> list[float]:
    """`factor` for each record whose caption names a colour (a word of COLOUR_WORDS) and whose emoji has no
    skin-tone modifier, else 1."""
    return [
        factor if COLOUR_WORDS & set(r["text"].split()) and not any(c in SKIN_TONES for c in r["emoji"]) else 1.0
        for r in records
    ]


def build(out: Path, size: int = 64, font_path: Path = FONT, colour_weight: float = 4.0) -> int:
    """Writes the data set; returns the number of images."""
    if not colour_weight > 0:  # also refuses nan
        raise EmojiDataError(f"--colour-weight must be > 0, got {colour_weight}")
    emoji = _emoji_module()
    font = _font(font_path)
    notdef = render(font, "\U0010fffd")
    out.mkdir(parents=True, exist_ok=True)
    records, seen = [], set()
    fully_qualified = emoji.STATUS["fully_qualified"]
    for text, data in sorted(emoji.EMOJI_DATA.items(), key=lambda kv: [ord(c) for c in kv[0]]):
        if data.get("status") != fully_qualified:
            continue
        name = caption_name(text, data)
        if not name or name in seen:
            continue
        rgba = render(font, text)
        if rgba is None or (notdef is not None and rgba.shape == notdef.shape and np.array_equal(rgba, notdef)):
            continue
        seen.add(name)
        file_name = f"{len(records):05d}.png"
        to_square(rgba, size).save(out / file_name)
        records.append({"file_name": file_name, "text": f"an emoji of {name}", "emoji": text})
    for record, weight in zip(records, colour_weights(records, colour_weight), strict=True):
        record["weight"] = weight
    (out / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return len(records)


def write_thumbnails(data_dir: Path, out: Path, size: int = 32) -> int:
    """Writes every image of the data set at `size` x `size` (box filter) with its caption to one .npz:
    `images` uint8 (N, size, size, 3), `captions` str (N,). The demo model's retrieval test compares
    generated images against these. Returns N."""
    records = [json.loads(line) for line in (data_dir / "metadata.jsonl").read_text().splitlines() if line]
    images = np.stack(
        [
            np.asarray(Image.open(data_dir / r["file_name"]).convert("RGB").resize((size, size), Image.BOX))
            for r in records
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, captions=np.array([r["text"] for r in records]))
    return len(records)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.emoji_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--font", default=str(FONT), help=f"the Noto Color Emoji font (default {FONT})")
    p.add_argument(
        "--colour-weight",
        type=float,
        default=4.0,
        help="sampling weight of the emoji whose name has a colour word (default 4; the others: 1)",
    )
    p.add_argument("--thumbnails", help="also write the images at 32x32 with their captions to this .npz")
    args = p.parse_args(argv)
    return run_builder(
        "python -m train.emoji_data",
        lambda: build(Path(args.out), args.size, Path(args.font), args.colour_weight),
        Path(args.out),
        args.thumbnails,
    )


def run_builder(prog: str, build_set, out: Path, thumbnails: str | None) -> int:
    """A data-set command's end: runs `build_set()` (returns the image count), then writes the thumbnails
    .npz if asked; an EmojiDataError is one line on stderr and exit status 2."""
    try:
        count = build_set()
    except EmojiDataError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"{count} images written to {out}", file=sys.stderr)
    if thumbnails:
        write_thumbnails(out, Path(thumbnails))
        print(f"32x32 thumbnails written to {thumbnails}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
