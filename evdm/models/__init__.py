"""The denoiser: `build_model(cfg)` -> VideoUNet3D (see docs/ARCHITECTURE.md for the contract)."""

from __future__ import annotations

import torch

from evdm.config import RunConfig, check_model_shape
from evdm.models.conditioning import ConditioningEncoder, EndpointFusion
from evdm.models.convs import SPACETIME_FORMS, adapt_conv_weights, adapt_optimizer_state
from evdm.models.unet3d import VideoUNet3D

__all__ = ["build_model", "VideoUNet3D", "ConditioningEncoder", "EndpointFusion", "count_parameters",
           "SPACETIME_FORMS", "adapt_conv_weights", "adapt_optimizer_state", "to_channels_last"]


def build_model(cfg: RunConfig) -> VideoUNet3D:
    """The VideoUNet3D described by cfg.data (channels, T, K, size) and cfg.model.

    Raises ValueError, naming both numbers, when T <= 2K or when data.size is not divisible by
    2 ** (len(model.channel_mults) - 1).
    """
    d, m = cfg.data, cfg.model
    check_model_shape(T=d.T, K=cfg.context, channel_mults=tuple(m.channel_mults),
                      temporal_attn_levels=tuple(m.temporal_attn_levels), size=d.size)
    return VideoUNet3D(
        channels=cfg.channels, T=d.T, K=cfg.context, base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults), res_blocks=m.res_blocks,
        temporal_attn_levels=tuple(m.temporal_attn_levels), attn_head_channels=m.attn_head_channels,
        dropout=m.dropout, spacetime=m.spacetime, direct_input=m.direct_input,
    )


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Every conv weight in the channels-last layout of its rank (5-D: channels_last_3d, 4-D:
    channels_last), in place; the trainer's counterpart of feeding channels_last_3d clips."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim in (4, 5):
                p.data = p.data.contiguous(memory_format=torch.channels_last if p.ndim == 4 else torch.channels_last_3d)
    return model


def count_parameters(model) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
