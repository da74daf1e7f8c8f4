"""Frame metrics on float frames in [0, 1] (PSNR and SSIM with data range 1; `hf_ratio`, which unlike
them does not reward blur) and interpolation baselines (start, end, M) -> middle [B, C, M, H, W]."""

import torch
import torch.nn.functional as F

from evdm.diffusion import linear_blend

PSNR_CAP_DB = 100.0  # identical frames: MSE floored at 1e-10, i.e. 100 dB instead of inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, sec. III-C
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))  # the 5-point discrete Laplacian
HF_FLOOR = 1e-6  # a frame with (almost) no edges: its energy floored so the ratio stays finite
FLICKER_FLOOR = 1e-4  # the truth's mean change floored: a still truth gives a finite ratio


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float."""
    return (x.float() + 1) / 2


def u8_to_unit(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]."""
    return u8.float() / 255.0


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per frame: x, y [..., C, H, W] in [0, 1] -> [...] (10 log10(1 / MSE), capped at 100 dB)."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.float() - y.float()).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1.0 / mse.clamp(min=10 ** (-PSNR_CAP_DB / 10)))


def gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalized 1-D Gaussian of odd `size` centred on the middle tap, float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of x [N, 1, H, W] with the 1-D taps g."""
    return F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per frame (Wang et al. 2004): x, y [..., C, H, W] in [0, 1] -> [...]. Gaussian window 11
    (or the largest odd one that fits), sigma 1.5, 'valid' filtering, averaged per channel, then over channels."""
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    *lead, C, H, W = x.shape
    size = min(SSIM_WINDOW, H, W)
    size -= 1 - size % 2  # odd
    g = gaussian_window(size, SSIM_SIGMA).to(device=x.device, dtype=torch.float64)
    a, b = (v.reshape(-1, 1, H, W).double() for v in (x, y))
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    var_a, var_b = _blur(a * a, g) - mu_a**2, _blur(b * b, g) - mu_b**2
    cov = _blur(a * b, g) - mu_a * mu_b
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(-3, -2, -1)).view(*lead, C).mean(dim=-1).float()


def hf_energy(x: torch.Tensor) -> torch.Tensor:
    """High-frequency energy per frame (mean squared Laplacian): x [..., C, H, W] in [0, 1] -> [...]; blur lowers it."""
    *lead, C, H, W = x.shape
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float64, device=x.device).view(1, 1, 3, 3)
    lap = F.conv2d(x.reshape(-1, 1, H, W).double(), kernel)
    return lap.pow(2).mean(dim=(-3, -2, -1)).view(*lead, C).mean(dim=-1).float()


def hf_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x's high-frequency energy over the truth y's per frame, x, y [..., C, H, W] in [0, 1] -> [...]: below 1
    when x is blurred, above when noisier. Blind to where things are, so it is read beside PSNR."""
    if x.shape != y.shape:
        raise ValueError(f"hf_ratio: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    return hf_energy(x) / hf_energy(y).clamp(min=HF_FLOOR)


def frame_change(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between consecutive frames: x [..., T, C, H, W] in [0, 1] -> [..., T - 1]."""
    return (x[..., 1:, :, :, :].float() - x[..., :-1, :, :, :].float()).abs().mean(dim=(-3, -2, -1))


def flicker(x: torch.Tensor, truth: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """x's mean frame_change over the truth's (all consecutive pairs, or the mask `pairs` [T - 1]): x, truth
    [..., T, C, H, W] in [0, 1] -> [...]. Above 1 when x flickers, below 1 when stiller (a cross-fade)."""
    if x.shape != truth.shape:
        raise ValueError(f"flicker: shapes differ {tuple(x.shape)} vs {tuple(truth.shape)}")
    change, truth_change = frame_change(x), frame_change(truth)
    if pairs is not None:
        change, truth_change = change[..., pairs], truth_change[..., pairs]
    return change.mean(dim=-1) / truth_change.mean(dim=-1).clamp(min=FLICKER_FLOOR)


def middle_frames_metric(metric, pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame metric to middles pred, truth [B, C, M, H, W] -> [B, M]."""
    return metric(pred.transpose(1, 2), truth.transpose(1, 2))


# ---- baselines: (start, end, M) -> middle -------------------------------------------------------


def copy_nearest(start: torch.Tensor, end: torch.Tensor, middle_frames: int) -> torch.Tensor:
    """Each middle frame [B, C, M, H, W] copies the nearer of the last start / first end frame (ties: the start)."""
    M = middle_frames  # frame m is m + 1 after the start, M - m before the end
    return torch.cat([start[:, :, -1:] if m + 1 <= M - m else end[:, :, :1] for m in range(M)], dim=2)


BASELINES = {"copy nearest context": copy_nearest, "linear blend": linear_blend}
