"""Diffusion math: schedules, the training loss and the samplers (pure functions, torch only)."""

from evdm.diffusion.loss import Draws, diffusion_loss, draw_training_noise
from evdm.diffusion.samplers import ddim_step, ddpm_step, guided_output, sample
from evdm.diffusion.schedule import Schedule, make_schedule, q_sample, split_output

__all__ = [
    "Schedule", "make_schedule", "q_sample", "split_output",
    "Draws", "draw_training_noise", "diffusion_loss", "sample", "guided_output", "ddim_step", "ddpm_step",
]
