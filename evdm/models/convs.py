"""The U-Net's two kinds of video convolution, as Conv2d over free views of a channels-last tensor.

Every convolution of the U-Net is either per frame (a k x k kernel applied to each frame alone) or
along time (a 3-tap kernel at each pixel). Both run as `F.conv2d` on views of the same 5-D tensor:
per-frame convs see [B*M, C, H, W], the temporal conv sees [B, C, M, H*W] with a (3, 1) kernel. When
the 5-D tensor is channels_last_3d (memory [B, M, H, W, C]), both views are channels_last 4-D tensors
without a copy: the layout cuDNN's bf16 tensor-core kernels are built for (as in diffusers' UNet3D).
On the 2-core CPU the demo ran in 6 min 20 s with this form against 7 min 55 s with Conv3d; on an H200
the two trained equally fast (docs/BENCHMARKS.md), so it is the one form.

Checkpoints of the retired Conv3d form (kernels [c_out, c_in, 1, k, k] and [c, c, 3, 1, 1]) still
load: `adapt_conv_weights` reshapes tensors that differ only by singleton dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, M, H, W] -> [B*M, C, H, W]; a view when x is channels_last_3d."""
    B, C, M, H, W = x.shape
    return x.transpose(1, 2).reshape(B * M, C, H, W)


def from_frames(y: torch.Tensor, B: int) -> torch.Tensor:
    """[B*M, C, H, W] -> [B, C, M, H, W]; channels_last in, channels_last_3d out, without a copy."""
    return y.reshape(B, -1, *y.shape[1:]).transpose(1, 2)


class FrameConv(nn.Module):
    """A k x k convolution applied to every frame alone: [B, c_in, M, H, W] -> [B, c_out, M, H/s, W/s].

    `upsample` doubles H and W (nearest) before the convolution. The weight and bias live on this
    module (`.weight`, `.bias`), initialised exactly as nn.Conv2d would.
    """

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.stride, self.pad, self.upsample = stride, kernel // 2, upsample
        conv = nn.Conv2d(c_in, c_out, kernel)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = to_frames(x)
        if self.upsample:
            frames = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        return from_frames(F.conv2d(frames, self.weight, self.bias, stride=self.stride, padding=self.pad),
                           x.shape[0])


class TimeConv(nn.Module):
    """A 3-tap convolution along time at every pixel, zero-padded: [B, c, M, H, W] -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, (3, 1))
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, M, H, W = x.shape
        return F.conv2d(x.reshape(B, C, M, H * W), self.weight, self.bias, padding=(1, 0)).reshape(B, -1, M, H, W)


def adapt_conv_weights(state_dict: dict, model: nn.Module) -> dict:
    """`state_dict` with each tensor reshaped to the model's shape where the two differ only by
    singleton dimensions (a Conv3d (1,k,k) / (3,1,1) / 1x1x1 kernel vs its Conv2d twin). Other
    mismatches are left for load_state_dict to report."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, value in state_dict.items():
        target = own.get(key)
        if (target is not None and isinstance(value, torch.Tensor) and value.shape != target.shape
                and [d for d in value.shape if d != 1] == [d for d in target.shape if d != 1]):
            out[key] = value.reshape(target.shape)
    return out


def adapt_optimizer_state(optimizer_state: dict, model: nn.Module) -> dict:
    """An optimizer state dict (AdamW's exp_avg, exp_avg_sq per parameter index) with per-parameter
    tensors reshaped like `adapt_conv_weights` does for the weights. Parameter order is
    `model.parameters()`, the order the optimizer was built with."""
    shapes = [p.shape for p in model.parameters()]
    state = {}
    for index, per_param in optimizer_state["state"].items():
        shape = shapes[int(index)]
        state[index] = {k: v.reshape(shape) if isinstance(v, torch.Tensor) and v.ndim > 0
                        and v.shape != shape and v.numel() == shape.numel() else v
                        for k, v in per_param.items()}
    return {**optimizer_state, "state": state}
