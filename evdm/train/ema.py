"""Exponential moving average of model weights, kept in fp32 as a full module copy."""

from __future__ import annotations

import copy

import torch


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Decay with warm-up: early averages forget fast so the EMA is not stuck at init.

    Ramp (1 + step) / (10 + step), capped at `decay`, as in TF's ExponentialMovingAverage
    with num_updates.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + step) / (10.0 + step))


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen fp32 copy of `model` in eval mode."""
    ema = copy.deepcopy(model).float().eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    ema_params = list(ema.parameters())
    model_params = [p.detach().float() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
