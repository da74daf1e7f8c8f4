"""best.pt (the lowest validation loss), early stopping, and the run folder as a checkpoint argument."""

import json

import pytest
import torch

from conftest import load_tiny, run_cli
from evdm.cli import run_checkpoint

EVERY_STEP = {"train.val_every": 1, "train.ckpt_every": 1, "train.snapshot_every": 1, "train.preview_every": 100}


def scripted_val_losses(monkeypatch, losses: list[float]) -> None:
    """validation_loss returns `losses` in order, one per validation (a fresh run's first at step 0, before
    any training): keep_best sees a known sequence."""
    from evdm.train import loop

    it = iter(losses)
    monkeypatch.setattr(loop, "validation_loss", lambda *args: next(it))


def load(path):
    return torch.load(path, weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[part][k], b[part][k]) for part in ("model", "ema") for k in a[part])


def test_best_pt_holds_the_lowest_validation_loss_and_early_stop_ends_the_run(shard_dir, tmp_path, monkeypatch):
    from evdm.train import train

    scripted_val_losses(monkeypatch, [9.0, 5.0, 3.0, 4.0, 2.0, 6.0, 7.0, 1.0, 0.5])
    out = train(load_tiny(shard_dir, tmp_path / "run", **EVERY_STEP, **{"train.max_steps": 8,
                                                                        "train.early_stop_patience": 2}))
    best, last = load(out / "best.pt"), load(out / "last.pt")
    assert best["step"] == 4 and best["best"] == {"val_loss": 2.0, "step": 4, "stale": 0}
    # Two validations (steps 5 and 6) without a loss below 2.0: the run stops at step 6, saving last.pt.
    assert last["step"] == 6 and last["best"] == {"val_loss": 2.0, "step": 4, "stale": 2}
    assert same_weights(best, load(out / "step_0000004.pt"))
    # best.pt is for sampling: without the optimizer's state (resume reads last.pt, which has it).
    assert best["optimizer"] is None and last["optimizer"] is not None
    assert (out / "best.pt").stat().st_size < 0.7 * (out / "last.pt").stat().st_size
    assert not list(out.glob("*.tmp*"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if r["val_loss"] is not None] == [5.0, 3.0, 4.0, 2.0, 6.0, 7.0]


def test_a_run_that_never_beats_the_untrained_network_keeps_it_and_samples_the_blend(shard_dir, tmp_path,
                                                                                     monkeypatch):
    """Residual "blend" and a zero-initialised output: the untrained network's x0 is the linear blend, so a
    run whose training only raises the validation loss leaves a best.pt that samples the blend."""
    from evdm.denoiser import Denoiser
    from evdm.diffusion import linear_blend
    from evdm.train import train

    scripted_val_losses(monkeypatch, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    out = train(load_tiny(shard_dir, tmp_path / "run", **EVERY_STEP, **{"diffusion.residual": '"blend"',
                                                                        "diffusion.prediction": '"x0"'}))
    best = load(out / "best.pt")
    assert best["step"] == 0 and best["best"] == {"val_loss": 1.0, "step": 0, "stale": 0}
    assert load(out / "last.pt")["best"] == {"val_loss": 1.0, "step": 0, "stale": 6}
    assert not same_weights(best, load(out / "last.pt"))
    denoiser = Denoiser.load(out / "best.pt", torch.device("cpu"))
    start, end = torch.rand(2, 1, 3, 2, 16, 16).mul(2).sub(1).unbind(0)
    clip = denoiser.generate(start, end, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(clip[:, :, 2:-2], linear_blend(start, end, 4), atol=1e-5, rtol=0)


def test_without_patience_the_run_goes_on_and_best_follows_real_losses(shard_dir, tmp_path, monkeypatch):
    from evdm.train import loop, train

    seen = []  # every validation's real loss, in order: step 0 (untrained), then steps 1-6
    real_validation_loss = loop.validation_loss
    monkeypatch.setattr(loop, "validation_loss", lambda *args: seen.append(real_validation_loss(*args)) or seen[-1])
    out = train(load_tiny(shard_dir, tmp_path / "run", **EVERY_STEP))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in records if r["val_loss"] is not None] == seen[1:]
    assert load(out / "last.pt")["step"] == 6 and len(seen) == 7
    best_step = min(range(7), key=seen.__getitem__)
    best = load(out / "best.pt")
    assert best["step"] == best_step and best["best"]["val_loss"] == pytest.approx(seen[best_step], rel=1e-6)
    if best_step:
        assert same_weights(best, load(out / f"step_{best_step:07d}.pt"))


def test_a_resumed_run_keeps_its_best(shard_dir, tmp_path, monkeypatch):
    """The best loss and the validations since come back from last.pt: a resumed run neither forgets its best
    (which would replace best.pt with a worse one) nor restarts the early stop's count."""
    from evdm.train import train

    losses = [9.0, 5.0, 3.0, 4.0, 6.0, 7.0, 8.0]  # the resumed run validates no step 0
    common = {**EVERY_STEP, "train.early_stop_patience": 3}
    scripted_val_losses(monkeypatch, losses[:4])
    train(load_tiny(shard_dir, tmp_path / "run", **common, **{"train.max_steps": 3}))
    scripted_val_losses(monkeypatch, losses[4:])
    out = train(load_tiny(shard_dir, tmp_path / "run", **common, **{"train.max_steps": 8}), resume=True)
    assert load(out / "best.pt")["step"] == 2
    assert load(out / "last.pt")["step"] == 5  # validations 3, 4 and 5 found nothing below 3.0


def test_a_failed_best_write_keeps_the_old_best(shard_dir, tmp_path, monkeypatch):
    from evdm import checkpoint
    from evdm.train import train

    scripted_val_losses(monkeypatch, [9.0, 5.0, 3.0, 2.0])
    real_save = torch.save

    def failing_save(obj, f):
        if obj["step"] == 3 and obj["best"]["step"] == 3 and str(f.name).startswith(str(tmp_path / "run" / "best")):
            f.write(b"half a checkpoint")
            raise OSError("injected write failure")
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        train(load_tiny(shard_dir, tmp_path / "run", **EVERY_STEP, **{"train.max_steps": 3}))
    assert load(tmp_path / "run" / "best.pt")["step"] == 2
    assert not list((tmp_path / "run").glob("best.pt.tmp*"))


def test_run_checkpoint_prefers_best_then_last(tmp_path):
    assert run_checkpoint(str(tmp_path)) == str(tmp_path / "last.pt")
    (tmp_path / "best.pt").write_bytes(b"")
    assert run_checkpoint(str(tmp_path)) == str(tmp_path / "best.pt")
    assert run_checkpoint(str(tmp_path / "last.pt")) == str(tmp_path / "last.pt")


def test_evaluate_and_sample_take_a_run_folder(ckpt, val_shards, tmp_path):
    """A folder holding best.pt and last.pt: both commands use best.pt (here a copy of the tiny checkpoint;
    last.pt is garbage, so reading it would fail)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(ckpt.read_bytes())
    (run / "last.pt").write_bytes(b"not a checkpoint")
    result = run_cli(["-m", "evdm.evaluate", "--ckpt", str(run), "--shards", val_shards, "--num", "2", "--steps", "1",
                      "--json", str(tmp_path / "eval.json")])
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint"] == str(run / "best.pt")
    result = run_cli(["sample.py", "--ckpt", str(run), "--shards", val_shards, "--num", "1", "--steps", "1",
                      "--out_dir", str(tmp_path / "samples")])
    assert result.returncode == 0, result.stderr
    (run / "best.pt").unlink()
    result = run_cli(["sample.py", "--ckpt", str(run), "--shards", val_shards, "--num", "1", "--steps", "1",
                      "--out_dir", str(tmp_path / "samples2")])
    assert result.returncode == 2 and "last.pt" in result.stderr
