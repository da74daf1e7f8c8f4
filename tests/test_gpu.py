"""The GPU paths on one CUDA device: `python3 -m pytest -m gpu tests/test_gpu.py` (bash bench/gpu_check.sh
runs it first and reports it). Without CUDA every test here is skipped with that reason (tests/conftest.py).

- the compiled bf16 training step (Inductor and Triton, evdm's regional compile) against the eager bf16
  step: finite, losses within LOSS_REL and gradient norms within GRAD_REL;
- the fp16 step with its GradScaler: finite, its first loss within LOSS_REL of the fp32 step's, and it
  trains;
- sampling as sample.py loads it (bf16, compile on) against the same checkpoint eager: the context
  frames exact, the middle within SAMPLE_MEAN / SAMPLE_MAX;
- train() under `torchrun --standalone --nproc_per_node 1` over NCCL: a SIGTERM stops the run through
  the gloo side group's all_reduce (evdm.train.loop.stop_agreed), and last.pt holds the stop step;
- the loader's batches in pinned memory, byte-exact on the GPU;
- the DALI GPU loader's bytes equal the webdataset loader's (skipped, with the reason, without DALI).

A compile that falls back to eager (evdm.denoiser.uncompile) fails these tests: they check that every
block is still compiled and that no warning was printed. The model is conftest's tiny one at one U-Net
level (5 distinct compiled blocks instead of 10), so that the cold compiles fit the check's 90 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (ROOT, TRAIN_SIZE, TRAIN_T, clip_bytes, load_tiny, make_train_shards, moving_square,
                      square_batches, take, tiny_config, train_loader, write_shards)
from evdm.checkpoint import make_payload, save_checkpoint
from evdm.data.dali import dali_available
from evdm.denoiser import REGIONS, Denoiser
from evdm.train import make_trainer, train_step

pytestmark = pytest.mark.gpu

LOSS_REL = 2e-2  # bf16 (8 bits of mantissa): compiled and eager round differently, and fp16 against fp32
GRAD_REL = 5e-2
SAMPLE_MEAN, SAMPLE_MAX = 0.02, 0.25  # |compiled - eager| of bf16 clips in [-1, 1], 10 DDIM steps, guidance 2
SIGNAL_AT = 1  # the step after which the torchrun run sends itself SIGTERM
STOP_RUN_SETS = {"train.device": '"cuda"', "train.compile": '"off"', "train.max_steps": 100,
                 "train.log_every": 1, "train.val_every": 1000, "train.ckpt_every": 1000,
                 "train.snapshot_every": 1000, "train.preview_every": 1000}


def cuda() -> torch.device:
    return torch.device("cuda", 0)


def gpu_config(precision: str = "bf16"):
    """conftest.tiny_config at one U-Net level (temporal attention there), on CUDA, in `precision`, with
    sampling at 10 DDIM steps, guidance 2 at t <= 0.5 (timesteps - 1)."""
    cfg = tiny_config()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, channel_mults=(1,), temporal_attn_levels=(0,)),
        train=dataclasses.replace(cfg.train, device="cuda", precision=precision),
        sample=dataclasses.replace(cfg.sample, steps=10, guidance_scale=2.0, guidance_max_t=0.5))


def randomized(trainer):
    """The trainer with its zero-initialised tensors (output projections, null conditioning) redrawn
    from a fixed generator, so that the network's output is more than zero."""
    redraw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.denoiser.net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=redraw) * 0.1)
    return trainer


def assert_compiled(net: torch.nn.Module, stderr: str) -> None:
    """No block fell back to eager: each still runs its compiled forward, and no warning was printed."""
    assert all("forward" in m.__dict__ for m in net.modules() if isinstance(m, REGIONS)), stderr[-2000:]
    assert "torch.compile failed" not in stderr, stderr[-2000:]


def run_steps(trainer, cfg, steps: int = 3) -> list:
    batches = square_batches(cfg)
    return [train_step(trainer, batches, step) for step in range(steps)]


def test_the_compiled_bf16_training_step_matches_the_eager_one(capfd):
    cfg = gpu_config("bf16")
    eager, compiled = randomized(make_trainer(cfg, cuda())), randomized(make_trainer(cfg, cuda()))
    compiled.denoiser.compile("on")
    want, got = run_steps(eager, cfg), run_steps(compiled, cfg)
    assert_compiled(compiled.denoiser.net, capfd.readouterr().err)
    losses, grads = [r.loss.item() for r in got], [r.grad_norm.item() for r in got]
    assert all(np.isfinite(losses)) and all(np.isfinite(grads)), (losses, grads)
    assert losses == pytest.approx([r.loss.item() for r in want], rel=LOSS_REL)
    assert grads == pytest.approx([r.grad_norm.item() for r in want], rel=GRAD_REL)


def test_the_fp16_step_scales_its_loss_and_trains():
    fp16, fp32 = (randomized(make_trainer(gpu_config(p), cuda())) for p in ("fp16", "fp32"))
    assert fp16.scaler.is_enabled() and not fp32.scaler.is_enabled()
    before = [p.detach().clone() for p in fp16.denoiser.net.parameters()]
    got, want = run_steps(fp16, gpu_config("fp16")), run_steps(fp32, gpu_config("fp32"), steps=1)
    assert all(np.isfinite(r.loss.item()) for r in got)
    assert got[0].loss.item() == pytest.approx(want[0].loss.item(), rel=LOSS_REL)
    # A step whose scaled gradients overflowed is skipped (and the scale halved); the others update.
    assert any(np.isfinite(r.grad_norm.item()) for r in got) and 0 < fp16.scaler.get_scale() < float("inf")
    assert any(not torch.equal(b, p) for b, p in zip(before, fp16.denoiser.net.parameters()))


def test_compiled_bf16_sampling_matches_eager(tmp_path, capfd):
    """Denoiser.load as sample.py calls it, on the same checkpoint: compile on against off, bf16 both."""
    cfg = gpu_config()
    trainer = randomized(make_trainer(cfg, torch.device("cpu")))
    ckpt = tmp_path / "random.pt"
    save_checkpoint(ckpt, make_payload(step=0, cfg=cfg, model=trainer.denoiser.net, ema=trainer.denoiser.net,
                                       optimizer=trainer.optimizer, scaler=trainer.scaler))
    clips = {}
    for mode in ("off", "on"):
        denoiser = Denoiser.load(ckpt, cuda(), precision="bf16", compile=mode)
        stored = denoiser.cfg
        start, _, end = stored.context.split(denoiser.to_input(next(square_batches(stored))))
        clips[mode] = denoiser.generate(start, end, stored.sample,
                                        generator=torch.Generator(device=cuda()).manual_seed(0)).float()
    assert_compiled(denoiser.net, capfd.readouterr().err)
    first, _, last = cfg.context.split(clips["on"])
    assert torch.equal(first, start.float()) and torch.equal(last, end.float())
    diff = (clips["on"] - clips["off"]).abs()
    assert torch.isfinite(clips["on"]).all() and clips["on"].abs().max() <= 1
    assert diff.mean() <= SAMPLE_MEAN and diff.max() <= SAMPLE_MAX, (diff.mean().item(), diff.max().item())


def test_torchrun_over_nccl_stops_through_the_gloo_side_group(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "run"
    make_train_shards(shards)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           __file__, "--stop-run", str(out), str(shards)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads((tmp_path / "stop_calls.json").read_text())
    assert {(c["backend"], c["group"]) for c in calls} == {("nccl", "gloo")}
    assert [c["local"] for c in calls] == [False] * (SIGNAL_AT + 1) + [True]
    assert [c["agreed"] for c in calls] == [c["local"] for c in calls]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == SIGNAL_AT + 1


def stop_run(out: Path, shards: Path) -> None:
    """Under torchrun: train() on conftest's tiny config over NCCL, sending itself SIGTERM after step
    SIGNAL_AT; every stop_agreed call is recorded in stop_calls.json beside `out`."""
    import torch.distributed as dist

    from evdm.train import loop

    calls, real_step, real_agreed = [], loop.train_step, loop.stop_agreed

    def step_then_signal(trainer, batches, step, **kwargs):
        result = real_step(trainer, batches, step, **kwargs)
        if step == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def agreed(local: bool, world_size: int, group) -> bool:
        # With one process stop_agreed answers from `local` alone; a world of 2 sends the flag through
        # the side group's all_reduce, as a run of more ranks does.
        result = real_agreed(local, max(world_size, 2), group)
        calls.append(dict(local=local, agreed=result, backend=dist.get_backend(),
                          group=None if group is None else dist.get_backend(group)))
        return result

    loop.train_step, loop.stop_agreed = step_then_signal, agreed
    loop.train(load_tiny(shards, out, **STOP_RUN_SETS))
    (out.parent / "stop_calls.json").write_text(json.dumps(calls))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_hands_over_pinned_batches_that_reach_the_gpu_intact(tmp_path, num_workers):
    rng = np.random.default_rng(0)
    owner = write_shards(tmp_path, {split: [[moving_square(rng, TRAIN_T, TRAIN_SIZE) for _ in range(6)]
                                            for _ in range(n)] for split, n in (("train", 4), ("val", 1))})
    cfg = load_tiny(tmp_path, tmp_path / "run", **{"data.num_workers": num_workers})
    for batch in take(train_loader(cfg), 4):
        assert batch.is_pinned()
        on_gpu = batch.to(cuda(), non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(on_gpu.cpu(), batch) and set(clip_bytes(batch)) <= set(owner)


@pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable: the DALI GPU loader is unchecked "
                                                 "(pip install 'evdm[dali]')")
def test_the_dali_gpu_loader_yields_the_webdataset_loaders_bytes(tmp_path):
    """Shuffling off: the same clips in the same order, across shard and epoch boundaries (8 batches of
    4 over 3 shards of 5 clips)."""
    rng = np.random.default_rng(0)
    write_shards(tmp_path, {split: [[moving_square(rng, TRAIN_T, TRAIN_SIZE) for _ in range(5)] for _ in range(n)]
                            for split, n in (("train", 3), ("val", 1))}, manifest=False)
    cfg = load_tiny(tmp_path, tmp_path / "run", **{"data.shuffle_buffer": 0, "train.batch_size": 4})
    dali_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, loader="dali"))
    dali = take(train_loader(dali_cfg), 8)
    assert all(b.is_cuda and b.dtype == torch.uint8 for b in dali)
    assert clip_bytes(torch.cat([b.cpu() for b in dali])) == clip_bytes(torch.cat(take(train_loader(cfg), 8)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the torchrun worker of test_torchrun_over_nccl_...")
    parser.add_argument("--stop-run", nargs=2, metavar=("OUT", "SHARDS"), type=Path, required=True)
    stop_run(*parser.parse_args(argv).stop_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
