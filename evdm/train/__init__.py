"""Training: the loop (loop.py), its step (step.py) and their parts: EMA, run logs, previews, the dashboard."""

from evdm.train.loop import train
from evdm.train.step import Trainer, lr_at, make_trainer, step_seed, train_step

__all__ = ["train", "Trainer", "make_trainer", "train_step", "lr_at", "step_seed"]
