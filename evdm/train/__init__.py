"""Training: the loop (loop.py), its step with the EMA (step.py), what a run reports (report.py),
the out_dir checks (outdir.py)."""

from evdm.train.loop import train
from evdm.train.step import Trainer, lr_at, make_trainer, train_step

__all__ = ["train", "Trainer", "make_trainer", "train_step", "lr_at"]
