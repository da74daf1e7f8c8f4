"""The denoiser network: `build_model(cfg)` -> VideoUNet3D (see docs/ARCHITECTURE.md for the contract)."""

from __future__ import annotations

import torch

from evdm.config import RunConfig
from evdm.models.conditioning import ConditioningEncoder, EndpointFusion
from evdm.models.unet3d import VideoUNet3D

__all__ = ["build_model", "VideoUNet3D", "ConditioningEncoder", "EndpointFusion", "count_parameters"]


def build_model(cfg: RunConfig) -> VideoUNet3D:
    """The VideoUNet3D described by cfg.data (channels, T, context, size) and cfg.model (whose shapes the
    config checked when it was built)."""
    m = cfg.model
    return VideoUNet3D(
        channels=cfg.channels, T=cfg.data.T, context=cfg.context, base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults), res_blocks=m.res_blocks,
        temporal_attn_levels=tuple(m.temporal_attn_levels), attn_head_channels=m.attn_head_channels,
        dropout=m.dropout, direct_input=m.direct_input,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
