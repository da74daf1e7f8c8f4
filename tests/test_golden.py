"""The golden run: 20 fixed-seed CPU training steps of configs/smoke.toml on moving squares, with the
loss of every step and a checksum of the final weights pinned.

Resume tests compare two runs of today's code with each other, which a change of the maths passes;
this one fails on it (a schedule, a loss weight, the residual, an init, the optimizer, the EMA).
When a change of the maths is intended, say so in the commit and re-pin from the printed values.
Tolerances: one thread against two moved the losses by ~3e-7 relative and the checksums by ~4e-9.
"""

from pathlib import Path

import pytest
import torch

from conftest import square_batches
from evdm.config import load_config
from evdm.train import make_trainer, train_step

LOSSES = [0.016107196, 0.01735862, 0.021722523, 0.01356052, 0.018135037, 0.016262496, 0.019457556,
          0.018699441, 0.011027066, 0.017199175, 0.015425289, 0.020063413, 0.01609055, 0.021053266,
          0.021277107, 0.017533263, 0.014911618, 0.016347211, 0.01517808, 0.017232474]
# sum |w| of the weights, sum w * (index mod 7) (order-sensitive), sum |w| of the EMA weights
CHECKSUMS = (9170.855499554975, 2489.908291606635, 9169.046964197581)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checksums(trainer) -> tuple[float, float, float]:
    weights = torch.cat([p.detach().double().flatten() for p in trainer.denoiser.net.parameters()])
    ema = torch.cat([p.detach().double().flatten() for p in trainer.ema.net.parameters()])
    order = torch.arange(weights.numel(), dtype=torch.float64).remainder(7)
    return weights.abs().sum().item(), (weights * order).sum().item(), ema.abs().sum().item()


def test_twenty_smoke_steps_match_the_pinned_losses_and_weights(one_thread):
    cfg = load_config(Path(__file__).parents[1] / "configs" / "smoke.toml")
    assert cfg.train.max_steps == len(LOSSES)
    trainer = make_trainer(cfg, torch.device("cpu"))
    batches = square_batches(cfg)
    losses = [train_step(trainer, batches, step).loss.item() for step in range(cfg.train.max_steps)]
    assert losses == pytest.approx(LOSSES, rel=2e-5)
    assert checksums(trainer) == pytest.approx(CHECKSUMS, rel=1e-6)
