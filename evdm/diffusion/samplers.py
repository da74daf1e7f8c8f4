"""DDPM ancestral and DDIM samplers with classifier-free guidance: pure functions (k-diffusion style).

`sample(x0_fn, s, x_T, ...)` runs a chain over any denoiser given as a function x0_fn(x_t, t, t_int) -> x0
estimate (t_int: the step's timestep as a Python int, for choices made on the host without a sync); evdm.denoiser.Denoiser.generate builds that function (network, guidance, residual,
clipping) and puts the context frames back around the result. The step functions take (x_t, x0, eps),
and eps is re-derived from x0 (`schedule.eps_from_x0`), so no sampler branches on the prediction type.
"""

from __future__ import annotations

from typing import Callable

import torch

from evdm.diffusion.schedule import Schedule, alpha_bar_at, eps_from_x0

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
    output: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
    start_context: torch.Tensor, end_context: torch.Tensor, guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): null + w (cond - null).

    Both branches run in one batched forward of 2B; guidance_scale == 1 runs the conditional
    branch alone. The combination is linear, so it is the same in eps, v or x0 space.
    """
    B = x_t.shape[0]
    if guidance_scale == 1.0:
        return output(x_t, t, start_context, end_context, torch.zeros(B, dtype=torch.bool, device=x_t.device))
    cond_drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
    out = output(
        torch.cat([x_t, x_t]), torch.cat([t, t]),
        torch.cat([start_context, start_context]), torch.cat([end_context, end_context]), cond_drop,
    ).float()
    cond, null = out[:B], out[B:]
    return null + guidance_scale * (cond - null)


def sample(
    x0_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    s: Schedule,
    x_T: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int = 40,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the reverse chain from x_T [B, ...] over `steps` respaced timesteps; returns x_0 (not clamped).

    x0_fn(x_t, t, t_int) -> the x0 estimate at x_t (t: int64 [B], all equal to t_int). sampler: "ddim" (eta = 0 is deterministic)
    or "ddpm" (ancestral; steps = timesteps is the original chain). Fresh noise per step comes from
    `generator`, after whatever drew x_T.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    B, device = x_T.shape[0], x_T.device
    ts = sampling_timesteps(s.timesteps, steps)
    x = x_T
    for i, t_int in enumerate(ts):
        t = torch.full((B,), t_int, dtype=torch.long, device=device)
        t_prev = torch.full((B,), ts[i + 1] if i + 1 < len(ts) else -1, dtype=torch.long, device=device)
        x0 = x0_fn(x, t, t_int)
        eps = eps_from_x0(s, x, t, x0)
        last = i + 1 == len(ts)
        noise = torch.zeros_like(x) if last or (sampler == "ddim" and eta == 0) else torch.randn(
            x.shape, generator=generator, device=device)
        x = ddim_step(s, x, t, t_prev, x0, eps, eta, noise) if sampler == "ddim" else ddpm_step(s, x, t, t_prev, x0, noise)
    return x
