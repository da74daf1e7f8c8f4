"""The two forms of the video convolutions: per-frame 2D (`spacetime = "2d"`) or Conv3d (`"3d"`).

Every convolution of the U-Net is either per frame (a 3x3 or 1x1 kernel applied to each frame
alone) or along time (a 3-tap kernel at each pixel). Both forms compute the same function with the
same number of weights; only the kernel layout differs:

- "3d": `nn.Conv3d` with kernels (1, k, k) and (3, 1, 1) over [B, C, M, H, W] (the original form;
  weights [c_out, c_in, 1, k, k] and [c, c, 3, 1, 1]);
- "2d": `nn.Conv2d` over views of the same tensor: per-frame convs see [B*M, C, H, W], the temporal
  conv sees [B, C, M, H*W] with a (3, 1) kernel (weights [c_out, c_in, k, k] and [c, c, 3, 1]).
  When the 5-D tensor is channels_last_3d (memory [B, M, H, W, C]), both views are channels_last
  4-D tensors without a copy: the layout cuDNN's bf16 tensor-core 2D kernels are built for (and
  what diffusers' UNet3D does).

`adapt_conv_weights` reshapes a state dict saved in one form to the other (they differ only by
singleton kernel dimensions), so checkpoints of either form load into a model of either form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SPACETIME_FORMS = ("2d", "3d")


def _check_form(form: str) -> None:
    if form not in SPACETIME_FORMS:
        raise ValueError(f"unknown spacetime form {form!r}; expected one of {SPACETIME_FORMS}")


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
    module (`.weight`, `.bias`), initialised exactly as nn.Conv2d / nn.Conv3d would, so both forms
    built from one seed hold the same numbers.
    """

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, form: str = "2d",
                 upsample: bool = False) -> None:
        super().__init__()
        _check_form(form)
        self.form, self.stride, self.pad, self.upsample = form, stride, kernel // 2, upsample
        conv = nn.Conv2d(c_in, c_out, kernel) if form == "2d" else nn.Conv3d(c_in, c_out, (1, kernel, kernel))
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "3d":
            if self.upsample:
                x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
            s, p = self.stride, self.pad
            return F.conv3d(x, self.weight, self.bias, stride=(1, s, s), padding=(0, p, p))
        frames = to_frames(x)
        if self.upsample:
            frames = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        return from_frames(F.conv2d(frames, self.weight, self.bias, stride=self.stride, padding=self.pad),
                           x.shape[0])


class TimeConv(nn.Module):
    """A 3-tap convolution along time at every pixel, zero-padded: [B, c, M, H, W] -> same shape."""

    def __init__(self, channels: int, *, form: str = "2d") -> None:
        super().__init__()
        _check_form(form)
        self.form = form
        conv = nn.Conv2d(channels, channels, (3, 1)) if form == "2d" else nn.Conv3d(channels, channels, (3, 1, 1))
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "3d":
            return F.conv3d(x, self.weight, self.bias, padding=(1, 0, 0))
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
