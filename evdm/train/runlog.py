"""Run logs on disk: metrics.jsonl (one record per log step) and loss.png (train/val curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from evdm.atomic import atomic_write


def append_metrics(path: str | Path, record: dict) -> None:
    """Append one JSON line; flushed so a crash loses at most the line being written."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line after a crash
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records past `last_step` (those a resumed run will redo)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records)))


def plot_losses(records: list[dict], path: str | Path, size: tuple[int, int] = (640, 360)) -> None:
    """Train (blue) and val (orange) loss against step, log-scale y, written atomically as PNG."""
    series = {
        key: [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] > 0]
        for key in ("loss", "val_loss")
    }
    points = [p for s in series.values() for p in s]
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = math.log10(min(p[1] for p in points)), math.log10(max(p[1] for p in points))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-3)

        def to_px(step: float, value: float) -> tuple[float, float]:
            fx = (step - x0) / (x1 - x0)
            fy = (math.log10(value) - y0) / (y1 - y0)
            return left + fx * (right - left), bottom - fy * (bottom - top)

        for key, color in (("loss", (31, 119, 180)), ("val_loss", (255, 127, 14))):
            pts = [to_px(*p) for p in series[key]]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts if key == "val_loss" else []:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((4, top), f"{10 ** y1:.3g}", fill="black")
        draw.text((4, bottom - 10), f"{10 ** y0:.3g}", fill="black")
        draw.text((left, bottom + 5), f"step {x0}", fill="black")
        draw.text((right - 80, bottom + 5), f"step {x1}", fill="black")
    draw.text((left + 10, h - 18), "train loss (blue), val loss (orange), log scale", fill="black")
    atomic_write(path, img.save, keep_extension=True)  # PIL reads the format from the extension
