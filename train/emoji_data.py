"""The emoji data set of the bundled demo model: every emoji of Noto Color Emoji, 64x64 RGB on white.

    python -m train.emoji_data --out data/emoji [--size 64] [--font PATH] [--thumbnails F.npz]

Each emoji the font draws as one glyph (ZWJ sequences and skin tones included) is rendered at the font's
native 109 px, composited on white, centred on a square canvas and resized to --size (Lanczos). Captions
are `an emoji of <name>`, <name> being the CLDR short name from the `emoji` package (underscores to
spaces: "red heart", "grinning face"), or the lowercased Unicode name where it has none. The folder gets
one PNG per emoji and a metadata.jsonl (Hugging Face imagefolder convention) that `python -m train` reads.
Each row also has a sampling "weight": 1 / the number of skin-tone variants of its emoji (a base emoji and
its five tones get 1/6 each; "kiss man man" has 26 variants), so that `--sampling-weight-power 1` draws every
emoji design equally often instead of spending half the draws on skin tones.

Needs Debian's fonts-noto-color-emoji (`apt-get install fonts-noto-color-emoji`) and `pip install emoji`.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
NATIVE_SIZE = 109  # Noto Color Emoji is a bitmap font with one strike
SKIN_TONES = "".join(chr(c) for c in range(0x1F3FB, 0x1F400))  # Fitzpatrick modifiers, light to dark


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


def to_square(rgba: np.ndarray, size: int) -> Image.Image:
    """Composites on white, centres on a square canvas a little larger than the glyph, resizes to `size`."""
    h, w = rgba.shape[:2]
    side = int(max(h, w) * 1.08) + 2
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    glyph = Image.fromarray(rgba, "RGBA")
    canvas.paste(glyph, ((side - w) // 2, (side - h) // 2), glyph)
    return canvas.resize((size, size), Image.LANCZOS)


def skin_tone_weights(texts: list[str]) -> list[float]:
    """1 / (how many of `texts` are the same emoji up to skin-tone modifiers and variation selectors)."""
    strip = {ord(c): None for c in SKIN_TONES + "\ufe0f"}
    bases = [text.translate(strip) for text in texts]
    counts = collections.Counter(bases)
    return [round(1.0 / counts[base], 6) for base in bases]


def build(out: Path, size: int = 64, font_path: Path = FONT) -> int:
    """Writes the data set; returns the number of images."""
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
    for record, weight in zip(records, skin_tone_weights([r["emoji"] for r in records]), strict=True):
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
    p.add_argument("--thumbnails", help="also write the images at 32x32 with their captions to this .npz")
    args = p.parse_args(argv)
    try:
        count = build(Path(args.out), args.size, Path(args.font))
    except EmojiDataError as err:
        print(f"python -m train.emoji_data: error: {err}", file=sys.stderr)
        return 2
    print(f"{count} emoji written to {args.out}", file=sys.stderr)
    if args.thumbnails:
        write_thumbnails(Path(args.out), Path(args.thumbnails))
        print(f"32x32 thumbnails written to {args.thumbnails}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
