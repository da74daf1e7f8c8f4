"""Diffusion math: schedules, the training loss and the samplers (pure functions, torch only)."""

from evdm.diffusion.loss import diffusion_loss, draw_training_noise, split_clip
from evdm.diffusion.samplers import ddim_step, ddpm_step, sample_clip
from evdm.diffusion.schedule import Schedule, make_schedule, q_sample, split_output

__all__ = [
    "Schedule", "make_schedule", "q_sample", "split_output",
    "draw_training_noise", "diffusion_loss", "split_clip", "sample_clip", "ddim_step", "ddpm_step",
]
