"""Diffusion math, pure functions over tensors (randomness passed in): schedules, q(x_t | x0), the one eps / x0 / v
converter, the "blend" residual (middle - linear blend; Yang et al. 2022), the training loss, DDPM / DDIM sampling
with guidance. t in [0, timesteps), 0 the least noisy. Steps take (x_t, x0, eps): no sampler reads the prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch

SCHEDULES = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Per-timestep constants, float32 1-D tensors of length `timesteps` (computed in float64)."""

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
    return torch.linspace(1e-4 * 1000.0 / timesteps, 0.02 * 1000.0 / timesteps, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (Improved DDPM, eq. 17)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)  # Improved DDPM, clip at 0.999


def make_schedule(kind: str = "linear", timesteps: int = 1000) -> Schedule:
    """Build a `Schedule`: kind in {"linear", "cosine"}, `timesteps` >= 1 training steps (config-checked)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")
    betas = linear_betas(timesteps) if kind == "linear" else cosine_betas(timesteps)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # DDPM eq. 7
    values = (betas, alphas_cumprod, alphas_cumprod_prev, alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt(),
              posterior_variance)  # in the order of Schedule's fields
    return Schedule(*(v.to(torch.float32) for v in values))


def extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] (ndim dims): values [timesteps], t int64 [B] in [0, timesteps)."""
    return values.to(t.device)[t].reshape(t.shape[0], *([1] * (ndim - 1)))


def alpha_bar_at(s: Schedule, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """alpha_bar_t broadcastable to ndim dims, with alpha_bar = 1 for t < 0 (the clean end)."""
    ab = extract(s.alphas_cumprod, t.clamp(min=0), ndim)
    return torch.where(t.reshape(ab.shape) < 0, torch.ones_like(ab), ab)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4): x0, noise [B, ...], in x0's dtype."""
    a, sigma = extract(s.sqrt_alphas_cumprod, t, x0.ndim), extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return (a * x0 + sigma * noise).to(x0.dtype)


def training_target(s: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    prediction: str) -> torch.Tensor:
    """What the network regresses: the noise ("eps"), the clean sample itself ("x0") or
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 ("v"; Salimans & Ho 2022, sec. 4 / app. D)."""
    if prediction in ("eps", "x0"):
        return noise if prediction == "eps" else x0
    a, sigma = extract(s.sqrt_alphas_cumprod, t, x0.ndim), extract(s.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * noise - sigma * x0


def split_output(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
                 prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """THE eps / x0 / v converter: network output -> (x0, eps), both float32 [B, ...].
    eps: x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)           (DDPM eq. 15)
    v:   x0 = sqrt(ab) x_t - sqrt(1-ab) v;  eps = sqrt(1-ab) x_t + sqrt(ab) v   (Salimans & Ho, eq. 12)
    x0:  eps = (x_t - sqrt(ab) x0) / sqrt(1-ab)                 (DDPM eq. 4 solved for eps)
    """
    x_t, out = x_t.float(), out.float()
    a, sigma = extract(s.sqrt_alphas_cumprod, t, x_t.ndim), extract(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if prediction == "eps":
        return (x_t - sigma * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / sigma
    return a * x_t - sigma * out, sigma * x_t + a * out


def linear_blend(start_context: torch.Tensor, end_context: torch.Tensor, middle_frames: int) -> torch.Tensor:
    """Pixel-wise linear interpolation in time from the last start frame to the first end frame, middle
    frame i at weight (i + 1) / (M + 1): start_context, end_context [B, C, K, H, W] -> float32 [B, C, M, H, W]."""
    M = middle_frames
    w = torch.arange(1, M + 1, dtype=torch.float32, device=start_context.device).div_(M + 1).view(1, 1, M, 1, 1)
    first, last = start_context[:, :, -1:].float(), end_context[:, :, :1].float()
    return torch.lerp(first, last, w)


def floor_residual(middle: torch.Tensor, blend: torch.Tensor, floor: float) -> torch.Tensor:
    """middle where it differs from the blend by more than `floor` gray levels (of 255), else the blend."""
    return torch.where((middle - blend).abs() > floor * 2 / 255, middle, blend) if floor > 0 else middle


class Draws(NamedTuple):
    """All the randomness of one training step: t int64 [B], noise float32 [B, C, M, H, W], cond_drop bool [B]."""

    t: torch.Tensor
    noise: torch.Tensor
    cond_drop: torch.Tensor


def draw_training_noise(middle_shape: tuple[int, ...], *, timesteps: int, cfg_drop_prob: float, noise_offset: float,
                        generator: torch.Generator | None, device: torch.device | str) -> Draws:
    """The randomness of one training step from `generator`, in this order: t uniform in [0, timesteps);
    noise [B, C, M, H, W] = N(0, 1) + `noise_offset` times a per-(sample, channel) N(0, 1) (offset noise,
    Guttenberg 2023: lets the model shift a frame's brightness); cond_drop True at `cfg_drop_prob`."""
    B, C = middle_shape[0], middle_shape[1]
    t = torch.randint(0, timesteps, (B,), generator=generator, device=device)
    noise = torch.randn(middle_shape, generator=generator, device=device)
    offset = torch.randn((B, C) + (1,) * (len(middle_shape) - 2), generator=generator, device=device)
    noise = noise + noise_offset * offset
    cond_drop = torch.rand((B,), generator=generator, device=device) < cfg_drop_prob
    return Draws(t, noise, cond_drop)


def diffusion_loss(output: Callable[..., torch.Tensor], s: Schedule, start: torch.Tensor, middle: torch.Tensor,
                   end: torch.Tensor, draws: Draws, *, base: torch.Tensor | None, prediction: str,
                   temporal_loss_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, {"mse", "temporal"} detached), float32 scalars, on start [B, C, K_start, H, W], middle
    [B, C, M, H, W], end [B, C, K_end, H, W] in [-1, 1]; output(x_t, t, cond_drop): the network's fp32 output for
    the middle (base None) or middle - base. loss = MSE(output, target) + temporal_loss_weight * the MSE between
    the frame differences of [last start, predicted x0 middle, first end] and the true clip's, times alpha_bar_t."""
    t, noise, cond_drop = draws
    base = 0.0 if base is None else base
    x0 = middle.float() - base
    x_t = q_sample(s, x0.to(middle.dtype), t, noise.to(middle.dtype))
    out = output(x_t, t, cond_drop)
    target = training_target(s, x0, t, noise.float(), prediction)
    mse = torch.mean((out.float() - target) ** 2)
    x0_pred = split_output(s, x_t, t, out, prediction)[0] + base
    first, last = start[:, :, -1:].float(), end[:, :, :1].float()
    pred_path = torch.cat([first, x0_pred, last], dim=2)
    true_path = torch.cat([first, middle.float(), last], dim=2)
    diff_err = (pred_path.diff(dim=2) - true_path.diff(dim=2)) ** 2
    temporal = torch.mean(extract(s.alphas_cumprod, t, middle.ndim) * diff_err)
    return mse + temporal_loss_weight * temporal, {"mse": mse.detach(), "temporal": temporal.detach()}


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
    `percentile` quantile of |x0|); x0 [B, ...] clipped to [-s, s] and divided by s."""
    q = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=1).clamp(min=1.0)
    q = q.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, q), -q) / q


def ddim_step(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x0: torch.Tensor,
              eps: torch.Tensor, eta: float, noise: torch.Tensor) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12; sigma from eq. 16).
    t, t_prev: int64 [B] (t_prev = -1: the clean end, alpha_bar = 1); x0, eps, noise: [B, ...]."""
    ab, ab_prev = alpha_bar_at(s, t, x_t.ndim), alpha_bar_at(s, t_prev, x_t.ndim)
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()  # eq. 16
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
    return ab_prev.sqrt() * x0 + direction + sigma * noise


def ddpm_step(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x0: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:
    """One ancestral step, a draw from q(x_{t_prev} | x_t, x0) (DDPM eqs. 6-7) with the respaced chain's
    betas 1 - ab_t / ab_prev (Improved DDPM, sec. 4): any subsequence of timesteps works."""
    ab, ab_prev = alpha_bar_at(s, t, x_t.ndim), alpha_bar_at(s, t_prev, x_t.ndim)
    alpha, beta = ab / ab_prev, 1 - ab / ab_prev
    mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x_t
    var = beta * (1 - ab_prev) / (1 - ab)  # beta~, DDPM eq. 7; 0 at the last step
    return mean + var.clamp(min=0).sqrt() * noise


def guided_output(output: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                  cond: tuple[torch.Tensor, ...], guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): null + w (cond - null), the same in eps, v or x0.
    output(x_t, t, cond, cond_drop); cond: tensors [B, ...]. Both branches run as one batch of 2B (w = 1: one)."""
    B = x_t.shape[0]
    if guidance_scale == 1.0:
        return output(x_t, t, cond, torch.zeros(B, dtype=torch.bool, device=x_t.device))
    cond_drop = torch.cat([torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)]).to(x_t.device)
    twice = lambda v: torch.cat([v, v])  # noqa: E731
    out = output(twice(x_t), twice(t), tuple(map(twice, cond)), cond_drop).float()
    cond, null = out[:B], out[B:]
    return null + guidance_scale * (cond - null)


def sample(x0_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], s: Schedule, x_T: torch.Tensor, *,
           sampler: str = "ddim", steps: int = 40, eta: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """The reverse chain from x_T [B, ...] over `steps` respaced timesteps ("ddim" or ancestral "ddpm"; noise
    from `generator`) -> x_0, unclamped. x0_fn(x_t, t: int64 [B], t_int: the same as a Python int) -> x0."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    B, device = x_T.shape[0], x_T.device
    ts = sampling_timesteps(s.timesteps, steps)
    x = x_T
    for t_int, prev in zip(ts, ts[1:] + [-1]):  # -1: the clean end
        t = torch.full((B,), t_int, dtype=torch.long, device=device)
        t_prev = torch.full((B,), prev, dtype=torch.long, device=device)
        x0 = x0_fn(x, t, t_int)
        eps = split_output(s, x, t, x0, "x0")[1]
        noise = torch.zeros_like(x) if prev < 0 or (sampler == "ddim" and eta == 0) else torch.randn(
            x.shape, generator=generator, device=device)
        x = (ddim_step(s, x, t, t_prev, x0, eps, eta, noise) if sampler == "ddim"
             else ddpm_step(s, x, t, t_prev, x0, noise))
    return x
