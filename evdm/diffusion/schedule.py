"""Noise schedules, the forward process q(x_t | x0), the one eps / x0 / v converter, and the residual.

Pure functions over tensors; randomness is always passed in. Every per-timestep quantity is
computed in float64 and stored float32 (`Schedule`), and read through one broadcast helper
(`extract`). Index convention: t in [0, timesteps), t = 0 is the least noisy step.

The optional residual parameterisation: with `diffusion.residual = "blend"` the model denoises
r = middle - blend(start, end) instead of the middle itself, and sampling adds the blend back. The
blend already explains the static background and slow changes, so a small model spends its capacity
on the motion (the idea of residual video diffusion, Yang et al. 2022, with the cheapest
deterministic predictor). "none" diffuses the middle frames directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

PREDICTIONS = ("eps", "v", "x0")
SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Per-timestep constants, float32 1-D tensors of length `timesteps`."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor  # alpha_bar_t
    alphas_cumprod_prev: torch.Tensor  # alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor  # beta~_t, DDPM eq. 7

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with every tensor on `device`."""
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def linear_betas(timesteps: int) -> torch.Tensor:
    """DDPM linear betas 1e-4 .. 0.02 at 1000 steps, scaled by 1000/timesteps (Improved DDPM, sec. 3)."""
    scale = 1000.0 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (Improved DDPM, eq. 17)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)  # Improved DDPM, clip at 0.999


def make_schedule(kind: str = "linear", timesteps: int = 1000) -> Schedule:
    """Build a `Schedule`: kind in {"linear", "cosine"}, `timesteps` >= 1 training steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    betas = linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # DDPM eq. 7
    f32 = lambda x: x.to(torch.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        sqrt_alphas_cumprod=f32(alphas_cumprod.sqrt()),
        sqrt_one_minus_alphas_cumprod=f32((1.0 - alphas_cumprod).sqrt()),
        posterior_variance=f32(posterior_variance),
    )


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] (ndim dims) to broadcast against a [B, ...] tensor.

    values: [timesteps] float32; t: int64 [B]. Negative t (the step "before" t = 0) reads as
    alpha_bar = 1 only through `alpha_bar_at`, not here.
    """
    return values.to(t.device)[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def alpha_bar_at(s: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """alpha_bar_t broadcastable to ndim dims, with alpha_bar = 1 for t < 0 (the clean end)."""
    ab = extract(s.alphas_cumprod, t.clamp(min=0), ndim)
    return torch.where(t.reshape(ab.shape) < 0, torch.ones_like(ab), ab)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4).

    x0, noise: [B, ...]; t: int64 [B] in [0, timesteps). Returns x_t: [B, ...] in x0's dtype.
    """
    a = extract(s.sqrt_alphas_cumprod, t, x0.ndim)
    sigma = extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return (a * x0 + sigma * noise).to(x0.dtype)


def v_target(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, sec. 4 / app. D)."""
    a = extract(s.sqrt_alphas_cumprod, t, x0.ndim)
    sigma = extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * noise - sigma * x0


def training_target(
    s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: str
) -> torch.Tensor:
    """What the network regresses: the noise ("eps"), v ("v") or the clean sample itself ("x0")."""
    _check_prediction(prediction)
    if prediction == "x0":
        return x0
    return noise if prediction == "eps" else v_target(s, x0, t, noise)


def split_output(
    s: Schedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """THE eps / x0 / v converter: network output -> (x0, eps), both float32 [B, ...].

    t may contain -1 (alpha_bar = 1) only for prediction="v"; samplers never call it there.
    eps: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)           (DDPM eq. 15)
    v:   x0 = sqrt(ab) x_t - sqrt(1-ab) v;  eps = sqrt(1-ab) x_t + sqrt(ab) v   (Salimans & Ho, eq. 12)
    x0:  eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)                 (DDPM eq. 4 solved for eps)
    """
    _check_prediction(prediction)
    x_t, out = x_t.float(), out.float()
    a = extract(s.sqrt_alphas_cumprod, t, x_t.ndim)
    sigma = extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if prediction == "eps":
        return (x_t - sigma * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / sigma
    return a * x_t - sigma * out, sigma * x_t + a * out


def eps_from_x0(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab): inverse of DDPM eq. 4 for the noise."""
    a = extract(s.sqrt_alphas_cumprod, t, x_t.ndim)
    sigma = extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    return (x_t.float() - a * x0) / sigma


def output_from(
    s: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, prediction: str
) -> torch.Tensor:
    """(x0, eps) -> the network output for `prediction`: the inverse of `split_output`."""
    return training_target(s, x0, t, eps, prediction)


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


RESIDUALS = ("none", "blend")


def linear_blend(start_context: torch.Tensor, end_context: torch.Tensor, middle_frames: int) -> torch.Tensor:
    """Pixel-wise linear interpolation in time from the last start frame to the first end frame.

    start_context, end_context: [B, C, K, H, W] -> float32 [B, C, M, H, W]; middle frame i sits at
    weight (i + 1) / (M + 1) between them, as if the frames were evenly spaced.
    """
    M = middle_frames
    w = torch.arange(1, M + 1, dtype=torch.float32, device=start_context.device).div_(M + 1).view(1, 1, M, 1, 1)
    first, last = start_context[:, :, -1:].float(), end_context[:, :, :1].float()
    return torch.lerp(first, last, w)


def residual_base(residual: str, start_context: torch.Tensor, end_context: torch.Tensor,
                  middle_frames: int) -> torch.Tensor | None:
    """What the diffused variable is relative to: the blend, or None (the middle itself)."""
    if residual not in RESIDUALS:
        raise ValueError(f"unknown residual {residual!r}; expected one of {RESIDUALS}")
    return linear_blend(start_context, end_context, middle_frames) if residual == "blend" else None
