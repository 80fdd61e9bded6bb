"""The loss-curve PNG of a run, drawn with Pillow (no plotting library needed at run time)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_curve(history: list[dict], path: str | Path) -> Path | None:
    """Writes loss against step (raw in grey, a moving average in blue, log-scaled when the loss spans
    more than a factor of 20) to `path`; nothing when there are fewer than two points."""
    points = [(r["step"], r["loss"]) for r in history if math.isfinite(r.get("loss", math.nan)) and r["loss"] > 0]
    if len(points) < 2:
        return None
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    log_scale = max(losses) / min(losses) > 20
    f = math.log10 if log_scale else (lambda v: v)
    ys = [f(v) for v in losses]
    smooth = _smooth(ys, max(1, len(ys) // 50))
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1

    def xy(step, y):
        x = MARGIN + (step - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
        return x, HEIGHT - MARGIN - (y - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([MARGIN, MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], outline="black")
    draw.line([xy(s, y) for s, y in zip(steps, ys, strict=True)], fill=(170, 170, 170), width=1)
    draw.line([xy(s, y) for s, y in zip(steps, smooth, strict=True)], fill=(30, 90, 200), width=2)
    label = (lambda y: f"{10**y:.3g}") if log_scale else (lambda y: f"{y:.3g}")
    draw.text((4, MARGIN - 6), label(hi), fill="black")
    draw.text((4, HEIGHT - MARGIN - 6), label(lo), fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 6), f"step {x0}", fill="black")
    draw.text((WIDTH - MARGIN - 60, HEIGHT - MARGIN + 6), f"step {x1}", fill="black")
    draw.text((MARGIN, 12), "training loss" + (" (log scale)" if log_scale else ""), fill="black")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
