"""Training: the loop (loop.py) and its parts: EMA, run logs, previews, the live dashboard."""

from evdm.train.loop import lr_at, step_seed, train

__all__ = ["lr_at", "step_seed", "train"]
