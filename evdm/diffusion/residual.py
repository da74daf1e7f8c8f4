"""The optional residual parameterisation: diffuse the middle minus the linear blend of the endpoints.

With `diffusion.residual = "blend"` the model denoises r = middle - blend(start, end) instead of the
middle itself, and sampling adds the blend back. The blend already explains the static background
and slow changes, so a small model spends its capacity on the motion (the idea of residual video
diffusion, Yang et al. 2022, with the cheapest deterministic predictor). "none" diffuses the
middle frames directly.
"""

from __future__ import annotations

import torch

RESIDUALS = ("none", "blend")


def linear_blend(start_context: torch.Tensor, end_context: torch.Tensor, middle_frames: int) -> torch.Tensor:
    """Pixel-wise linear interpolation in time from the last start frame to the first end frame.

    start_context, end_context: [B, C, K, H, W] -> float32 [B, C, M, H, W]; middle frame i sits at
    weight (i + 1) / (M + 1) between them, as if the frames were evenly spaced.
    """
    M = middle_frames
    w = torch.arange(1, M + 1, dtype=torch.float32, device=start_context.device).div_(M + 1).view(1, 1, M, 1, 1)
    first, last = start_context[:, :, -1:].float(), end_context[:, :, :1].float()
    return torch.lerp(first, last, w)


def residual_base(residual: str, start_context: torch.Tensor, end_context: torch.Tensor,
                  middle_frames: int) -> torch.Tensor | None:
    """What the diffused variable is relative to: the blend, or None (the middle itself)."""
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual {residual!r}; expected one of {RESIDUALS}")
    return linear_blend(start_context, end_context, middle_frames) if residual == "blend" else None
