"""A compile that fails on the user's machine falls back to eager: one warning line, the run goes on.

An Inductor or Triton failure surfaces at a compiled block's first call (evdm.denoiser.compile_regions).
Here Inductor's entry point raises before it does any work, so Dynamo traces one block, nothing is
compiled, and each test takes seconds on a CPU.
"""

from __future__ import annotations

import pytest
import torch

from conftest import square_batches, tiny_config
from evdm.denoiser import batch_symbolic
from evdm.train import make_trainer, train_step

INJECTED = "injected: no working C++ compiler"
CPU = torch.device("cpu")


@pytest.fixture
def failing_inductor(monkeypatch, tmp_path):
    """Inductor raises RuntimeError(INJECTED) whenever Dynamo hands it a graph."""
    import torch._inductor.compile_fx

    def fail(*args, **kwargs):
        raise RuntimeError(INJECTED)

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fail)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def train_then_sample(trainer, cfg) -> tuple[list[float], torch.Tensor]:
    """Two training steps, then a guided sample from the trained weights: (losses, clips)."""
    batches = square_batches(cfg)
    losses = [train_step(trainer, batches, step).loss.item() for step in range(2)]
    start, _, end = cfg.context.split(trainer.denoiser.to_input(next(batches)))
    clips = trainer.denoiser.eval().generate(start, end, cfg.sample, generator=torch.Generator().manual_seed(0))
    return losses, clips


@pytest.mark.parametrize("first_use", ["train", "sample"])
def test_a_failing_compile_runs_eagerly_with_one_warning_line(failing_inductor, capsys, first_use):
    """The training step and sampling complete, with the eager results and one warning naming the error,
    whether the failure comes at a training step's forward or at a sampling call's."""
    cfg = tiny_config()
    compiled, eager = make_trainer(cfg, CPU), make_trainer(cfg, CPU)
    compiled.denoiser.compile("on")
    if first_use == "sample":
        start, _, end = cfg.context.split(compiled.denoiser.to_input(next(square_batches(cfg))))
        with torch.no_grad():
            compiled.denoiser.eval().generate(start, end, cfg.sample, generator=torch.Generator().manual_seed(0))
        compiled.denoiser.train()
    losses, clips = train_then_sample(compiled, cfg)
    eager_losses, eager_clips = train_then_sample(eager, cfg)
    assert losses == eager_losses and torch.equal(clips, eager_clips)
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: torch.compile failed") and f"RuntimeError: {INJECTED}" in warnings[0]


def test_an_error_of_the_eager_code_too_is_raised_and_not_a_fallback():
    """Bad inputs fail compiled and eager alike: eager's error is raised, nothing falls back."""
    failures = []

    def broken(x):
        raise ValueError("x: expected 5 dims")

    with pytest.raises(ValueError, match="expected 5 dims"):
        batch_symbolic(broken, broken, on_failure=failures.append)(torch.zeros(2, 3))
    assert failures == []


def test_out_of_memory_is_not_retried_eagerly():
    calls = []

    def oom(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        batch_symbolic(oom, calls.append, on_failure=calls.append)(torch.zeros(2, 3))
    assert calls == []
