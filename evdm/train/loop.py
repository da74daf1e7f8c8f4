"""train(cfg): the one training loop, single process or under torchrun (DDP: NCCL on GPU, gloo on CPU).

`_train` reads top to bottom: setup -> resume -> loop -> final save; its stages are functions of a `Run`
(what setup built) and `step`, the one progress counter."""

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from evdm.atomic import atomic_write
from evdm.checkpoint import load_weights, make_payload, save_checkpoint, set_rng_state
from evdm.config import ConfigError, RunConfig, TrainConfig, to_toml
from evdm.data.loader import TrainBatches, load_val_clips, make_train_loader
from evdm.data.shardset import open_checked
from evdm import legacy
from evdm.denoiser import Denoiser, resolve_device
from evdm.preemption import default_signals, stop_on_signals, stop_requested
from evdm.data.resume import Stream, run_stream
from evdm.train.outdir import check_out_dir, clear_run, lock_out_dir
from evdm.train.report import (Dashboard, TensorBoardLog, append_metrics, check_tensorboard, flops_per_sample,
                               peak_tflops, plot_losses, read_metrics, truncate_metrics, utilisation, write_preview)
from evdm.seeds import VAL_SEED, step_seed
from evdm.train.step import StepResult, Trainer, TrainingDiverged, all_finite, lr_at, make_trainer, train_step

COMPILE_CACHE = "compile_cache"  # under out_dir: Inductor's caches, found again by --resume


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when torchrun (or srun) launched this
    process, even for one process, so a one-GPU run takes the same DDP path as a larger one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    with default_signals():  # waiting for the other ranks: a signal must end it, not wait for its timeout
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


@dataclass
class Best:
    """The lowest validation loss yet (in best.pt) and the validations since; saved with every checkpoint."""

    val_loss: float = math.inf
    step: int = 0
    stale: int = 0  # validations in a row without a lower loss


@dataclass
class Run:
    """What setup built for one run."""

    cfg: RunConfig
    rank: int
    world_size: int
    trainer: Trainer
    loader: TrainBatches
    val_u8: torch.Tensor | None  # rank 0 only
    stop_group: dist.ProcessGroup | None  # a CPU group for stop_agreed under NCCL
    flops: float  # per training sample, fwd + bwd
    peak: float | None  # the device's bf16 dense TFLOP/s; None when unknown (CPU)
    stream: Stream
    nonfinite: int = 0  # steps in a row whose gradients were not finite (skipped)
    best: Best = field(default_factory=Best)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Window:
    """Sums over the steps since the last log record, kept on the device: read once per record."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    wait_s: float = 0.0  # waiting for the loader
    start: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss
        self.grad_norm = result.grad_norm
        self.wait_s += result.wait_s
        self.steps += 1


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train from `cfg`; returns out_dir (last.pt, best.pt: the lowest validation loss, metrics.jsonl, loss.png,
    previews/). SIGINT/SIGTERM stop the run after the current step, save last.pt and return (evdm.preemption)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with stop_on_signals(), lock_out_dir(Path(cfg.train.out_dir)) if is_main else contextlib.nullcontext():
        return _train(cfg, resume=resume, overwrite=overwrite)


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool) -> Path:
    tc, out_dir = cfg.train, Path(cfg.train.out_dir)
    ckpt_path = out_dir / "last.pt"
    # --- setup: every check reads only; a refused run leaves out_dir as it was -----------------
    run, step = setup_run(cfg, resume=resume, overwrite=overwrite)
    device = run.trainer.denoiser.device
    window = Window(torch.zeros((), device=device), torch.zeros((), device=device))
    dashboard = Dashboard(tc.max_steps, step, enabled=run.is_main)
    # A resumed run's first new step is step + 1: the record of `step` itself was logged before the save.
    tensorboard = TensorBoardLog(out_dir / "tensorboard", enabled=tc.tensorboard and run.is_main,
                                 purge_step=step + 1 if step else None)
    if dist.is_initialized():
        dashboard.message(f"DistributedDataParallel: {run.world_size} process(es), {dist.get_backend()}")
    if step == 0 and run.is_main:  # best.pt's first candidate: the untrained network (residual "blend": the blend)
        keep_best(run, 0, validation_loss(run.trainer.eval_denoiser, run.val_u8, cfg))
        dashboard.message(f"step 0 (untrained): val_loss {run.best.val_loss:.4g}")
    # --- loop ----------------------------------------------------------------------------------
    try:
        with dashboard, tensorboard:
            while step < tc.max_steps:
                if stop_agreed(stop_requested(), run.world_size, run.stop_group):  # between steps: nothing half done
                    dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")
                    if window.steps:  # the stop step was no log step: its record is written all the same
                        write_record(run, log_record(run, step, lr_at(step - 1, tc), None, window), tensorboard)
                    break
                result = train_step(run.trainer, run.loader, step, rank=run.rank)
                window.add(result)
                step += 1
                check_finite(run, result, step, dashboard)
                # --- validate, preview, log, checkpoint: all functions of `step` -------------------
                val_loss = None
                if is_val_step(step, tc) and run.is_main:
                    val_loss = validation_loss(run.trainer.eval_denoiser, run.val_u8, cfg)
                    keep_best(run, step, val_loss)
                if run.is_main and (step % tc.preview_every == 0 or step == tc.max_steps) and not stop_requested():
                    png = write_preview(run.trainer.eval_denoiser, run.val_u8, cfg, out_dir / "previews", step)[0]
                    tensorboard.image("preview", png, step)
                if step % tc.log_every == 0 or is_val_step(step, tc):
                    write_record(run, record := log_record(run, step, result.lr, val_loss, window), tensorboard)
                    dashboard.update(step, record)
                if step % tc.ckpt_every == 0:
                    save(run, step, ckpt_path)
                if step % tc.snapshot_every == 0:
                    save(run, step, out_dir / f"step_{step:07d}.pt")
                stale = run.is_main and run.best.stale >= tc.early_stop_patience > 0
                if is_val_step(step, tc) and stop_agreed(stale, run.world_size, run.stop_group):
                    dashboard.message(f"early stop at step {step}: no lower validation loss in {run.best.stale} "
                                      f"validations; best.pt holds step {run.best.step} ({run.best.val_loss:.4g})")
                    break
    except KeyboardInterrupt:
        dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")
    # --- final save ----------------------------------------------------------------------------
    save(run, step, ckpt_path)
    dashboard.message(f"saved {ckpt_path} at step {step}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return out_dir


def setup_run(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[Run, int]:
    """Processes, device and the read-only checks; then the trainer (fresh weights, or the checkpoint's
    state), out_dir, compile and DDP, the data. Returns the Run and the step to continue from."""
    tc = cfg.train
    rank, world_size, local_rank = setup_distributed()
    device = resolve_device(tc.device, local_rank)
    if cfg.data.loader == "dali" and device.type != "cuda":
        raise ConfigError("data.loader = 'dali' needs a CUDA device; use data.loader = 'webdataset' on CPU")
    if tc.tensorboard and rank == 0:
        check_tensorboard()
    train_set, val_set = open_checked(cfg)
    ckpt_path = Path(tc.out_dir) / "last.pt"
    ckpt = check_out_dir(cfg, resume=resume, overwrite=overwrite, loud=rank == 0)  # None for a fresh run
    stream = run_stream(ckpt, cfg, train_set, world_size, ckpt_path, loud=rank == 0)
    trainer = make_trainer(cfg, device)
    step = resume_from(trainer, ckpt, ckpt_path) if ckpt is not None else 0
    best = Best(**ckpt["best"]) if ckpt is not None and ckpt["best"] else Best()
    if rank == 0:
        prepare_out_dir(cfg, step, fresh=ckpt is None)
    prepare_denoiser(trainer.denoiser, cfg, local_rank)
    # Stop requests are OR-ed over ranks on a CPU group: no GPU sync for them.
    stop_group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_backend() == "nccl" else None
    loader = make_train_loader(cfg, train_set, rank=rank, world_size=world_size, seed=step_seed(tc.seed, rank, 0),
                               start_batch=stream.start_batch(step))
    run = Run(cfg=cfg, rank=rank, world_size=world_size, trainer=trainer, loader=loader,
              val_u8=load_val_clips(val_set, cfg) if rank == 0 else None, stop_group=stop_group,
              flops=flops_per_sample(cfg), peak=peak_tflops(device, tc.peak_tflops), stream=stream, best=best)
    return run, step


def resume_from(trainer: Trainer, ckpt: dict, ckpt_path: Path) -> int:
    """Load weights, EMA, optimizer, scaler and RNG states from `ckpt`; returns its step."""
    net = trainer.denoiser.net
    load_weights(net, ckpt["model"], ckpt_path)
    if trainer.ema is not None and ckpt.get("ema") is not None:
        load_weights(trainer.ema.net, ckpt["ema"], ckpt_path)
    if ckpt.get("optimizer") is not None:
        shapes = [p.shape for p in net.parameters()]  # the order the optimizer was built with
        trainer.optimizer.load_state_dict(legacy.upgrade_optimizer_state(ckpt["optimizer"], shapes))
    if ckpt.get("scaler"):  # {} from a run without fp16: the scaler starts fresh
        trainer.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt["step"]


def prepare_out_dir(cfg: RunConfig, step: int, *, fresh: bool) -> None:
    """Rank 0, after every check passed: only now does out_dir change."""
    out_dir = Path(cfg.train.out_dir)
    if fresh:
        clear_run(out_dir)  # --overwrite, or the metrics of an earlier run that saved no checkpoint
    else:
        truncate_metrics(out_dir / "metrics.jsonl", step)
    (out_dir / "previews").mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "config.toml", lambda tmp: tmp.write_text(to_toml(cfg)))


def prepare_denoiser(denoiser: Denoiser, cfg: RunConfig, local_rank: int) -> None:
    """After the weights are loaded: compile (caches under out_dir), then DDP when a process group is up."""
    denoiser.compile(cfg.train.compile, cache_dir=Path(cfg.train.out_dir) / COMPILE_CACHE)
    if dist.is_initialized():
        denoiser.wrap_ddp([local_rank] if denoiser.device.type == "cuda" else None)


def check_finite(run: Run, result: StepResult, step: int, dashboard: Dashboard) -> None:
    """Count the steps in a row whose gradients were not finite (skipped, one line each); TrainingDiverged
    at train.max_nonfinite_steps (the ranks agree: the gradients are all-reduced)."""
    if result.finite:
        run.nonfinite = 0
        return
    run.nonfinite += 1
    limit = run.cfg.train.max_nonfinite_steps
    dashboard.message(f"step {step}: the gradients are not finite (loss {float(result.loss):.4g}); step skipped "
                      f"({run.nonfinite} in a row, the run stops at {limit})")
    if run.nonfinite >= limit:
        kept = Path(run.cfg.train.out_dir) / "last.pt"
        raise TrainingDiverged(
            f"training diverged: {limit} steps in a row up to step {step} had non-finite gradients; nothing was "
            f"saved after them ({kept} holds the last checkpoint written, if any); lower train.lr or raise "
            f"train.lr_warmup_steps, then --resume or start over")


def keep_best(run: Run, step: int, val_loss: float | None) -> None:
    """Rank 0: best.pt at a validation loss lower than any before (a stop request's None counts for nothing)."""
    if val_loss is None:
        return
    if val_loss < run.best.val_loss:
        run.best = Best(val_loss, step)
        save(run, step, Path(run.cfg.train.out_dir) / "best.pt", optimizer=False)
    else:
        run.best.stale += 1


def is_val_step(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.val_every == 0 or step == cfg.max_steps


@torch.no_grad()
def validation_loss(denoiser: Denoiser, val_u8: torch.Tensor, cfg: RunConfig) -> float | None:
    """Mean diffusion loss on the fixed val clips (fixed noise and timesteps, no cond drop); None if a stop cut it."""
    gen = torch.Generator(device=denoiser.device).manual_seed(VAL_SEED)
    total = 0.0
    was_training = denoiser.net.training
    denoiser.eval()
    for chunk in val_u8.split(cfg.train.batch_size):
        if stop_requested():
            return None
        loss, _ = denoiser.loss(denoiser.to_input(chunk), gen, drop_conditions=False)
        total += loss.item() * chunk.shape[0]
    denoiser.train(was_training)
    return total / val_u8.shape[0]


def log_record(run: Run, step: int, lr: float, val_loss: float | None, window: Window) -> dict:
    """The metrics.jsonl record of the window ending at `step`, its loss averaged over ranks; resets the window."""
    tc, device = run.cfg.train, run.trainer.denoiser.device
    if run.world_size > 1:
        dist.all_reduce(window.loss_sum)
        window.loss_sum /= run.world_size
    elapsed = time.perf_counter() - window.start
    samples_per_step = tc.batch_size * tc.grad_accum_steps * run.world_size
    samples_per_s = window.steps * samples_per_step / elapsed
    tflops, mfu = utilisation(samples_per_s / run.world_size, run.flops, run.peak)
    # tflops: achieved model TFLOP/s per GPU; mfu: tflops / the GPU's bf16 dense peak, None when unknown (CPU)
    record = {"step": step, "epoch": run.stream.epoch_at(step),
              "loss": window.loss_sum.item() / window.steps,  # the one sync per log interval
              "val_loss": val_loss, "lr": lr, "grad_norm": float(window.grad_norm), "samples_per_s": samples_per_s,
              "tflops": tflops, "mfu": mfu, "data_wait": window.wait_s / elapsed,
              "skipped_shards": run.loader.skipped_shards,
              "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    window.loss_sum.zero_()
    window.steps, window.wait_s, window.start = 0, 0.0, time.perf_counter()
    return record


def write_record(run: Run, record: dict, tensorboard: TensorBoardLog) -> None:
    """Rank 0: metrics.jsonl, loss.png (at validations), TensorBoard scalars (when train.tensorboard)."""
    if not run.is_main:
        return
    out_dir = Path(run.cfg.train.out_dir)
    append_metrics(out_dir / "metrics.jsonl", record)
    if record["val_loss"] is not None:
        plot_losses(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
    tensorboard.scalars(record)


def save(run: Run, step: int, path: Path, *, optimizer: bool = True) -> None:
    """Rank 0 writes the checkpoint of `step` (denoiser.net, never a wrapper; optimizer=False: without the
    optimizer's state, half the size, for best.pt); TrainingDiverged instead of non-finite weights, so the
    checkpoint written before stays."""
    t = run.trainer
    ema = t.ema.net if t.ema is not None else None
    if not all_finite(t.denoiser.net, ema):  # every rank: they all stop
        raise TrainingDiverged(f"training diverged: the weights hold non-finite values at step {step}; {path} was "
                               f"not written (the checkpoint written before stays); lower train.lr and start over "
                               f"or --resume")
    if run.is_main:
        save_checkpoint(path, make_payload(step=step, cfg=run.cfg, model=t.denoiser.net, ema=ema,
                                           optimizer=t.optimizer if optimizer else None, scaler=t.scaler,
                                           stream=run.stream.as_dict(), best=dataclasses.asdict(run.best)))


def stop_agreed(local: bool, world_size: int, group: dist.ProcessGroup | None) -> bool:
    """Any rank's stop request, seen by every rank at the same step (ranks get signals at different moments):
    a one-float all_reduce on a CPU (gloo) group, a network round trip per step, never a device sync."""
    if world_size == 1:
        return local
    flag = torch.tensor([float(local)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
