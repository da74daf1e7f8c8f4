"""Training noise draws and the endpoint-conditioned diffusion loss (pure; randomness passed in)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from evdm.diffusion.schedule import Schedule, extract, q_sample, residual_base, split_output, training_target


class Draws(NamedTuple):
    """All the randomness of one training step: t int64 [B], noise float32 [B, C, M, H, W], cond_drop bool [B]."""

    t: torch.Tensor
    noise: torch.Tensor
    cond_drop: torch.Tensor


def draw_training_noise(
    middle_shape: tuple[int, ...],
    *,
    timesteps: int,
    cfg_drop_prob: float,
    noise_offset: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Draws:
    """The randomness of one training step, drawn from `generator` (in this order: t, noise, offset, drop).

    middle_shape: (B, C, M, H, W). t uniform in [0, timesteps); noise N(0, 1) plus `noise_offset` times
    a per-(sample, channel) N(0, 1) constant (the "offset noise" trick, Guttenberg 2023, which lets the
    model shift a frame's mean brightness); cond_drop True with probability `cfg_drop_prob`
    (classifier-free guidance, Ho & Salimans 2022, sec. 3.2).
    """
    B, C = middle_shape[0], middle_shape[1]
    t = torch.randint(0, timesteps, (B,), generator=generator, device=device)
    noise = torch.randn(middle_shape, generator=generator, device=device)
    offset = torch.randn((B, C) + (1,) * (len(middle_shape) - 2), generator=generator, device=device)
    noise = noise + noise_offset * offset
    cond_drop = torch.rand((B,), generator=generator, device=device) < cfg_drop_prob
    return Draws(t, noise, cond_drop)


def diffusion_loss(
    output: Callable[..., torch.Tensor],
    s: Schedule,
    start: torch.Tensor,
    middle: torch.Tensor,
    end: torch.Tensor,
    draws: Draws,
    *,
    prediction: str,
    temporal_loss_weight: float,
    residual: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion loss on the middle frames of a clip, conditioned on its endpoints.

    start [B, C, K_start, H, W], middle [B, C, M, H, W], end [B, C, K_end, H, W] in [-1, 1];
    output(x_t, t, start, end, cond_drop) -> the network's fp32 output for the noisy diffused variable.
    loss = MSE(output, eps / v / x0 target) over the middle frames only
         + temporal_loss_weight * temporal, where `temporal` is the MSE between the frame-to-frame
           differences of [last start frame, predicted x0 middle, first end frame] and those of the
           true clip over the same frames, so motion across both boundaries is penalised.
    The temporal term is weighted per sample by alpha_bar_t: x0 recovered from an eps prediction
    carries the eps error times sqrt((1-ab)/ab) (up to ~160x at t = 999, linear schedule), which
    would otherwise let the noisiest steps dominate; at low noise the weight is ~1.
    residual: "none" diffuses the middle frames, "blend" their difference from the linear blend of
    the endpoints (evdm.diffusion.schedule); the temporal term always compares whole frames.
    Returns (loss: float32 scalar, stats: {"mse", "temporal"} detached float32 scalars).
    """
    t, noise, cond_drop = draws
    base = residual_base(residual, start, end, middle.shape[2])
    x0 = middle.float() if base is None else middle.float() - base
    x_t = q_sample(s, x0.to(middle.dtype), t, noise.to(middle.dtype))
    out = output(x_t, t, start, end, cond_drop)
    target = training_target(s, x0, t, noise.float(), prediction)
    mse = torch.mean((out.float() - target) ** 2)

    x0_pred, _ = split_output(s, x_t, t, out, prediction)
    if base is not None:
        x0_pred = x0_pred + base
    first, last = start[:, :, -1:].float(), end[:, :, :1].float()
    pred_path = torch.cat([first, x0_pred, last], dim=2)
    true_path = torch.cat([first, middle.float(), last], dim=2)
    diff_err = (pred_path.diff(dim=2) - true_path.diff(dim=2)) ** 2
    weight = extract(s.alphas_cumprod, t, middle.ndim)
    temporal = torch.mean(weight * diff_err)

    loss = mse + temporal_loss_weight * temporal
    return loss, {"mse": mse.detach(), "temporal": temporal.detach()}
