"""A contact sheet: images a model draws for training captions, each beside its training image.

    python -m train.contact_sheet --data data/emoji-colours --out docs/demo_contact_sheet.png \
        [--model sdjax/data/demo] [--captions "an emoji of red apple" ...] [--steps 30] [--seed 0] [--scale 2]

Without --captions, the 16 of DEFAULT_CAPTIONS (shapes in named colours and in their own; --count N draws
N at random from the data set instead, by --seed). The sheet has pairs (generated, training) in a grid of 4
pairs per row, each pair labelled with its caption (the part after "an emoji of ").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CAPTIONS = tuple(
    f"an emoji of {name}"
    for name in (
        "red apple", "blue heart", "green rocket", "yellow star", "purple cat face", "orange fish", "blue umbrella",
        "red car", "green tree", "yellow grinning face", "purple butterfly", "orange crown", "ghost", "rocket",
        "sun", "frog",
    )
)  # fmt: skip
PAIRS_PER_ROW = 4
LABEL_HEIGHT = 14


def _records(data_dir: Path) -> list[dict]:
    metadata = data_dir / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found: build the data set first (python -m train.emoji_data)")
    return [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]


def sheet(generated: list[np.ndarray], training: list[np.ndarray], labels: list[str], scale: int) -> Image.Image:
    """uint8 (H, W, 3) pairs side by side, PAIRS_PER_ROW pairs per row, a caption under each pair."""
    h, w = generated[0].shape[:2]
    h, w = h * scale, w * scale
    rows = -(-len(generated) // PAIRS_PER_ROW)
    cell_w, cell_h = 2 * w + 12, h + LABEL_HEIGHT + 6
    canvas = Image.new("RGB", (PAIRS_PER_ROW * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k, (ours, theirs, label) in enumerate(zip(generated, training, labels, strict=True)):
        x, y = (k % PAIRS_PER_ROW) * cell_w + 4, (k // PAIRS_PER_ROW) * cell_h + 2
        for offset, image in ((0, ours), (w + 2, theirs)):
            canvas.paste(Image.fromarray(image).resize((w, h), Image.NEAREST), (x + offset, y))
        draw.text((x, y + h + 2), label[: 2 * w // 6], fill=(0, 0, 0), font=font)
    return canvas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.contact_sheet", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the training data folder (metadata.jsonl)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--model", default=None, help="model folder (default: the bundled demo model)")
    p.add_argument("--captions", nargs="*", default=None, help="training captions (default: DEFAULT_CAPTIONS)")
    p.add_argument("--count", type=int, default=0, help="draw this many captions at random instead")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="pixel magnification in the sheet (default 2)")
    args = p.parse_args(argv)
    try:
        import sdjax

        records = _records(Path(args.data))
        by_caption = {}
        for record in records:  # a caption's first image: the rendering as drawn
            by_caption.setdefault(record["text"], record)
        if args.count:
            picks = np.random.default_rng(args.seed).choice(len(records), args.count, replace=False)
            chosen = [records[i] for i in sorted(picks.tolist())]
        else:
            captions = args.captions or DEFAULT_CAPTIONS
            missing = [c for c in captions if c not in by_caption]
            if missing:
                raise ValueError(f"captions not in {args.data}: {missing}")
            chosen = [by_caption[c] for c in captions]
        pipe = sdjax.load_pipeline(args.model)
        prompts = [r["text"] for r in chosen]
        images = np.asarray(
            pipe.generate(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        )
        training = [np.asarray(Image.open(Path(args.data) / r["file_name"]).convert("RGB")) for r in chosen]
        labels = [t.removeprefix("an emoji of ") for t in prompts]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet(list(images), training, labels, args.scale).save(args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m train.contact_sheet: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
