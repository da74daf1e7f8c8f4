"""Metrics against closed forms, and the interpolation baselines on a truly linear clip."""

import math

import pytest
import torch

from conftest import moving_square
from evdm.config import Context

from evdm.metrics import (
    PSNR_CAP_DB, copy_nearest, hf_energy, hf_ratio, linear_blend, middle_frames_metric, psnr, ssim, to_unit,
    u8_to_unit,
)


def test_psnr_of_a_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # MSE = 0.01 -> 20 dB
    assert torch.allclose(psnr(x, y), torch.tensor([20.0, 20.0]), atol=1e-4)
    y = x.clone()
    y[0, 0, 0, 0] = 1.0  # MSE = 1 / (3 * 64) on frame 0, 0 (capped) on frame 1
    expected = 10 * math.log10(3 * 64)
    assert psnr(x, y).tolist() == pytest.approx([expected, PSNR_CAP_DB], abs=1e-4)


def test_psnr_is_per_frame_over_leading_dims():
    x = torch.rand(2, 4, 1, 16, 16)
    assert psnr(x, x.flip(0)).shape == (2, 4)


@pytest.mark.parametrize("channels,size", [(1, 16), (3, 16), (3, 32), (1, 8)])
def test_ssim_of_identical_frames_is_one(channels, size):
    x = torch.rand(3, channels, size, size)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_of_constant_frames_matches_the_closed_form():
    # Constant frames: sigma = cov = 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.7
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = 0.01**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_decreases_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.0, 0.05, 0.1, 0.3)]
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert values == sorted(values, reverse=True) and values[-1] < 0.8


def test_ssim_averages_channels():
    x = torch.rand(1, 3, 16, 16)
    y = x.clone()
    y[:, 1] = torch.rand(16, 16)
    per_channel = torch.stack([ssim(x[:, c : c + 1], y[:, c : c + 1]) for c in range(3)])
    assert ssim(x, y).item() == pytest.approx(per_channel.mean().item(), rel=1e-6)


def test_range_helpers():
    assert to_unit(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    assert u8_to_unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [0.0, 1.0]


def linear_clip(T=8, C=3, size=16):
    """A clip whose frames are exactly linear in time: f_t = a + t (b - a) / (T - 1), in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(1, C, 1, size, size, generator=g), torch.rand(1, C, 1, size, size, generator=g)
    t = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1)
    return a + t / (T - 1) * (b - a)


def baseline(fn, clip: torch.Tensor, K: int | tuple[int, int]) -> torch.Tensor:
    """A baseline's middle for a whole clip with K observed frames at each end (or (start, end))."""
    start, middle, end = Context(*((K, K) if isinstance(K, int) else K)).split(clip)
    return fn(start, end, middle.shape[2])


@pytest.mark.parametrize("T,K", [(8, 2), (6, 1), (7, 3)])
def test_linear_blend_is_near_perfect_on_a_linear_clip(T, K):
    clip = linear_clip(T)
    truth = clip[:, :, K : T - K]
    blend = middle_frames_metric(psnr, baseline(linear_blend, clip, K), truth)
    assert blend.shape == (1, T - 2 * K)
    assert blend.min().item() > 90
    nearest = middle_frames_metric(psnr, baseline(copy_nearest, clip, K), truth)
    assert nearest.max().item() < 40  # copying is visibly worse on motion


def test_copy_nearest_picks_the_nearer_context_frame():
    T, K = 8, 2
    clip = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1)
    # middle positions 2..5; last start 1, first end 6; ties (none here) go to the start
    assert baseline(copy_nearest, clip, K).flatten().tolist() == [1, 1, 6, 6]
    assert baseline(copy_nearest, torch.arange(7.0).view(1, 1, 7, 1, 1), 2).flatten().tolist() == [1, 1, 5]
    assert baseline(copy_nearest, torch.arange(8.0).view(1, 1, 8, 1, 1), (1, 2)).flatten().tolist() == [0, 0, 0, 6, 6]


def test_linear_blend_weights_follow_frame_positions():
    # T 8, K 2: frames 1 (last start) and 6 (first end) hold 0 and 1; the middle is 0.2 .. 0.8.
    clip = torch.zeros(1, 1, 8, 1, 1)
    clip[:, :, 6:] = 1.0
    assert baseline(linear_blend, clip, 2).flatten().tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    one = torch.tensor([0.0, 0.0, 1.0]).view(1, 1, 3, 1, 1)
    assert baseline(linear_blend, one, 1).flatten().tolist() == [0.5]


def test_ssim_matches_a_brute_force_window_loop():
    """Wang et al.'s definition evaluated window by window in float64 numpy."""
    import numpy as np

    from evdm.metrics import gaussian_window

    rng = np.random.default_rng(0)
    x = rng.random((16, 16))
    y = np.clip(x + 0.1 * rng.standard_normal((16, 16)), 0, 1)
    w = np.outer(*(2 * [gaussian_window(11, 1.5).numpy()]))
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(16 - 10):
        for j in range(16 - 10):
            a, b = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb, cov = (w * a * a).sum() - ma**2, (w * b * b).sum() - mb**2, (w * a * b).sum() - ma * mb
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    got = ssim(torch.tensor(x)[None, None], torch.tensor(y)[None, None]).item()
    assert got == pytest.approx(float(np.mean(values)), abs=1e-6)


def square_middles(n=6, T=8, K=2, size=32):
    """The middles of n moving-square clips (conftest.moving_square): [n, 3, T - 2K, size, size] in [0, 1]."""
    import numpy as np

    rng = np.random.default_rng(4)
    clips = torch.from_numpy(np.stack([moving_square(rng, T, size) for _ in range(n)])).permute(0, 4, 1, 2, 3)
    return u8_to_unit(clips)[:, :, K : T - K]


def test_hf_ratio_marks_the_blurred_posterior_mean_that_psnr_rewards():
    """Where the square is unsure by a pixel, the posterior mean averages its possible places (a blur) and
    a good sample draws one of them (sharp, one pixel off). PSNR prefers the mean; hf_ratio does not."""
    truth = square_middles()
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    posterior_mean = torch.stack([truth.roll(s, dims=(-2, -1)) for s in shifts]).mean(dim=0)
    sample = truth.roll((0, 1), dims=(-2, -1))
    assert middle_frames_metric(psnr, posterior_mean, truth).mean() > middle_frames_metric(psnr, sample, truth).mean() + 1
    blurred, sharp = (middle_frames_metric(hf_ratio, x, truth) for x in (posterior_mean, sample))
    assert blurred.shape == (6, 4) and blurred.max() < 0.5
    assert sharp.sub(1).abs().max() < 0.05 and middle_frames_metric(hf_ratio, truth, truth).eq(1).all()


def test_hf_energy_is_the_mean_squared_laplacian():
    x = torch.zeros(1, 5, 5)
    x[0, 2, 2] = 1.0  # interior Laplacians: -4 at the centre, 1 at its 4 neighbours, 0 at the other 4
    assert hf_energy(x).item() == pytest.approx((16 + 4) / 9)
    flat = torch.full((2, 3, 8, 8), 0.5)
    assert hf_energy(flat).tolist() == [0.0, 0.0] and hf_ratio(flat, flat).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="shapes differ"):
        hf_ratio(flat, flat[..., :4])
