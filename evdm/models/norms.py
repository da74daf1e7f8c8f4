"""Normalisation that keeps its input's dtype and memory layout: fp32 statistics, bf16 stays bf16.

Under CUDA autocast, `nn.GroupNorm` and `nn.LayerNorm` run in fp32 and return fp32, and CUDA's
group_norm returns a contiguous tensor for a channels_last_3d input (its backward makes its inputs
contiguous too: pytorch issue 111824). Every norm then costs a dtype and a layout conversion, and
the next convolution converts back: 28% of an H200 training step went to those copies. These norms
compute their statistics in fp32 from the input, and return the input's dtype in the input's layout
(elementwise ops and reductions keep strides), so that torch.compile fuses each into one or two
kernels with the SiLU and FiLM around it. Same parameters and maths as the torch modules.
"""

from __future__ import annotations

import torch
from torch import nn


def _affine(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y * weight + bias with weight, bias [C] along dim 1 of y, cast to `dtype`."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return (y * weight.view(shape) + bias.view(shape)).to(dtype)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm (Wu & He 2018) of x [B, C, ...] over each group of C / groups channels and all positions.

    Statistics in fp32; returns x's dtype and memory layout (splitting dim 1 is a view in any layout).
    """
    g = x.float().unflatten(1, (groups, x.shape[1] // groups))
    var, mean = torch.var_mean(g, dim=tuple(range(2, g.ndim)), correction=0, keepdim=True)
    return _affine(((g - mean) * torch.rsqrt(var + eps)).flatten(1, 2), weight, bias, x.dtype)


def channel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of x [B, C, ...] at every position (a token's features).

    Statistics in fp32; returns x's dtype and memory layout.
    """
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=1, correction=0, keepdim=True)
    return _affine((xf - mean) * torch.rsqrt(var + eps), weight, bias, x.dtype)


# Compiled, the functions above become one or two fused kernels. Run eagerly they would be several
# passes each way (their backward is autograd's, op by op): 3x the CPU time of a demo training step.
# Eager runs therefore use torch's own norm kernels, the same maths (tests/test_model.py).


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's parameters, state-dict keys and maths: `group_norm` when compiled, torch's kernel eagerly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class ChannelNorm(nn.LayerNorm):
    """nn.LayerNorm(channels) along dim 1 of [B, C, ...]: `channel_norm` when compiled; eagerly torch's
    kernel on the channels-last view (free for a channels-last x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return channel_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def make_group_norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups of >= 4 channels (Wu & He 2018), dividing `channels`."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return GroupNorm(groups, channels, eps=1e-6)
