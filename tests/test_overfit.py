"""End to end on CPU: a tiny model overfits one clip with nonlinear motion, and its DDIM sample of
the middle beats a linear blend of the endpoints."""

import math

import pytest
import torch

from evdm.config import Context, DataConfig, DiffusionConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig
from evdm.train import make_trainer, train_step

SIZE, T, K = 16, 8, 2


def moving_turning_bar(size: int = SIZE, frames: int = T) -> torch.Tensor:
    """[1, 3, T, size, size] in [-1, 1]: an orange 7x3 bar on a dark background whose centre runs
    along a half circle while it turns by 90 degrees, so frame-by-frame motion is not linear."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    color = torch.tensor([1.0, 0.3, -0.5]).reshape(3, 1, 1)
    out = []
    for i in range(frames):
        phase = i / (frames - 1)
        cx = size / 2 + 0.3 * size * math.cos(math.pi * phase)
        cy = size / 2 - 0.3 * size * math.sin(math.pi * phase)
        angle = 0.5 * math.pi * phase
        u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
        v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
        inside = torch.sigmoid(4 * (3.5 - u.abs())) * torch.sigmoid(4 * (1.5 - v.abs()))
        out.append(-0.8 + inside * (color + 0.8))
    return torch.stack(out, dim=1)[None]


def test_fixture_motion_is_nonlinear():
    clip = moving_turning_bar()
    blend = linear_blend(clip)
    assert (blend - clip[:, :, K:-K]).square().mean() > 0.05


def linear_blend(clip: torch.Tensor) -> torch.Tensor:
    """Middle frames as a linear cross-fade between the last start and the first end frame."""
    first, last = clip[:, :, K - 1 : K], clip[:, :, T - K : T - K + 1]
    w = (torch.arange(1, T - 2 * K + 1) / (T - 2 * K + 1)).reshape(1, 1, -1, 1, 1)
    return (1 - w) * first + w * last


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~60 s on an idle 2-core CPU; the shared CI box can be much slower
def test_tiny_model_overfits_one_clip():
    """The real training step (evdm.train.step) on one clip. v prediction on the frames themselves: with
    eps prediction a few hundred steps fit the noise well but not to the ~1e-4 accuracy that
    x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab) needs at high t, so its samples lag. The model without the
    direct input path, as calibrated: with direct_input "both" this v / no-residual / unclipped setting
    fits more slowly (mean loss of the last 25 of 300 steps 0.078 against 0.038 here); the shipped
    recipe (x0, blend) with it is what docs/RECIPES.md measured."""
    cfg = RunConfig(
        data=DataConfig(size=SIZE, T=T, context=Context(K, K)),
        model=ModelConfig(base_channels=16, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,),
                          attn_head_channels=8, direct_input="none"),
        diffusion=DiffusionConfig(schedule="linear", prediction="v", residual="none", cfg_drop_prob=0.0),
        train=TrainConfig(device="cpu", batch_size=4, lr=3e-3, lr_warmup_steps=20, lr_schedule="constant",
                          grad_clip=1e9, ema=False),  # no clipping: the test predates it and needs no help
        sample=SampleConfig(steps=20, guidance_scale=1.0),
    )
    clip = moving_turning_bar()
    u8 = ((clip + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    trainer = make_trainer(cfg, torch.device("cpu"))
    batches = iter(lambda: u8.repeat(4, 1, 1, 1, 1), None)
    losses = [train_step(trainer, batches, step).loss.item() for step in range(300)]
    before, after = sum(losses[:10]) / 10, sum(losses[-50:]) / 50
    assert after < before / 10, (before, after)

    den = trainer.denoiser.eval()
    x = den.to_input(u8)
    out = den.generate(x[:, :, :K], x[:, :, -K:], cfg.sample, generator=torch.Generator().manual_seed(0))
    truth = x[:, :, K:-K]
    err_model = (out[:, :, K:-K] - truth).square().mean()
    err_blend = (linear_blend(x) - truth).square().mean()
    assert err_model < 0.5 * err_blend, (err_model.item(), err_blend.item())
