"""VideoUNet3D: the pixel-space denoiser of the middle frames, conditioned on both endpoints: x_t [B, C, M, H, W]
-> stem + FiLM -> down levels (ResBlock3D + FiLM, temporal attention at `temporal_attn_levels`, downsampling) ->
bottleneck (ResBlock, attention, ResBlock) -> up levels (skip concat, ResBlock3D + FiLM, attention, upsampling).
One shared `ConditioningEncoder` encodes the endpoints; per level, `EndpointFusion` makes the map for its FiLMs,
and the context features join every temporal attention. `direct_input`: extra stem channels (DIRECT_INPUTS)."""

import torch
import torch.nn.functional as F
from torch import nn

from evdm.config import Context
from evdm.models.blocks import (Downsample, FiLM, FrameConv, ResBlock3D, TemporalAttention, TimestepEmbedder,
                                Upsample, make_group_norm, zero_init)
from evdm.models.conditioning import ConditioningEncoder, EndpointFusion

# model.direct_input -> (the blend, the context frames) fed to the stem beside x_t
DIRECT_INPUTS = {"none": (False, False), "blend": (True, False), "context": (False, True), "both": (True, True)}


class VideoUNet3D(nn.Module):
    """Endpoint-conditioned video U-Net: forward(x_t, t, start_context, end_context, blend, cond_drop) -> out.
    x_t, out: [B, C, M, H, W]; t: int64 [B]; start_context [B, C, K_start, H, W], end_context [B, C, K_end, H, W]
    in [-1, 1]; blend: [B, C, M, H, W] (evdm.diffusion.linear_blend), read when direct_input has it; cond_drop:
    bool [B] (True: learned null conditioning). H and W must be divisible by 2 ** (len(channel_mults) - 1)."""

    def __init__(self, *, channels: int, T: int, context: Context, base_channels: int = 96,
                 channel_mults: tuple[int, ...] = (1, 2, 4), res_blocks: int = 2,
                 temporal_attn_levels: tuple[int, ...] = (1, 2), attn_head_channels: int = 32,
                 dropout: float = 0.0, direct_input: str = "none") -> None:
        super().__init__()
        self.context = Context(*context)
        self.channels, self.T, self.middle_frames = channels, T, self.context.middle_frames(T)
        self.downscale = 2 ** (len(channel_mults) - 1)
        level_ch, emb_dim = [base_channels * m for m in channel_mults], 4 * base_channels
        self.attn_levels = tuple(sorted(set(temporal_attn_levels)))
        block = lambda c_in, c_out: ResBlock3D(c_in, c_out, c_out, dropout)  # noqa: E731
        attn = lambda c: TemporalAttention(c, attn_head_channels, T)  # noqa: E731

        self.time_embed = TimestepEmbedder(base_channels, emb_dim)
        self.encoder = ConditioningEncoder(channels, level_ch, self.context)
        self.fusion = nn.ModuleList([EndpointFusion(c, self.context, self.middle_frames, emb_dim) for c in level_ch])

        self.direct_input = direct_input
        blend, frames = DIRECT_INPUTS[direct_input]
        direct_ch = channels * (int(blend) + int(frames) * sum(self.context))
        self.stem, self.stem_film = FrameConv(channels + direct_ch, level_ch[0]), FiLM(level_ch[0], level_ch[0])
        skip_ch = self._build_down(level_ch, res_blocks, block, attn)
        c_mid = level_ch[-1]
        self.mid_block1, self.mid_attn, self.mid_block2 = block(c_mid, c_mid), attn(c_mid), block(c_mid, c_mid)
        self._build_up(level_ch, res_blocks, skip_ch, block, attn)
        self.out_norm, self.out_conv = make_group_norm(level_ch[0]), zero_init(FrameConv(level_ch[0], channels))

    def _build_down(self, level_ch: list[int], res_blocks: int, block, attn) -> list[int]:
        """Down path: per level `res_blocks` blocks (+ attention), then a downsample; returns the skips' widths."""
        self.down_blocks, self.down_attn, self.downsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skip_ch = [level_ch[0]]
        for lv, c in enumerate(level_ch):  # the stem and each downsample already give the level's width
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(block(c, c))
                if lv in self.attn_levels:
                    attns.append(attn(c))
            self.down_blocks.append(blocks)
            self.down_attn.append(attns)
            skip_ch += [c] * res_blocks
            if lv + 1 < len(level_ch):
                self.downsample.append(Downsample(c, level_ch[lv + 1]))
                skip_ch.append(level_ch[lv + 1])
        return skip_ch

    def _build_up(self, level_ch: list[int], res_blocks: int, skip_ch: list[int], block, attn) -> None:
        """Up path: per level `res_blocks + 1` blocks, each eating one skip, then an upsample."""
        self.up_blocks, self.up_attn, self.upsample = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        c = level_ch[-1]
        for lv in reversed(range(len(level_ch))):
            c_out = level_ch[lv]
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for _ in range(res_blocks + 1):
                blocks.append(block(c + skip_ch.pop(), c_out))
                if lv in self.attn_levels:
                    attns.append(attn(c_out))
                c = c_out
            self.up_blocks.append(blocks)
            self.up_attn.append(attns)
            if lv > 0:
                self.upsample.append(Upsample(c))

    def _check_inputs(self, x_t: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
        """Static shape checks: resolved at trace time, no data-dependent control flow."""
        B, C, M, H, W = x_t.shape
        if (C, M) != (self.channels, self.middle_frames):
            raise ValueError(f"x_t {tuple(x_t.shape)}: expected C={self.channels} channels and "
                             f"M=T-2K={self.middle_frames} middle frames")
        for name, ctx, K in (("start_context", start, self.context.start), ("end_context", end, self.context.end)):
            if tuple(ctx.shape) != (B, C, K, H, W):
                raise ValueError(f"{name} {tuple(ctx.shape)}: expected {(B, C, K, H, W)} (K={K})")
        if H % self.downscale or W % self.downscale:
            raise ValueError(f"frame size {H}x{W} must be divisible by {self.downscale} "
                             f"(2 ** (len(channel_mults) - 1))")

    def _stem_input(self, x_t: torch.Tensor, start: torch.Tensor, end: torch.Tensor, blend: torch.Tensor,
                    cond_drop: torch.Tensor) -> torch.Tensor:
        """x_t [B, C, M, H, W] with the `direct_input` channels appended: [B, C + extra, M, H, W]. Where
        cond_drop is True they are zero, so guidance's null branch sees no endpoint here either."""
        with_blend, context = DIRECT_INPUTS[self.direct_input]
        if not (with_blend or context):
            return x_t
        B, C, M, H, W = x_t.shape
        extra = [blend.to(x_t.dtype)] if with_blend else []
        if context:  # every context frame, stacked along channels, beside every middle frame
            frames = torch.cat([start, end], dim=2).to(x_t.dtype)
            extra.append(frames.reshape(B, -1, 1, H, W).expand(-1, -1, M, -1, -1))
        extra = torch.where(cond_drop.reshape(B, 1, 1, 1, 1), 0.0, torch.cat(extra, dim=1))
        return torch.cat([x_t, extra], dim=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, start_context: torch.Tensor, end_context: torch.Tensor,
                blend: torch.Tensor, cond_drop: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x_t, start_context, end_context)
        emb = self.time_embed(t)
        start_feats, end_feats = self.encoder(start_context.to(x_t.dtype), end_context.to(x_t.dtype), cond_drop)
        conds = [f(s, e, emb) for f, s, e in zip(self.fusion, start_feats, end_feats)]

        h = self.stem_film(self.stem(self._stem_input(x_t, start_context, end_context, blend, cond_drop)), conds[0])
        skips = [h]
        for lv, (blocks, attns) in enumerate(zip(self.down_blocks, self.down_attn)):
            for i, block in enumerate(blocks):
                h = block(h, conds[lv])
                if len(attns):
                    h = attns[i](h, start_feats[lv], end_feats[lv])
                skips.append(h)
            if lv < len(self.downsample):
                h = self.downsample[lv](h)
                skips.append(h)

        h = self.mid_block1(h, conds[-1])
        h = self.mid_attn(h, start_feats[-1], end_feats[-1])
        h = self.mid_block2(h, conds[-1])

        for j, (blocks, attns) in enumerate(zip(self.up_blocks, self.up_attn)):
            lv = len(self.up_blocks) - 1 - j
            for i, block in enumerate(blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), conds[lv])
                if len(attns):
                    h = attns[i](h, start_feats[lv], end_feats[lv])
            if j < len(self.upsample):
                h = self.upsample[j](h)

        return self.out_conv(F.silu(self.out_norm(h)))
