"""Building blocks of the video U-Net: timestep embedding, (2+1)D residual blocks with FiLM,
temporal attention over [context, middle, context], down/upsampling.

Tensors are [B, C, T, H, W]. No block branches on tensor values, so the model compiles with
fullgraph=True; every block works on contiguous and channels_last_3d inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of >= 4 channels (Wu & He 2018), dividing `channels`."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, sec. 3.5; as in DDPM).

    t: int64 [B] -> float32 [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """t -> sinusoid(dim) -> Linear -> SiLU -> Linear: [B] int64 -> [B, emb_dim]."""

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.dim))


def spatial_conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv3d:
    """A per-frame 3x3 convolution: kernel (1, 3, 3)."""
    return nn.Conv3d(c_in, c_out, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1))


class SpatioTemporalConv(nn.Module):
    """(2+1)D convolution: (1,3,3) spatial, SiLU, (3,1,1) temporal (R(2+1)D, Tran et al. 2018).

    Replaces a (3,3,3) kernel at 12/27 of its weights and FLOPs, with one more nonlinearity.
    The middle is only T - 2K frames (4 in the reference config), so a 3-tap temporal kernel
    already spans most of it; longer-range time mixing and the link to the endpoints come from
    temporal attention. [B, c_in, M, H, W] -> [B, c_out, M, H, W].
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spatial = spatial_conv(c_in, c_out)
        self.temporal = nn.Conv3d(c_out, c_out, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018), per pixel and per frame:
    h * (1 + gamma) + beta with (gamma, beta) = 1x1x1 conv of the conditioning map.

    Zero-initialised, so gamma = beta = 0 (the identity) at the start of training.
    h: [B, c, M, H, W]; cond: [B, c_cond, M, H, W] at the same resolution.
    """

    def __init__(self, c_cond: int, channels: int) -> None:
        super().__init__()
        self.proj = zero_init(nn.Conv3d(c_cond, 2 * channels, 1))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv, GroupNorm-FiLM-SiLU-Dropout-Conv, plus a (1x1) skip (ADM-style, with
    the timestep entering through FiLM's conditioning map). Time length is kept.

    x: [B, c_in, M, H, W], cond: [B, c_cond, M, H, W] -> [B, c_out, M, H, W].
    """

    def __init__(self, c_in: int, c_out: int, c_cond: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = SpatioTemporalConv(c_in, c_out)
        self.norm2 = group_norm(c_out)
        self.film = FiLM(c_cond, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SpatioTemporalConv(c_out, c_out)
        zero_init(self.conv2.temporal)  # the residual branch starts at zero
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.film(self.norm2(h), cond))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class TemporalAttention(nn.Module):
    """Multi-head self-attention along time at every spatial position, over the sequence
    [K start-context frames, M middle frames, K end-context frames]; only the middle is updated.

    Queries come from the middle, keys/values from all T = 2K + M frames, so the middle attends to
    the encoded endpoints. Tokens get LayerNorm and a learned frame-position embedding.
    h: [B, c, M, H, W]; start, end: [B, c, K, H, W] encoder features -> [B, c, M, H, W].
    """

    def __init__(self, channels: int, head_channels: int, frames: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} not divisible into {self.heads} heads")
        self.norm = nn.LayerNorm(channels)
        self.pos = nn.Parameter(torch.randn(frames, channels) * 0.02)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        B, c, M, H, W = h.shape
        K = start.shape[2]
        seq = torch.cat([start, h.to(start.dtype), end], dim=2)  # [B, c, T, H, W]
        T = seq.shape[2]
        tokens = seq.permute(0, 3, 4, 2, 1).reshape(B * H * W, T, c)
        tokens = self.norm(tokens) + self.pos.to(tokens.dtype)
        q = self.q(tokens[:, K : K + M])
        k, v = self.kv(tokens).chunk(2, dim=-1)
        split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))  # [BHW, heads, M, d]
        o = self.out(o.transpose(1, 2).reshape(B * H * W, M, c))
        return h + o.reshape(B, H, W, M, c).permute(0, 4, 3, 1, 2).to(h.dtype)


class Downsample(nn.Module):
    """Strided (1,3,3) conv: halves H and W, keeps time. [B, c_in, M, H, W] -> [B, c_out, M, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = spatial_conv(c_in, c_out, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 in H and W, then a (1,3,3) conv. [B, c, M, H, W] -> [B, c, M, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = spatial_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest"))
