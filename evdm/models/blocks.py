"""Building blocks of the video U-Net: timestep embedding, (2+1)D residual blocks with FiLM,
down/upsampling. Temporal attention is in evdm.models.attention, the norms in evdm.models.norms.

Tensors are [B, C, T, H, W], kept channels_last_3d by the caller (evdm.models.convs explains why).
No block branches on tensor values, so the model compiles with fullgraph=True.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from evdm.models.attention import zero_init
from evdm.models.convs import FrameConv, TimeConv
from evdm.models.norms import make_group_norm


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

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.spatial = FrameConv(c_in, c_out)
        self.temporal = TimeConv(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(F.silu(self.spatial(x)))


class FiLM(nn.Module):
    """Feature-wise linear modulation (Perez et al. 2018), per pixel and per frame:
    h * (1 + gamma) + beta with (gamma, beta) = 1x1 conv of the conditioning map.

    Zero-initialised, so gamma = beta = 0 (the identity) at the start of training.
    h: [B, c, M, H, W]; cond: [B, c_cond, M, H, W] at the same resolution.
    """

    def __init__(self, c_cond: int, channels: int) -> None:
        super().__init__()
        self.proj = zero_init(FrameConv(c_cond, 2 * channels, kernel=1))

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
        self.norm1 = make_group_norm(c_in)
        self.conv1 = SpatioTemporalConv(c_in, c_out)
        self.norm2 = make_group_norm(c_out)
        self.film = FiLM(c_cond, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SpatioTemporalConv(c_out, c_out)
        zero_init(self.conv2.temporal)  # the residual branch starts at zero
        self.skip = nn.Identity() if c_in == c_out else FrameConv(c_in, c_out, kernel=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.film(self.norm2(h), cond))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Strided per-frame 3x3 conv: halves H and W, keeps time. [B, c_in, M, H, W] -> [B, c_out, M, H/2, W/2]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = FrameConv(c_in, c_out, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 in H and W, then a per-frame 3x3 conv. [B, c, M, H, W] -> [B, c, M, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = FrameConv(channels, channels, upsample=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
