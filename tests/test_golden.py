"""Golden values: numbers of today's maths pinned, so that a change of the maths fails here.

Resume and equivalence tests compare two runs of today's code with each other, which a change of the
maths passes. These pin two fixed-seed CPU runs:
- training: 20 steps of configs/smoke.toml (at 16 px) on moving squares, the loss of every step and
  checksums of the final weights and EMA (a schedule, a loss weight, the residual, an init, the
  optimizer, the EMA);
- sampling: a fixed-weight tiny model's DDIM-10 output with guidance in a limited interval and the
  blend residual, at a few positions plus its sums, as diffusers pins pipeline slices (the sampler,
  guidance and its interval, static and dynamic thresholding, the residual's add-back).

The runs are float32, as users train: the network computes its norm statistics, attention softmax
and time embedding in fp32 by design, so it cannot run wholly in float64. Another torch may therefore
move these values legitimately (its kernels, reduction orders or init): PINNED_TORCH records the
version they were pinned with, and a failure says whether this torch differs. To re-pin after an
intended change (say so in the commit), run `python tests/test_golden.py --repin` and paste what it
prints over the constants below. Tolerances: one thread against two moved the losses by ~2e-7
relative, the checksums by ~4e-9, the sampled values by under 4e-7 and their sums by ~1e-7 relative.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import square_batches, tiny_config
from evdm.config import SampleConfig, load_config
from evdm.train import make_trainer, train_step

# The pinned values (`python tests/test_golden.py --repin` prints this block): the torch they were pinned
# with; the training losses; sum |w| of the weights, sum w * (index mod 7) (order-sensitive) and sum |w|
# of the EMA weights; per sampling case, the middle frames at SLICE_AT, their sum and their sum of |x|.
PINNED_TORCH = "2.13.0"
LOSSES = [0.0578967184, 0.063440904, 0.0559929162, 0.0374016054, 0.0587610751, 0.050044883, 0.0607289113,
    0.0673901662, 0.0417675003, 0.0419692136, 0.0516848676, 0.069263272, 0.0439926907, 0.0593123995, 0.0861461684,
    0.056455344, 0.053647954, 0.0604469068, 0.0537650287, 0.0510569923]
CHECKSUMS = (9169.52055, 2466.10125, 9167.84487)
SAMPLES = {
    "ddim10_interval_clip": [-0.275775403, -0.223938227, -0.760393858, -0.993613243, -0.549617469, -0.469311595,
        -0.450557202, -0.247159421, -0.79194212, -0.994496703, -0.567991316, -0.447437882, -1346.201, 1959.05203],
    "ddim10_interval_dynamic_eta1": [-0.275903493, -0.208037496, -0.727257073, -0.973272502, -0.543714166,
        -0.407291591, -0.427098989, -0.246187568, -0.71315676, -0.928162575, -0.521129847, -0.429500878,
        -1282.00705, 1870.37058],
}

TRAIN_OVERRIDES = ["data.size=16"]
SLICE_AT = tuple(range(0, 3072, 257))  # 12 positions in the [2, 3, 2, 16, 16] middle, one per frame, all pixels apart
# The sampling cases: DDIM, 10 steps, guidance 2 at t <= 0.5 (timesteps - 1) and the conditional
# branch alone above, the blend residual; static clipping, or dynamic thresholding with eta 1.
SAMPLE_CASES = {
    "ddim10_interval_clip": SampleConfig(steps=10, guidance_scale=2.0, guidance_max_t=0.5),
    "ddim10_interval_dynamic_eta1": SampleConfig(steps=10, guidance_scale=2.0, guidance_max_t=0.5,
                                                 dynamic_threshold=0.9, eta=1.0),
}
REDRAW_STD = 0.07  # the zero-initialised tensors' draw: large enough that thresholding acts


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pin(value: float) -> float:
    """A value as pinned: 9 significant digits (every float32 exactly, a float64 well within tolerance)."""
    return float(f"{value:.9g}")


def golden_training() -> dict:
    """{"LOSSES": [20 losses], "CHECKSUMS": (3 sums)} of the training run."""
    cfg = load_config(Path(__file__).parents[1] / "configs" / "smoke.toml", TRAIN_OVERRIDES)
    trainer = make_trainer(cfg, torch.device("cpu"))
    batches = square_batches(cfg)
    losses = [train_step(trainer, batches, step).loss.item() for step in range(cfg.train.max_steps)]
    weights = torch.cat([p.detach().double().flatten() for p in trainer.denoiser.net.parameters()])
    ema = torch.cat([p.detach().double().flatten() for p in trainer.ema.net.parameters()])
    order = torch.arange(weights.numel(), dtype=torch.float64).remainder(7)
    sums = (weights.abs().sum(), (weights * order).sum(), ema.abs().sum())
    return {"LOSSES": [pin(x) for x in losses], "CHECKSUMS": tuple(pin(x.item()) for x in sums)}


def golden_sampling() -> dict:
    """{"SAMPLES": {case: [the values at SLICE_AT..., sum, sum |x|]}} of each sampling case.

    The model: tiny_config's, built from train.seed by make_trainer, with its zero-initialised tensors
    (output projections, null conditioning) redrawn N(0, REDRAW_STD^2) from a fixed generator, so that
    the conditional and null branches differ and the output is more than the blend.
    """
    cfg = tiny_config(residual="blend", prediction="x0")
    denoiser = make_trainer(cfg, torch.device("cpu")).denoiser
    redraw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in denoiser.net.parameters():
            if not p.any():
                p.normal_(0.0, REDRAW_STD, generator=redraw)
    start, _, end = cfg.context.split(denoiser.to_input(next(square_batches(cfg)))[:2])
    samples = {}
    for name, sample_cfg in SAMPLE_CASES.items():
        clips = denoiser.eval().generate(start, end, sample_cfg, generator=torch.Generator().manual_seed(0))
        middle = cfg.context.split(clips)[1].double()
        values = [*middle.flatten()[list(SLICE_AT)].tolist(), middle.sum().item(), middle.abs().sum().item()]
        samples[name] = [pin(x) for x in values]
    return {"SAMPLES": samples}


def torch_version() -> str:
    return torch.__version__.split("+")[0]


def assert_pinned(got: dict, pinned: dict, tolerance: dict) -> None:
    """Every value of `got` within its tolerance of `pinned`; else one message that says why it may have
    moved and how to re-pin."""
    moved = [name for name, value in got.items() if value != pytest.approx(pinned[name], **tolerance[name])]
    if not moved:
        return
    here = torch_version()
    why = ("a change of the maths" if here == PINNED_TORCH else
           f"a change of the maths, or this torch ({here}): the values were pinned with torch {PINNED_TORCH}, and "
           "another torch may legitimately move them (its kernels, reduction orders, init)")
    lines = [f"{name} moved from the pinned values:\n  got    {got[name]}\n  pinned {pinned[name]}" for name in moved]
    pytest.fail("\n".join(lines) + f"\nCause: {why}. Where that is intended, re-pin and say why in the commit: "
                "`python tests/test_golden.py --repin` prints the block of constants to paste over this file's.")


def test_twenty_smoke_steps_match_the_pinned_losses_and_weights(one_thread):
    assert_pinned(golden_training(), {"LOSSES": LOSSES, "CHECKSUMS": CHECKSUMS},
                  {"LOSSES": dict(rel=2e-5), "CHECKSUMS": dict(rel=1e-6)})


def test_ddim_with_a_guidance_interval_and_the_blend_residual_matches_the_pinned_slices(one_thread):
    samples = golden_sampling()["SAMPLES"]
    assert set(samples) == set(SAMPLES), "SAMPLES must pin every case of SAMPLE_CASES (re-pin)"
    assert_pinned(samples, SAMPLES, {name: dict(abs=1e-4, rel=1e-5) for name in SAMPLES})


def pasteable(constants: dict) -> str:
    """`NAME = value` lines as this file writes them (a dict one key a line), wrapped at 116 columns."""
    def wrap(text: str, indent: str) -> str:
        text = text.replace("'", '"')
        return textwrap.fill(text, width=116, initial_indent=indent, subsequent_indent=indent + "    ",
                             break_long_words=False, break_on_hyphens=False)

    lines = []
    for name, value in constants.items():
        if isinstance(value, dict):
            lines += [f"{name} = {{", *(wrap(f"{k!r}: {v!r},", "    ") for k, v in value.items()), "}"]
        else:
            lines.append(wrap(f"{name} = {value!r}", ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The golden runs; --repin prints new values for this file.")
    parser.add_argument("--repin", action="store_true", help="run both and print the constants to paste")
    args = parser.parse_args(argv)
    if not args.repin:
        parser.error("nothing to do: pass --repin (the tests run under pytest)")
    torch.set_num_threads(1)
    print(pasteable({"PINNED_TORCH": torch_version(), **golden_training(), **golden_sampling()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
