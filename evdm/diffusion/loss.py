"""Training noise draws and the endpoint-conditioned diffusion loss (pure; randomness passed in)."""

from __future__ import annotations

from typing import Callable

import torch

from evdm.diffusion.residual import residual_base
from evdm.diffusion.schedule import Schedule, extract, q_sample, split_output, training_target


def split_clip(clip: torch.Tensor, K: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clip [B, C, T, ...] -> (start_context, middle, end_context) along dim 2, views.

    K: the observed frames at each end, one count for both or (K_start, K_end); T > K_start + K_end.
    """
    Ks, Ke = (K, K) if isinstance(K, int) else K
    T = clip.shape[2]
    if min(Ks, Ke) < 1 or T <= Ks + Ke:
        raise ValueError(f"clip has T={T} frames, need T > K_start + K_end with K_start={Ks}, K_end={Ke} >= 1")
    return clip[:, :, :Ks], clip[:, :, Ks : T - Ke], clip[:, :, T - Ke :]


def draw_training_noise(
    middle_shape: tuple[int, ...],
    *,
    timesteps: int,
    cfg_drop_prob: float,
    noise_offset: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All the randomness of one training step, drawn from `generator`.

    middle_shape: (B, C, M, H, W). Returns
    t: int64 [B] uniform in [0, timesteps); noise: float32 [B, C, M, H, W], N(0, 1) plus
    `noise_offset` times a per-(sample, channel) N(0, 1) constant (the "offset noise" trick,
    Guttenberg 2023, which lets the model shift a frame's mean brightness);
    cond_drop: bool [B], True with probability `cfg_drop_prob` (classifier-free guidance,
    Ho & Salimans 2022, sec. 3.2).
    """
    B, C = middle_shape[0], middle_shape[1]
    t = torch.randint(0, timesteps, (B,), generator=generator, device=device)
    noise = torch.randn(middle_shape, generator=generator, device=device)
    offset = torch.randn((B, C) + (1,) * (len(middle_shape) - 2), generator=generator, device=device)
    noise = noise + noise_offset * offset
    cond_drop = torch.rand((B,), generator=generator, device=device) < cfg_drop_prob
    return t, noise, cond_drop


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    s: Schedule,
    clip: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    cond_drop: torch.Tensor,
    *,
    K: int | tuple[int, int],
    prediction: str = "eps",
    temporal_loss_weight: float = 0.05,
    residual: str = "none",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion loss on the middle frames of `clip`, conditioned on its endpoints.

    clip: [B, C, T, H, W] in [-1, 1]; K: the observed frames at each end, one count or (K_start, K_end);
    t: int64 [B]; noise: [B, C, M, H, W] with M = T - K_start - K_end; cond_drop: bool [B].
    loss = MSE(model output, eps or v target) over the middle frames only
         + temporal_loss_weight * temporal, where `temporal` is the MSE between the frame-to-frame
           differences of [last start frame, predicted x0 middle, first end frame] and those of the
           true clip over the same frames, so motion across both boundaries is penalised.
    The temporal term is weighted per sample by alpha_bar_t: x0 recovered from an eps prediction
    carries the eps error times sqrt((1-ab)/ab) (up to ~160x at t = 999, linear schedule), which
    would otherwise let the noisiest steps dominate; at low noise the weight is ~1.
    residual: "none" diffuses the middle frames, "blend" their difference from the linear blend of
    the endpoints (evdm.diffusion.residual); the temporal term always compares whole frames.
    Returns (loss: float32 scalar, stats: {"mse", "temporal"} detached float32 scalars).
    """
    start_context, middle_target, end_context = split_clip(clip, K)
    base = residual_base(residual, start_context, end_context, middle_target.shape[2])
    x0 = middle_target.float() if base is None else middle_target.float() - base
    x_t = q_sample(s, x0.to(middle_target.dtype), t, noise.to(middle_target.dtype))
    out = model(x_t, t, start_context, end_context, cond_drop)
    target = training_target(s, x0, t, noise.float(), prediction)
    mse = torch.mean((out.float() - target) ** 2)

    x0_pred, _ = split_output(s, x_t, t, out, prediction)
    if base is not None:
        x0_pred = x0_pred + base
    first, last = start_context[:, :, -1:].float(), end_context[:, :, :1].float()
    pred_path = torch.cat([first, x0_pred, last], dim=2)
    true_path = torch.cat([first, middle_target.float(), last], dim=2)
    diff_err = (pred_path.diff(dim=2) - true_path.diff(dim=2)) ** 2
    weight = extract(s.alphas_cumprod, t, clip.ndim)
    temporal = torch.mean(weight * diff_err)

    loss = mse + temporal_loss_weight * temporal
    return loss, {"mse": mse.detach(), "temporal": temporal.detach()}
