"""End-to-end training runs on tiny shards made here: artifacts, resume equivalence, errors, DDP (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TRAIN_SIZE, TRAIN_T, load_tiny, make_train_shards, run_cli, set_args, tiny_overrides
from evdm.config import ConfigError, load_config
from evdm.train.report import read_metrics

T, SIZE = TRAIN_T, TRAIN_SIZE


def test_smoke_trains_end_to_end_and_writes_artifacts(shard_dir, tmp_path):
    from evdm.train import train

    out = train(load_tiny(shard_dir, tmp_path / "run"))
    names = {p.name for p in out.iterdir()}
    assert {"last.pt", "step_0000006.pt", "config.toml", "metrics.jsonl", "loss.png", "previews"} <= names
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    # 4 train shards x 8 clips, batch 2: one epoch every 16 steps.
    assert [r["epoch"] for r in records] == [2 / 16, 3 / 16, 4 / 16, 6 / 16]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and 0 <= r["data_wait"] <= 1 for r in records)
    assert [r["step"] for r in records if r["val_loss"] is not None] == [3, 6]
    assert list((out / "previews").glob("*.png")) and list((out / "previews").glob("*.mp4"))
    # MFU columns: counted FLOPs times samples/s; no known peak on a CPU, so mfu is null.
    assert all(r["tflops"] > 0 and r["mfu"] is None for r in records)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 6 and not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert load_config(out / "config.toml") == load_tiny(shard_dir, tmp_path / "run")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, monkeypatch, workers):
    """Varied clips, shuffled and flipped: 12 clips in 2 shards are 6 steps a pass, so a resume at step
    5 lands mid-pass; with workers, 3 batches per ticket, so it also lands mid-ticket (batch 5 is ticket
    1's third). Straight 10 steps and 5 + resume to 10 must agree bit for bit: model, EMA and data."""
    from evdm.train import train

    monkeypatch.setattr("evdm.data.loader._CHUNK_BYTES", 3 * 2 * T * SIZE * SIZE * 3)
    shards = tmp_path / "shards"
    shards.mkdir()
    make_train_shards(shards, train_shards=2, per_shard=6)
    # A constant LR after warm-up: a 5-step run's cosine would decay over 5 steps, not 10.
    common = {"train.max_steps": 10, "train.val_every": 100, "train.ckpt_every": 100, "train.snapshot_every": 100,
              "train.lr_schedule": '"constant"', "data.num_workers": workers, "data.shuffle_buffer": 5,
              "data.hflip": "true"}
    straight = train(load_tiny(shards, tmp_path / "a", **common))
    train(load_tiny(shards, tmp_path / "b", **{**common, "train.max_steps": 5}))
    resumed = train(load_tiny(shards, tmp_path / "b", **common), resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}.{name} differs after resume"
    # The same logged losses where both runs' log windows are whole steps 7-8 and 9-10.
    loss = {p: {r["step"]: r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines())}
            for p in (straight, resumed)}
    assert [loss[straight][s] for s in (8, 10)] == [loss[resumed][s] for s in (8, 10)]


def test_resume_that_restarts_the_stream_would_differ(tmp_path):
    """The fixture above is sensitive: a resume that starts the stream over (as before issue 12) changes the weights."""
    from evdm.train import train

    shards = tmp_path / "shards"
    shards.mkdir()
    make_train_shards(shards, train_shards=2, per_shard=6)
    common = {"train.max_steps": 6, "train.val_every": 100, "train.ckpt_every": 100, "train.snapshot_every": 100,
              "train.lr_schedule": '"constant"', "data.shuffle_buffer": 5}
    straight = train(load_tiny(shards, tmp_path / "a", **common))
    train(load_tiny(shards, tmp_path / "b", **{**common, "train.max_steps": 3}))
    import evdm.train.loop as loop

    make = loop.make_train_loader
    restarted = lambda cfg, train_set, **kw: make(cfg, train_set, **{**kw, "start_batch": 0})  # noqa: E731
    with pytest.MonkeyPatch.context() as m:
        m.setattr(loop, "make_train_loader", restarted)
        resumed = train(load_tiny(shards, tmp_path / "b", **common), resume=True)
    a = torch.load(straight / "last.pt", weights_only=True)["model"]
    b = torch.load(resumed / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_clip_shape_mismatch_is_a_clear_error(shard_dir, tmp_path):
    args = set_args(tiny_overrides(shard_dir, tmp_path / "x", **{"data.size": 32}))
    proc = run_cli(["train.py", "configs/smoke.toml", *args])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "manifest.json" in proc.stderr and "32" in proc.stderr and "16" in proc.stderr


def test_resume_without_checkpoint_is_a_clear_error(shard_dir, tmp_path):
    from evdm.train import train

    with pytest.raises(ConfigError, match="no checkpoint"):
        train(load_tiny(shard_dir, tmp_path / "empty"), resume=True)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(shard_dir, tmp_path):
    out = tmp_path / "run"
    args = set_args(tiny_overrides(shard_dir, out, **{"train.max_steps": 100000, "train.val_every": 100000,
                                                       "train.log_every": 1, "train.ckpt_every": 100000}))
    proc = subprocess.Popen([sys.executable, "train.py", "configs/smoke.toml", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] >= 2
    assert "interrupted" in stdout


def test_two_process_ddp_with_gloo(shard_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                    "train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out))], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # rank 0 alone writes logs
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 6
    # Two ranks of batch 2 each: the reported throughput counts both.
    assert all(r["samples_per_s"] > 0 for r in records)


def test_ddp_copies_no_gradient_into_its_buckets(shard_dir, tmp_path):
    """smoke.toml's own model and batch under two gloo ranks: the 1x1 kernels' gradients come with the
    channels-last strides of their parameters, the bucket views' (no "Grad strides do not match bucket
    view strides" warning, which means a gradient copy per step)."""
    overrides = [f"data.train_shards={shard_dir}/train-*.tar", f"data.val_shards={shard_dir}/val-*.tar",
                 f"data.size={TRAIN_SIZE}", f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.val_every=100", "train.preview_every=100"]
    proc = run_cli(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
                    "train.py", "configs/smoke.toml", *set_args(overrides)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in proc.stderr


def test_torchrun_with_one_process_runs_the_ddp_path(shard_dir, tmp_path):
    """`torchrun --nproc_per_node 1`: the process group (gloo on a CPU; NCCL on a GPU) and DDP, as any
    larger run, so a one-GPU machine exercises the distributed path."""
    out = tmp_path / "one"
    proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train.py",
                    "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out, **{"train.max_steps": 2}))],
                   timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DistributedDataParallel: 1 process(es), gloo" in proc.stdout
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    plain = run_cli(["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, tmp_path / "plain",
                                                                                **{"train.max_steps": 1}))], timeout=240)
    assert plain.returncode == 0 and "DistributedDataParallel" not in plain.stdout


def test_previews_follow_preview_every_and_survive_a_missing_ffmpeg(shard_dir, tmp_path, monkeypatch):
    """A broken ffmpeg costs the MP4s only (one warning); PNG strips land every preview_every steps,
    and mfu follows train.peak_tflops."""
    from evdm import ffmpeg
    from evdm.train import train

    monkeypatch.setenv("EVDM_FFMPEG", str(tmp_path / "no-such-ffmpeg"))
    ffmpeg.ffmpeg_exe.cache_clear()
    monkeypatch.setattr("evdm.visualize._video_failures", set())
    try:
        with pytest.warns(UserWarning, match="skipping MP4") as caught:
            out = train(load_tiny(shard_dir, tmp_path / "run", **{"train.preview_every": 4, "train.peak_tflops": 2.0}))
    finally:
        ffmpeg.ffmpeg_exe.cache_clear()
    assert sum("skipping MP4" in str(w.message) for w in caught) == 1
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_0000004.png", "step_0000006.png"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] == pytest.approx(r["tflops"] / 2.0) for r in records)


def _same_draw_for_every_sample(middle_shape, *, timesteps, cfg_drop_prob, noise_offset, generator, device):
    """draw_training_noise with one (t, noise) for all samples and no cond drop: a batch's draws then do
    not depend on how it is split into micro-batches."""
    B, rest = middle_shape[0], middle_shape[1:]
    noise = torch.randn(1, *rest, generator=torch.Generator().manual_seed(5)).expand(B, *rest).to(device)
    return torch.full((B,), timesteps // 3, device=device), noise, torch.zeros(B, dtype=torch.bool, device=device)


def test_grad_accumulation_equals_one_big_batch(shard_dir, tmp_path, monkeypatch):
    """Two micro-batches of 2 give the loss, gradient norm and weights of one batch of 4: the loss is
    divided by grad_accum_steps, so the summed gradients are those of the mean over 4 clips. The same
    4 clips feed both (no shuffle buffer), with the same noise (patched draws)."""
    from evdm.train import train

    monkeypatch.setattr("evdm.denoiser.draw_training_noise", _same_draw_for_every_sample)
    # eps prediction: with the default x0 + blend recipe some output-bias gradients are ~0 at the start,
    # where Adam's update (m / sqrt(v)) turns rounding-level differences into +-lr steps.
    common = {"train.max_steps": 2, "train.log_every": 1, "train.val_every": 100, "train.preview_every": 100,
              "train.lr_schedule": '"constant"', "data.shuffle_buffer": 0, "diffusion.prediction": '"eps"',
              "diffusion.residual": '"none"'}
    big = train(load_tiny(shard_dir, tmp_path / "big", **common, **{"train.batch_size": 4}))
    accum = train(load_tiny(shard_dir, tmp_path / "accum", **common,
                            **{"train.batch_size": 2, "train.grad_accum_steps": 2}))
    logs = [read_metrics(out / "metrics.jsonl") for out in (big, accum)]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in logs[0]] == pytest.approx([r[key] for r in logs[1]], rel=1e-5), key
    a, b = (torch.load(out / "last.pt", weights_only=True)["model"] for out in (big, accum))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fp16_trains_with_a_grad_scaler_that_resumes(shard_dir, tmp_path):
    """train.precision = "fp16": autocast fp16 (CPU autocast supports it) with a GradScaler, whose state is
    saved and restored: 2 + 1 resumed steps without an overflow leave its growth tracker at 3, not 1."""
    from evdm.train import train

    fp16 = {"train.precision": '"fp16"', "train.max_steps": 2, "train.log_every": 1, "train.preview_every": 100}
    out = train(load_tiny(shard_dir, tmp_path / "run", **fp16))
    scaler = torch.load(out / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] == 2.0**16 and scaler["_growth_tracker"] == 2
    train(load_tiny(shard_dir, tmp_path / "run", **{**fp16, "train.max_steps": 3}), resume=True)
    assert torch.load(out / "last.pt", weights_only=True)["scaler"]["_growth_tracker"] == 3
    assert all(np.isfinite(r["loss"]) for r in read_metrics(out / "metrics.jsonl"))


@pytest.mark.slow
def test_compiled_training_keeps_its_caches_in_the_run(shard_dir, tmp_path):
    """train.compile = "on" on a CPU, Inductor, the smallest model, in a process whose environment is a
    user's (no TORCHINDUCTOR_CACHE_DIR): every repeated block compiles with fullgraph=True (a graph
    break fails the run), the checkpoint holds the plain keys, and Inductor's caches are in
    out_dir/compile_cache, where a resumed run finds them, not in the machine's shared default."""
    overrides = tiny_overrides(shard_dir, tmp_path / "run", **{
        "train.compile": '"on"', "train.max_steps": 1, "train.log_every": 1, "train.val_every": 100,
        "train.preview_every": 100, "train.ema": "false", "model.base_channels": 4, "model.attn_head_channels": 4,
        "model.channel_mults": "[1]", "model.temporal_attn_levels": "[0]"})
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    proc = subprocess.run([sys.executable, "train.py", "configs/smoke.toml", *set_args(overrides)], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: torch.compile failed" not in proc.stderr  # no fallback to eager (torch may warn of its own)
    assert any((tmp_path / "run" / "compile_cache").rglob("*.py")), "Inductor's generated code is not in the run"
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and not any("_orig_mod" in k for k in ckpt["model"])


def test_a_step_with_non_finite_gradients_changes_no_weight(monkeypatch):
    """An injected NaN loss: the step reports it, and neither the weights, the EMA nor AdamW's moments move."""
    from conftest import square_batches, tiny_config
    from evdm.train import make_trainer, train_step

    cfg = tiny_config()
    trainer = make_trainer(cfg, torch.device("cpu"))
    batches = square_batches(cfg)
    assert train_step(trainer, batches, 0).finite
    before = [t.clone() for t in (*trainer.denoiser.net.parameters(), *trainer.ema.net.parameters())]
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    real_loss = trainer.denoiser.loss
    monkeypatch.setattr(trainer.denoiser, "loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    result = train_step(trainer, batches, 1)
    assert not result.finite and not torch.isfinite(result.grad_norm)
    after = [*trainer.denoiser.net.parameters(), *trainer.ema.net.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(v, trainer.optimizer.state_dict()["state"][0][k]) for k, v in moments.items())


def test_a_diverged_run_stops_with_an_error_and_keeps_finite_checkpoints(shard_dir, tmp_path):
    """lr 1e6: the loss turns NaN within a few steps. The run skips those steps, stops after
    train.max_nonfinite_steps of them in a row with one error line and exit 1, and every checkpoint
    it left is finite."""
    out = tmp_path / "run"
    args = set_args(tiny_overrides(shard_dir, out, **{
        "train.lr": 1e6, "train.lr_warmup_steps": 1, "train.max_steps": 30, "train.ckpt_every": 2,
        "train.snapshot_every": 2, "train.max_nonfinite_steps": 3, "train.val_every": 100, "train.preview_every": 100}))
    proc = run_cli(["train.py", "configs/smoke.toml", *args], timeout=240)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: 3 steps in a row" in errors[0], proc.stderr[-2000:]
    assert "step skipped" in proc.stdout + proc.stderr
    saved = sorted(out.glob("*.pt"))
    assert saved  # the steps before the divergence were saved
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values()), path.name


def test_compile_caches_go_to_the_run_unless_the_user_chose(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from evdm.denoiser import CACHE_ENV, cache_in

    run = (tmp_path / "run" / "compile_cache").resolve()
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_in(tmp_path / "run" / "compile_cache") == run
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # set by importing torch._dynamo, not by the user
    assert cache_in(tmp_path / "run" / "compile_cache") == run
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_in(tmp_path / "other") == tmp_path / "mine"


def test_tensorboard_logs_the_metrics_and_previews(shard_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from evdm.train import train

    out = train(load_tiny(shard_dir, tmp_path / "run", **{"train.tensorboard": "true", "train.preview_every": 4}))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    records = read_metrics(out / "metrics.jsonl")
    numbers = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "val_loss", "lr", "grad_norm", "samples_per_s", "tflops", "data_wait"} <= numbers
    assert set(events.Tags()["scalars"]) == numbers
    for key in numbers:
        logged = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars(key)] == logged, key
    assert [e.step for e in events.Images("preview")] == [4, 6]


def test_tensorboard_missing_is_one_line(shard_dir, tmp_path, monkeypatch):
    from evdm.train import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    with pytest.raises(ConfigError, match=r"train.tensorboard = true needs the tensorboard package: pip install"):
        train(load_tiny(shard_dir, tmp_path / "run", **{"train.tensorboard": "true"}))
    assert not (tmp_path / "run").exists()
