"""Run logs on disk: metrics.jsonl (one record per log step), loss.png (train/val curves) and, when
train.tensorboard is on, the same numbers and the preview strips as TensorBoard events."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from evdm.atomic import atomic_write, disk_full_as_error
from evdm.config import ConfigError


def append_metrics(path: str | Path, record: dict) -> None:
    """Append one JSON line; flushed so a crash loses at most the line being written. On a full disk,
    DiskFullError, and the file is cut back to its whole lines."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    with disk_full_as_error(path, cleanup=lambda: os.truncate(path, size) if path.exists() else None):
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


def plot_losses(records: list[dict], path: str | Path) -> None:
    """Train and val loss against step on a log-scale y axis, with ticks, labels and a legend; written
    atomically as PNG. Matplotlib's Agg canvas directly: no pyplot, so no GUI backend and no global state."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] > 0]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), keep_extension=True)


def check_tensorboard() -> None:
    """ConfigError (one line, how to install) when train.tensorboard is on but tensorboard is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
    except ImportError:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]')") from None


class TensorBoardLog:
    """TensorBoard logs under `log_dir` (train.tensorboard): every number of a metrics.jsonl record as a
    scalar of the same name, preview strips as images.

    Use as a context manager; `enabled=False` (the default config, non-zero ranks) makes every call a no-op.
    purge_step: a resumed run's first new step; events a crashed run logged from there on are hidden.
    """

    def __init__(self, log_dir: str | Path, *, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def scalars(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def image(self, tag: str, png: str | Path, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")
