"""Temporal self-attention over [start context, middle, end context] at every pixel.

The sequences are short (T = 8 frames: 4 middle queries over 8 keys in the reference config) and
there are very many of them (B x H x W). Fused SDPA kernels are built for long sequences: on an H200
cuDNN's flash kernel spent 22% of a training step computing 64 x 128 tiles that were mostly padding,
and CUDA's SDPA fails from 65,536 sequences up. `short_attention` writes the same maths with an fp32
softmax and no SDPA call: compiled, as a broadcast multiply-and-sum, which Inductor fuses into a few
elementwise and reduction kernels (5.6x SDPA's forward + backward at level 2's shape, measured on the
H200; `q @ k.T` would be pattern-matched back into SDPA); eagerly, as batched matrix products. Neither
has a sequence-count limit, and both run on every device: the CPU tests run the eager form in every
model test and the compiled form in the compile test, and check the two against SDPA.

The module works on the channels-last layout the U-Net keeps ([B, c, T, H, W] stored as
[B, T, H, W, c]): `x.movedim(1, -1)` is then a free, contiguous view for the linear projections.
"""

from __future__ import annotations

import torch
from torch import nn

from evdm.models.norms import ChannelNorm


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, eq. 1) along dim 1, per position and head.

    q: [B, Lq, *P, heads, d]; k, v: [B, Lk, *P, heads, d] (P: any positions) -> [B, Lq, *P, heads, d].
    The softmax runs in fp32, the output is in v's dtype. Compiled, the scores are a broadcast product
    summed over d (`broadcast_attention`), which Inductor fuses; run eagerly, the same maths as batched
    matrix products (`matmul_attention`): the broadcast form materialises a [.., Lq, Lk, d] product
    per call, 10% of a CPU demo step.
    """
    if torch.compiler.is_compiling():
        return broadcast_attention(q, k, v)
    return matmul_attention(q, k, v)


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
    """Multi-head self-attention along time at every spatial position; only the middle is updated.

    Queries come from the M middle frames, keys and values from all T = K_start + M + K_end frames,
    so the middle attends to the encoded endpoints. Tokens get LayerNorm (over channels) and a
    learned frame-position embedding; the output projection is zero-initialised (identity at start).
    h: [B, c, M, H, W]; start: [B, c, K_start, H, W], end: [B, c, K_end, H, W] encoder features
    -> [B, c, M, H, W]. Parameters as nn.Linear / nn.LayerNorm (`q`, `kv`, `out`, `norm`, `pos`).
    """

    def __init__(self, channels: int, head_channels: int, frames: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"attention channels {channels} not divisible into {self.heads} heads")
        self.norm = ChannelNorm(channels)
        self.pos = nn.Parameter(torch.randn(frames, channels) * 0.02)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(channels, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, h: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        dtype, Ks, M = start.dtype, start.shape[2], h.shape[2]
        pos = self.pos.t().to(dtype)[None, :, :, None, None]  # [1, c, T, 1, 1]
        parts = (start, h.to(dtype), end)
        bounds = (0, Ks, Ks + M, pos.shape[2])
        # Each part is normalised on its own (LayerNorm is per token) so the middle's normed tokens
        # are a tensor of their own: the query projection then reads them without a copy.
        normed = [self.norm(x) + pos[:, :, a:b] for x, a, b in zip(parts, bounds, bounds[1:])]
        tokens = torch.cat(normed, dim=2).movedim(1, -1)  # [B, T, H, W, c]
        q = self.q(normed[1].movedim(1, -1))  # [B, M, H, W, c]
        k, v = self.kv(tokens).chunk(2, dim=-1)
        split = lambda x: x.unflatten(-1, (self.heads, -1))  # noqa: E731  [..., c] -> [..., heads, d]
        o = short_attention(split(q), split(k), split(v)).flatten(-2)  # [B, M, H, W, c]
        return h + self.out(o).movedim(-1, 1).to(h.dtype)
