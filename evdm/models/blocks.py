"""The video U-Net's layers: per-frame and temporal convolutions, layout-keeping norms, temporal attention,
timestep embedding, (2+1)D residual blocks with FiLM, down/upsampling. Tensors are [B, C, T, H, W] in
channels_last_3d; convolutions run as `F.conv2d` on free channels-last views, norms keep their input's dtype and
layout, attention avoids SDPA (docs/GUIDE.md, Design notes). Fullgraph-compilable: no branch on tensor values."""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _affine(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y * weight + bias with weight, bias [C] along dim 1 of y, cast to `dtype`."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return (y * weight.view(shape) + bias.view(shape)).to(dtype)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """GroupNorm (Wu & He 2018) of x [B, C, ...]: fp32 statistics, x's dtype and memory layout back."""
    g = x.float().unflatten(1, (groups, x.shape[1] // groups))
    var, mean = torch.var_mean(g, dim=tuple(range(2, g.ndim)), correction=0, keepdim=True)
    return _affine(((g - mean) * torch.rsqrt(var + eps)).flatten(1, 2), weight, bias, x.dtype)


def channel_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of x [B, C, ...] at every position: fp32 statistics, x's dtype and layout."""
    xf = x.float()
    var, mean = torch.var_mean(xf, dim=1, correction=0, keepdim=True)
    return _affine((xf - mean) * torch.rsqrt(var + eps), weight, bias, x.dtype)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm's parameters, state-dict keys and maths: `group_norm` compiled (fused), torch's kernel eagerly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)


class ChannelNorm(nn.LayerNorm):
    """nn.LayerNorm(channels) along dim 1 of [B, C, ...]: `channel_norm` compiled, torch's kernel eagerly."""

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


class FrameConv(nn.Module):
    """A k x k convolution of every frame alone: [B, c_in, M, H, W] -> [B, c_out, M, H/s, W/s], run on the
    [B*M, C, H, W] view of a channels_last_3d input (no copy either way); `upsample`: nearest x2 first."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.stride, self.pad, self.upsample = stride, kernel // 2, upsample
        conv = nn.Conv2d(c_in, c_out, kernel)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, M, H, W = x.shape
        frames = x.transpose(1, 2).reshape(B * M, C, H, W)
        if self.upsample:
            frames = F.interpolate(frames, scale_factor=2.0, mode="nearest")
        y = F.conv2d(frames, self.weight, self.bias, stride=self.stride, padding=self.pad)
        return y.reshape(B, M, *y.shape[1:]).transpose(1, 2)


class TimeConv(nn.Module):
    """A 3-tap convolution along time at every pixel, zero-padded: [B, c, M, H, W] -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, (3, 1))
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, M, H, W = x.shape
        return F.conv2d(x.reshape(B, C, M, H * W), self.weight, self.bias, padding=(1, 0)).reshape(B, -1, M, H, W)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) along dim 1, per position and head.
    q: [B, Lq, *P, heads, d]; k, v: [B, Lk, *P, heads, d] (P: any positions) -> [B, Lq, *P, heads, d].
    fp32 softmax, v's dtype out. Compiled: `broadcast_attention` (Inductor fuses it); eagerly `matmul_attention`."""
    return broadcast_attention(q, k, v) if torch.compiler.is_compiling() else matmul_attention(q, k, v)


def broadcast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`short_attention` as broadcast multiply-and-sum: no matmul for Inductor to turn back into SDPA."""
    q = q * q.shape[-1] ** -0.5
    scores = (q.unsqueeze(2) * k.unsqueeze(1)).sum(-1)  # [B, Lq, Lk, *P, heads]
    weights = scores.float().softmax(dim=2).to(v.dtype)
    return (weights.unsqueeze(-1) * v.unsqueeze(1)).sum(2)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`short_attention` as batched matrix products over [B, *P, heads, L, d]."""
    q, k, v = (x.movedim(1, -2) for x in (q, k, v))
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # [B, *P, heads, Lq, Lk]
    return (scores.float().softmax(dim=-1).to(v.dtype) @ v).movedim(-2, 1)


class TemporalAttention(nn.Module):
    """Multi-head self-attention along time at every pixel: the M middle frames query all T frames.
    Tokens get LayerNorm and a learned frame-position embedding; the output projection is zero-initialised.
    h: [B, c, M, H, W]; start: [B, c, K_start, H, W], end: [B, c, K_end, H, W] features -> [B, c, M, H, W]."""

    def __init__(self, channels: int, head_channels: int, frames: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} not divisible into {self.heads} heads")
        self.norm = ChannelNorm(channels)
        self.pos = nn.Parameter(torch.randn(frames, channels) * 0.02)
        self.q, self.kv = nn.Linear(channels, channels), nn.Linear(channels, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        dtype, Ks, M = start.dtype, start.shape[2], h.shape[2]
        pos = self.pos.t().to(dtype)[None, :, :, None, None]  # [1, c, T, 1, 1]
        parts, bounds = (start, h.to(dtype), end), (0, Ks, Ks + M, pos.shape[2])
        # Each part normed on its own (LayerNorm is per token): the query projection reads the middle's uncopied.
        normed = [self.norm(x) + pos[:, :, a:b] for x, a, b in zip(parts, bounds, bounds[1:])]
        tokens = torch.cat(normed, dim=2).movedim(1, -1)  # [B, T, H, W, c]
        q = self.q(normed[1].movedim(1, -1))  # [B, M, H, W, c]
        k, v = self.kv(tokens).chunk(2, dim=-1)
        split = lambda x: x.unflatten(-1, (self.heads, -1))  # noqa: E731  [..., c] -> [..., heads, d]
        o = short_attention(split(q), split(k), split(v)).flatten(-2)  # [B, M, H, W, c]
        return h + self.out(o).movedim(-1, 1).to(h.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, sec. 3.5): int64 [B] -> float32 [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=1), (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(dim) -> Linear -> SiLU -> Linear: [B] int64 -> [B, emb_dim]."""

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


class SpatioTemporalConv(nn.Module):
    """(2+1)D convolution, 3x3 per frame, SiLU, 3 taps along time (R(2+1)D, Tran et al. 2018): 12/27 of a
    (3,3,3) kernel's weights and FLOPs; attention does the longer-range time mixing. [B, c_in, M, H, W] -> c_out."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spatial, self.temporal = FrameConv(c_in, c_out), TimeConv(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))


class FiLM(nn.Module):
    """FiLM (Perez et al. 2018) per pixel and frame: h * (1 + gamma) + beta, (gamma, beta) = 1x1 conv of cond.
    Zero-initialised: the identity at the start. h: [B, c, M, H, W]; cond: [B, c_cond, M, H, W]."""

    def __init__(self, c_cond: int, channels: int) -> None:
        super().__init__()
        self.proj = zero_init(FrameConv(c_cond, 2 * channels, kernel=1))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv, GroupNorm-FiLM-SiLU-Dropout-Conv, plus a 1x1 skip (ADM-style; the timestep
    enters through FiLM's map). x: [B, c_in, M, H, W], cond: [B, c_cond, M, H, W] -> [B, c_out, M, H, W]."""

    def __init__(self, c_in: int, c_out: int, c_cond: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.conv1 = make_group_norm(c_in), SpatioTemporalConv(c_in, c_out)
        self.norm2, self.film = make_group_norm(c_out), FiLM(c_cond, c_out)
        self.dropout, self.conv2 = nn.Dropout(dropout), SpatioTemporalConv(c_out, c_out)
        zero_init(self.conv2.temporal)  # the residual branch starts at zero
        self.skip = nn.Identity() if c_in == c_out else FrameConv(c_in, c_out, kernel=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.film(self.norm2(h), cond))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class Downsample(nn.Sequential):
    """Strided per-frame 3x3 conv: halves H and W, keeps time. [B, c_in, M, H, W] -> [B, c_out, M, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(OrderedDict(conv=FrameConv(c_in, c_out, stride=2)))


class Upsample(nn.Sequential):
    """Nearest x2 in H and W, then a per-frame 3x3 conv. [B, c, M, H, W] -> [B, c, M, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__(OrderedDict(conv=FrameConv(channels, channels, upsample=True)))
