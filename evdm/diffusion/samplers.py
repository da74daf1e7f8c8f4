"""DDPM ancestral and DDIM samplers with classifier-free guidance; pure step functions.

`sample_clip` generates the middle of a clip from its endpoints and returns
[exact start_context, generated middle, exact end_context] along time. The step functions take
(x_t, x0, eps) already converted by `schedule.split_output` (the one converter), so no sampler
branches on the prediction type.
"""

from __future__ import annotations

from typing import Callable

import torch

from evdm.diffusion.residual import residual_base
from evdm.diffusion.schedule import Schedule, alpha_bar_at, eps_from_x0, split_output

SAMPLERS = ("ddim", "ddpm")


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """`steps` descending training timesteps from timesteps-1 to 0, evenly spaced (both ends kept)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, timesteps={timesteps}], got {steps}")
    if steps == 1:
        return [timesteps - 1]
    return [round((timesteps - 1) * (1 - i / (steps - 1))) for i in range(steps)]


def apply_dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = max(1, the
    `percentile` quantile of |x0|); clip x0 to [-s, s] and divide by s. x0: [B, ...] float."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    q = torch.quantile(flat, percentile, dim=1).clamp(min=1.0)
    q = q.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, q), -q) / q


def ddim_step(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
    x0: torch.Tensor, eps: torch.Tensor, eta: float, noise: torch.Tensor,
) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12; sigma from eq. 16).

    t, t_prev: int64 [B] (t_prev = -1 means the clean end, alpha_bar = 1); x0, eps, noise: [B, ...].
    """
    ab = alpha_bar_at(s, t, x_t.ndim)
    ab_prev = alpha_bar_at(s, t_prev, x_t.ndim)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()  # eq. 16
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    return ab_prev.sqrt() * x0 + direction + sigma * noise


def ddpm_step(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
    x0: torch.Tensor, noise: torch.Tensor,
) -> torch.Tensor:
    """One ancestral step: a draw from the posterior q(x_{t_prev} | x_t, x0) (DDPM eqs. 6-7),
    with the betas of the respaced chain beta' = 1 - ab_t / ab_prev (Improved DDPM, sec. 4)
    so any subsequence of timesteps works; with every timestep it is exactly DDPM."""
    ab = alpha_bar_at(s, t, x_t.ndim)
    ab_prev = alpha_bar_at(s, t_prev, x_t.ndim)
    alpha = ab / ab_prev
    beta = 1 - alpha
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
    var = beta * (1 - ab_prev) / (1 - ab)  # beta~, DDPM eq. 7; 0 at the last step
    return mean + var.clamp(min=0).sqrt() * noise


def guided_output(
    model: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
    start_context: torch.Tensor, end_context: torch.Tensor, guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): null + w (cond - null).

    Both branches run in one batched forward of 2B; guidance_scale == 1 runs the conditional
    branch alone. The combination is linear, so it is the same in eps, v or x0 space.
    """
    B = x_t.shape[0]
    if guidance_scale == 1.0:
        return model(x_t, t, start_context, end_context, torch.zeros(B, dtype=torch.bool, device=x_t.device))
    cond_drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
    out = model(
        torch.cat([x_t, x_t]), torch.cat([t, t]),
        torch.cat([start_context, start_context]), torch.cat([end_context, end_context]), cond_drop,
    ).float()
    cond, null = out[:B], out[B:]
    return null + guidance_scale * (cond - null)


def _middle_frames(model: torch.nn.Module) -> int:
    """The number of middle frames M the model was built for (unwrapping DDP's `.module`)."""
    inner = getattr(model, "module", model)
    if not hasattr(inner, "middle_frames"):
        raise ValueError("pass middle_frames=...: the model has no `middle_frames` attribute")
    return int(inner.middle_frames)


@torch.no_grad()
def sample_clip(
    model: Callable[..., torch.Tensor],
    s: Schedule,
    start_context: torch.Tensor,
    end_context: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 40,
    eta: float = 0.0,
    guidance_scale: float = 1.8,
    prediction: str = "eps",
    dynamic_threshold: float = 0.0,
    generator: torch.Generator | None = None,
    middle_frames: int | None = None,
    residual: str = "none",
) -> torch.Tensor:
    """Generate the middle between the endpoints; returns [start_context, middle, end_context].

    start_context [B, C, K_start, H, W], end_context [B, C, K_end, H, W] in [-1, 1]. sampler: "ddim" (eta = 0 is
    deterministic given `generator`) or "ddpm" (ancestral, over `steps` respaced timesteps;
    steps = timesteps is the original chain). dynamic_threshold: 0 (off) or the percentile,
    e.g. 0.995; when off, the predicted x0 is clipped to [-1, 1] at every step. middle_frames: M, read
    from `model.middle_frames` when None. residual: as trained ("blend": the chain runs over the
    middle minus the endpoints' linear blend, which is added back to every x0 estimate).
    Returns clip: [B, C, K_start + M + K_end, H, W]; its context frames are bit-identical to the inputs,
    the middle is clamped to [-1, 1]. The model's train/eval mode is left to the caller.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    s_shape, e_shape = start_context.shape, end_context.shape
    if s_shape[:2] != e_shape[:2] or s_shape[3:] != e_shape[3:]:
        raise ValueError(f"start_context {tuple(s_shape)} and end_context {tuple(e_shape)} must agree in every "
                         f"dimension but the frame count")
    M = middle_frames if middle_frames is not None else _middle_frames(model)
    B, C, _, H, W = start_context.shape
    device = start_context.device
    base = residual_base(residual, start_context, end_context, M)
    base = torch.zeros((), device=device) if base is None else base
    x = torch.randn((B, C, M, H, W), generator=generator, device=device)
    ts = sampling_timesteps(s.timesteps, steps)
    for i, t_int in enumerate(ts):
        t = torch.full((B,), t_int, dtype=torch.long, device=device)
        t_prev = torch.full((B,), ts[i + 1] if i + 1 < len(ts) else -1, dtype=torch.long, device=device)
        out = guided_output(model, x, t, start_context, end_context, guidance_scale)
        x0, eps = split_output(s, x, t, out, prediction)
        # Keep x0 in the data range: Imagen's dynamic thresholding when asked, else static
        # clipping to [-1, 1] (ADM's clip_denoised); eps is re-derived to stay consistent.
        # Both act on the frames (x0 + base), not on the residual.
        frames = x0 + base
        x0 = (apply_dynamic_threshold(frames, dynamic_threshold) if dynamic_threshold else frames.clamp(-1, 1)) - base
        eps = eps_from_x0(s, x, t, x0)
        last = i + 1 == len(ts)
        noise = torch.zeros_like(x) if last or (sampler == "ddim" and eta == 0) else torch.randn(
            x.shape, generator=generator, device=device)
        if sampler == "ddim":
            x = ddim_step(s, x, t, t_prev, x0, eps, eta, noise)
        else:
            x = ddpm_step(s, x, t, t_prev, x0, noise)
    middle = (x + base).clamp(-1, 1).to(start_context.dtype)
    return torch.cat([start_context, middle, end_context], dim=2)
