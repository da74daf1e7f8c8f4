"""The denoiser network: `build_model(cfg)` -> VideoUNet3D (see docs/ARCHITECTURE.md for the contract)."""

import dataclasses

import torch

from evdm.config import RunConfig
from evdm.models.conditioning import ConditioningEncoder, EndpointFusion
from evdm.models.unet3d import VideoUNet3D

__all__ = ["build_model", "VideoUNet3D", "ConditioningEncoder", "EndpointFusion", "count_parameters"]


def build_model(cfg: RunConfig) -> VideoUNet3D:
    """The VideoUNet3D of cfg.data's frames and cfg.model's keys (its keyword arguments, checked by the config)."""
    return VideoUNet3D(channels=cfg.channels, T=cfg.data.T, context=cfg.context, **dataclasses.asdict(cfg.model))


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
