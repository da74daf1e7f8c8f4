"""Training previews: a few val clips filled in by the (EMA) model, as a PNG strip and an MP4.

The same clips, noise and steps every time, so previews from different steps are comparable.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from evdm import visualize
from evdm.config import RunConfig
from evdm.denoiser import Denoiser

PREVIEW_SEED = 4321


@torch.no_grad()
def write_preview(denoiser: Denoiser, val_u8: torch.Tensor, cfg: RunConfig, out_dir: str | Path,
                  step: int) -> list[Path]:
    """Sample the first `train.preview_clips` val clips and write step_XXXXXXX.png / .mp4 under out_dir.

    val_u8: uint8 [N, C, T, H, W] (the loader's layout). Sampled with cfg.sample's settings at
    train.preview_steps steps and eta 0. The PNG stacks, per clip, a truth row over a sample row
    (context framed blue); the MP4 plays truth | sample side by side for every clip. The PNG is always
    written; the MP4 is skipped, with one warning, when ffmpeg is missing or fails. Returns the paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = denoiser.net.training
    denoiser.eval()
    clips = val_u8[: cfg.train.preview_clips].permute(0, 2, 3, 4, 1).cpu().numpy()  # [B, T, H, W, C]
    starts, _, ends = cfg.context.split(clips, axis=1)
    settings = dataclasses.replace(cfg.sample, steps=cfg.train.preview_steps, eta=0.0)
    generator = torch.Generator(device=denoiser.device).manual_seed(PREVIEW_SEED)
    samples = denoiser.generate_u8(starts, ends, settings, generator=generator)
    denoiser.train(was_training)

    K, size = cfg.context, cfg.data.size
    strips = [visualize.comparison_strip(truth, sample, K, scale=visualize.strip_scale(size))
              for truth, sample in zip(clips, samples)]
    png = out_dir / f"step_{step:07d}.png"
    visualize.save_png(np.concatenate(strips, axis=0), png)
    # Video frame t: each clip's truth frame t next to its sample frame t, clips stacked vertically.
    pairs = np.concatenate([clips, samples], axis=3)  # [B, T, H, 2W, C]
    frames = np.concatenate(list(pairs), axis=1)  # [T, B*H, 2W, C]
    mp4 = out_dir / f"step_{step:07d}.mp4"
    scale = visualize.video_scale(size)
    return [png, mp4] if visualize.try_save_video(frames, mp4, fps=visualize.FPS, scale=scale) else [png]
