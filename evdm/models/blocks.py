"""Building blocks of the video U-Net: timestep embedding, (2+1)D residual blocks with FiLM,
temporal attention over [context, middle, context], down/upsampling.

Tensors are [B, C, T, H, W]. No block branches on tensor values, so the model compiles with
fullgraph=True; every block works on contiguous and channels_last_3d inputs. `form` picks how the
convolutions run (evdm.models.convs: per-frame Conv2d "2d", or Conv3d "3d"); the maths is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evdm.models.convs import FrameConv, TimeConv

# CUDA's SDPA kernels launch one grid row per batch entry and fail from 65,536 rows up
# (grid dimension limit); TemporalAttention never hands them more.
SDPA_MAX_BATCH = 65_535


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


class SpatioTemporalConv(nn.Module):
    """(2+1)D convolution: (1,3,3) spatial, SiLU, (3,1,1) temporal (R(2+1)D, Tran et al. 2018).

    Replaces a (3,3,3) kernel at 12/27 of its weights and FLOPs, with one more nonlinearity.
    The middle is only T - 2K frames (4 in the reference config), so a 3-tap temporal kernel
    already spans most of it; longer-range time mixing and the link to the endpoints come from
    temporal attention. [B, c_in, M, H, W] -> [B, c_out, M, H, W].
    """

    def __init__(self, c_in: int, c_out: int, form: str = "2d") -> None:
        super().__init__()
        self.spatial = FrameConv(c_in, c_out, form=form)
        self.temporal = TimeConv(c_out, form=form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018), per pixel and per frame:
    h * (1 + gamma) + beta with (gamma, beta) = 1x1x1 conv of the conditioning map.

    Zero-initialised, so gamma = beta = 0 (the identity) at the start of training.
    h: [B, c, M, H, W]; cond: [B, c_cond, M, H, W] at the same resolution.
    """

    def __init__(self, c_cond: int, channels: int, form: str = "2d") -> None:
        super().__init__()
        self.proj = zero_init(FrameConv(c_cond, 2 * channels, kernel=1, form=form))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class ResBlock3D(nn.Module):
    """GroupNorm-SiLU-Conv, GroupNorm-FiLM-SiLU-Dropout-Conv, plus a (1x1) skip (ADM-style, with
    the timestep entering through FiLM's conditioning map). Time length is kept.

    x: [B, c_in, M, H, W], cond: [B, c_cond, M, H, W] -> [B, c_out, M, H, W].
    """

    def __init__(self, c_in: int, c_out: int, c_cond: int, dropout: float = 0.0, form: str = "2d") -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = SpatioTemporalConv(c_in, c_out, form)
        self.norm2 = group_norm(c_out)
        self.film = FiLM(c_cond, c_out, form)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SpatioTemporalConv(c_out, c_out, form)
        zero_init(self.conv2.temporal)  # the residual branch starts at zero
        self.skip = nn.Identity() if c_in == c_out else FrameConv(c_in, c_out, kernel=1, form=form)

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
    The B*H*W sequences go to SDPA in pieces of at most `max_batch` (SDPA_MAX_BATCH), on every
    device, so CPU tests run the code path that large GPU batches take.
    h: [B, c, M, H, W]; start, end: [B, c, K, H, W] encoder features -> [B, c, M, H, W].
    """

    def __init__(self, channels: int, head_channels: int, frames: int, max_batch: int = SDPA_MAX_BATCH) -> None:
        super().__init__()
        self.max_batch = max_batch
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
        o = chunked_attention(split(q), split(k), split(v), self.max_batch)  # [BHW, heads, M, d]
        o = self.out(o.transpose(1, 2).reshape(B * H * W, M, c))
        return h + o.reshape(B, H, W, M, c).permute(0, 4, 3, 1, 2).to(h.dtype)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_batch: int) -> torch.Tensor:
    """scaled_dot_product_attention over [N, heads, L, d] in equal pieces of at most max_batch along N.

    N is a static shape, so the piece count is fixed at trace time (fullgraph-compilable).
    """
    n = q.shape[0]
    pieces = -(-n // max_batch)
    if pieces == 1:
        return F.scaled_dot_product_attention(q, k, v)
    size = -(-n // pieces)
    return torch.cat([F.scaled_dot_product_attention(qi, ki, vi)
                      for qi, ki, vi in zip(q.split(size), k.split(size), v.split(size))])


class Downsample(nn.Module):
    """Strided per-frame 3x3 conv: halves H and W, keeps time. [B, c_in, M, H, W] -> [B, c_out, M, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int, form: str = "2d") -> None:
        super().__init__()
        self.conv = FrameConv(c_in, c_out, stride=2, form=form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 in H and W, then a per-frame 3x3 conv. [B, c, M, H, W] -> [B, c, M, 2H, 2W]."""

    def __init__(self, channels: int, form: str = "2d") -> None:
        super().__init__()
        self.conv = FrameConv(channels, channels, form=form, upsample=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
