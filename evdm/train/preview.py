"""Training previews: a few val clips filled in by the (EMA) model, as a PNG strip and an MP4.

The same clips, noise and steps every time, so previews from different steps are comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evdm import visualize
from evdm.config import RunConfig
from evdm.diffusion.schedule import Schedule
from evdm.data import to_model_input
from evdm.diffusion import split_clip
from evdm.pipeline import fill_middle, to_uint8
from evdm.sampling import FPS, VIDEO_PX, strip_scale

PREVIEW_SEED = 4321


@torch.no_grad()
def write_preview(model: torch.nn.Module, schedule: Schedule, val_u8: torch.Tensor, cfg: RunConfig,
                  out_dir: str | Path, step: int, device: torch.device) -> list[Path]:
    """Sample the first `train.preview_clips` val clips and write step_XXXXXXX.png / .mp4 under out_dir.

    val_u8: uint8 [N, C, T, H, W] (the loader's layout). The PNG stacks, per clip, a truth row over
    a sample row (context framed blue); the MP4 plays truth | sample side by side for every clip.
    The PNG is always written; the MP4 is skipped, with one warning, when ffmpeg is missing or fails.
    Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    u8 = val_u8[: cfg.train.preview_clips]
    start, _, end = split_clip(to_model_input(u8, device, channels_last=False), cfg.context)
    generator = torch.Generator(device=device).manual_seed(PREVIEW_SEED)
    samples = to_uint8(fill_middle(model, schedule, cfg, start, end, steps=cfg.train.preview_steps, eta=0.0,
                                   generator=generator, channels_last=device.type == "cuda"))  # [B, T, H, W, C]
    model.train(was_training)
    clips = u8.permute(0, 2, 3, 4, 1).cpu().numpy()

    K, size = cfg.context, cfg.data.size
    strips = [visualize.comparison_strip(truth, sample, K, scale=strip_scale(size))
              for truth, sample in zip(clips, samples)]
    png = out_dir / f"step_{step:07d}.png"
    visualize.save_png(np.concatenate(strips, axis=0), png)
    # Video frame t: each clip's truth frame t next to its sample frame t, clips stacked vertically.
    pairs = np.concatenate([clips, samples], axis=3)  # [B, T, H, 2W, C]
    frames = np.concatenate(list(pairs), axis=1)  # [T, B*H, 2W, C]
    mp4 = out_dir / f"step_{step:07d}.mp4"
    return [png, mp4] if visualize.try_save_video(frames, mp4, fps=FPS, scale=max(1, VIDEO_PX // size)) else [png]
