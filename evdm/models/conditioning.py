"""The shared endpoint encoder (one feature map per U-Net level for both ends, one parameter set) and
`EndpointFusion`, which turns one level's start and end features into the map that drives its FiLMs."""

import torch
import torch.nn.functional as F
from torch import nn

from evdm.models.blocks import FrameConv, make_group_norm


class EncoderBlock(nn.Module):
    """Per-frame residual block (spatial convs only, no FiLM). [N, c_in, K, H, W] -> [N, c_out, K, H, W]."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = make_group_norm(c_in), FrameConv(c_in, c_out)
        self.norm2, self.conv2 = make_group_norm(c_out), FrameConv(c_out, c_out)
        self.skip = nn.Identity() if c_in == c_out else FrameConv(c_in, c_out, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class ConditioningEncoder(nn.Module):
    """Shared endpoint encoder, a per-frame conv pyramid with one feature map per level; where cond_drop is True
    the features are learned constants instead (guidance's null conditioning, Ho & Salimans 2022)."""

    def __init__(self, in_channels: int, level_channels: list[int], K: tuple[int, int]) -> None:
        super().__init__()
        self.stem, self.blocks, self.downs = FrameConv(in_channels, level_channels[0]), nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(level_channels):
            self.blocks.append(EncoderBlock(level_channels[max(i - 1, 0)], c))  # from the previous level's width
            if i + 1 < len(level_channels):
                self.downs.append(FrameConv(c, c, stride=2))
        self.null_start = nn.ParameterList([nn.Parameter(torch.zeros(1, c, K[0], 1, 1)) for c in level_channels])
        self.null_end = nn.ParameterList([nn.Parameter(torch.zeros(1, c, K[1], 1, 1)) for c in level_channels])

    def encode(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """frames: [N, C, K, H, W] in [-1, 1] -> per level l: [N, c_l, K, H / 2^l, W / 2^l]."""
        h, feats = self.stem(frames), []
        for i, block in enumerate(self.blocks):
            h = block(h)
            feats.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return feats

    def forward(self, start_context: torch.Tensor, end_context: torch.Tensor,
                cond_drop: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encode both endpoints with the same weights, in one batch of 2B when both ends hold as many frames.
        start_context: [B, C, K_start, H, W], end_context: [B, C, K_end, H, W]; cond_drop: bool [B].
        Returns (start_feats, end_feats), lists over levels of [B, c_l, K_start or K_end, H_l, W_l]."""
        B = start_context.shape[0]
        if start_context.shape == end_context.shape:
            pairs = [(f[:B], f[B:]) for f in self.encode(torch.cat([start_context, end_context], dim=0))]
        else:
            pairs = list(zip(self.encode(start_context), self.encode(end_context)))
        drop = cond_drop.reshape(B, 1, 1, 1, 1)
        nulled = lambda f, null: torch.where(drop, null.to(f.dtype), f)  # noqa: E731
        return ([nulled(fs, null) for (fs, _), null in zip(pairs, self.null_start)],
                [nulled(fe, null) for (_, fe), null in zip(pairs, self.null_end)])


def project_frames(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 projection, weight [c_out, c * K, ...], of x [B, c, K, H, W]'s frames stacked along channels
    (ci * K + k) -> [B, c_out, 1, H, W]: a (K, 1) conv over x's [B, c, K, H*W] view, which does not copy x."""
    B, c, K, H, W = x.shape
    out = F.conv2d(x.reshape(B, c, K, H * W), weight.reshape(-1, c, K, 1).to(x.dtype))
    return out.reshape(B, -1, 1, H, W)


class EndpointFusion(nn.Module):
    """Fuse one level's start and end features into a position-aware conditioning map.
    For middle frame m of M, with w_m = (m + 1) / (M + 1) (its position between the endpoints):
        cond_m = SiLU( P [ (1 - w_m) S ; w_m E ] + pos_m + A emb )
    S, E: the context features stacked along channels (P reads the endpoints' velocity), P a 1x1 projection
    (run as (1 - w) P_S S + w P_E E, `project_frames`), pos_m learned, A emb the projected timestep.
    start: [B, c, K_start, H, W], end: [B, c, K_end, H, W]; emb: [B, emb_dim] -> [B, c, M, H, W]."""

    def __init__(self, channels: int, K: tuple[int, int], M: int, emb_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(channels * sum(K), channels, 1)
        self.pos = nn.Parameter(torch.randn(1, channels, M, 1, 1) * 0.02)
        self.time = nn.Linear(emb_dim, channels)
        w = (torch.arange(M, dtype=torch.float32) + 1) / (M + 1)  # w_m: middle frame m's position
        self.register_buffer("w", w.reshape(1, 1, M, 1, 1), persistent=False)

    def forward(self, start: torch.Tensor, end: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        B, c = start.shape[:2]
        w_start, w_end = self.proj.weight.split([c * start.shape[2], c * end.shape[2]], dim=1)
        # Summed in the channels-last view [B, M, H, W, c], where the broadcast result is contiguous
        # (in [B, c, M, H, W] order the broadcast would lay the output out as [B, H, M, W, c]).
        ps, pe = (project_frames(x, w).movedim(1, -1) for x, w in ((start, w_start), (end, w_end)))
        w = self.w.reshape(1, -1, 1, 1, 1).to(ps.dtype)
        shift = self.proj.bias.reshape(1, c, 1, 1, 1) + self.pos + self.time(emb).reshape(B, c, 1, 1, 1)
        return F.silu((1 - w) * ps + w * pe + shift.movedim(1, -1).to(ps.dtype)).movedim(-1, 1)
