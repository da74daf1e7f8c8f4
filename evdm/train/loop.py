"""train(cfg): the one training loop. Single process or under torchrun (DDP: NCCL on GPU, gloo on CPU).

`_train` reads top to bottom: setup -> resume -> loop -> final save. Each named step below is a
module-level function over a `Run` (the objects setup built) and `step`, the one progress counter.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from evdm import data
from evdm.atomic import atomic_write
from evdm.checkpoint import load_weights, make_payload, save_checkpoint, set_rng_state
from evdm.config import ConfigError, RunConfig, TrainConfig, to_toml
from evdm.train.dashboard import Dashboard
from evdm.diffusion.loss import diffusion_loss, draw_training_noise
from evdm.diffusion.schedule import Schedule, make_schedule
from evdm.train.ema import ema_decay_at, make_ema, update_ema
from evdm.train.mfu import flops_per_sample, peak_tflops, utilisation
from evdm.models import adapt_conv_weights, adapt_optimizer_state, build_model, to_channels_last
from evdm.pipeline import autocast_dtype, resolve_device, wants_compile
from evdm.preemption import default_signals, stop_on_signals, stop_requested
from evdm.seeds import mix_seed
from evdm.train.outdir import check_out_dir, clear_run, lock_out_dir
from evdm.train.preview import write_preview
from evdm.train.resume import Stream, run_stream
from evdm.train.runlog import Board, append_metrics, check_tensorboard, plot_losses, read_metrics, truncate_metrics

VAL_SEED = 1234  # fixed noise and timesteps for every validation


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to lr * lr_min_ratio at max_steps."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps))
    floor = cfg.lr * cfg.lr_min_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, rank: int, step: int) -> int:
    """Per-step seed from (seed, rank, step), so a resumed run draws the same noise as a straight one."""
    return mix_seed(seed, rank, step) % (2**63)


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; initialises the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    with default_signals():  # waiting for the other ranks: a signal must end it, not wait for its timeout
        dist.init_process_group(backend)
    return dist.get_rank(), world_size, local_rank


def train_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of train.precision on `device`; None is fp32. "auto": bf16 on CUDA, fp32 elsewhere."""
    return torch.float16 if cfg.precision == "fp16" else autocast_dtype(cfg.precision, device)


def amp_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = train_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass
class Run:
    """What setup built for one run: the steps below read it and update its modules and optimizer."""

    cfg: RunConfig
    rank: int
    world_size: int
    device: torch.device
    raw_model: torch.nn.Module  # unwrapped: what checkpoints save
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    stop_group: dist.ProcessGroup | None  # stop requests are OR-ed over ranks on a CPU group (stop_agreed)
    flops: float  # per training sample, fwd + bwd, for the tflops / mfu columns
    peak: float | None  # the device's bf16 dense TFLOP/s; None when unknown (CPU)
    stream: Stream  # what the loader's stream depends on: its start batch, the epoch column, checkpoints
    model: torch.nn.Module | None = None  # raw_model under DDP and torch.compile: set after resume (wrap_model)
    loader: data.TrainBatches | None = None
    val_u8: torch.Tensor | None = None  # rank 0 only

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def eval_model(self) -> torch.nn.Module:
        """Validation and previews use the EMA weights when there are any."""
        return self.ema if self.ema is not None else self.raw_model


@dataclass
class Window:
    """Sums over the steps since the last log record, kept on the device: read once per record."""

    loss_sum: torch.Tensor
    grad_norm: torch.Tensor
    steps: int = 0
    wait_s: float = 0.0  # waiting for the loader
    start: float = field(default_factory=time.perf_counter)


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train from `cfg`; returns the output directory holding last.pt, metrics.jsonl, loss.png, previews/.

    SIGINT/SIGTERM stop the run after the current step, save last.pt and return (evdm.preemption).
    Rank 0 holds out_dir/.lock for the whole run; out_dir checks: evdm.train.outdir.
    """
    is_main = int(os.environ.get("RANK", "0")) == 0
    with stop_on_signals(), lock_out_dir(Path(cfg.train.out_dir)) if is_main else contextlib.nullcontext():
        return _train(cfg, resume=resume, overwrite=overwrite)


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool) -> Path:
    tc, out_dir = cfg.train, Path(cfg.train.out_dir)
    ckpt_path = out_dir / "last.pt"
    # --- setup: every check reads only; a refused run leaves out_dir as it was -----------------
    run, ckpt = setup_run(cfg, resume=resume, overwrite=overwrite)
    # --- resume --------------------------------------------------------------------------------
    step = resume_from(run, ckpt, ckpt_path) if ckpt is not None else 0
    if run.is_main:
        prepare_out_dir(cfg, step, fresh=ckpt is None)
    run.model = wrap_model(run)
    # The stream is a function of (seed, rank, worker, batches consumed): resume continues it, exactly when
    # nothing else it depends on changed (evdm.train.resume).
    run.loader = data.make_train_loader(cfg, rank=run.rank, world_size=run.world_size,
                                        seed=step_seed(tc.seed, run.rank, 0), start_batch=run.stream.start_batch(step))
    run.val_u8 = data.load_val_clips(cfg) if run.is_main else None
    window = Window(torch.zeros((), device=run.device), torch.zeros((), device=run.device))
    dashboard = Dashboard(tc.max_steps, step, enabled=run.is_main)
    # A resumed run's first new step is step + 1: the record of `step` itself was logged before the save.
    board = Board(out_dir / "tensorboard", enabled=tc.tensorboard and run.is_main, purge_step=step + 1 if step else None)
    # --- loop ----------------------------------------------------------------------------------
    try:
        with dashboard, board:
            while step < tc.max_steps:
                if stop_agreed(stop_requested(), run.world_size, run.stop_group):  # between steps: nothing half done
                    dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")
                    if window.steps:  # the stop step was no log step: its record is written all the same
                        write_record(run, log_record(run, step, lr_at(step - 1, tc), None, window), board)
                    break
                lr = train_step(run, step, window)
                step += 1
                # --- validate, preview, log, checkpoint: all functions of `step` -------------------
                val_loss = None
                if is_val_step(step, tc) and run.is_main:
                    val_loss = validation_loss(run.eval_model, run.schedule, run.val_u8, cfg, run.device)
                if run.is_main and (step % tc.preview_every == 0 or step == tc.max_steps) and not stop_requested():
                    png = write_preview(run.eval_model, run.schedule, run.val_u8, cfg, out_dir / "previews", step,
                                        run.device)[0]
                    board.image("preview", png, step)
                if step % tc.log_every == 0 or is_val_step(step, tc):
                    record = log_record(run, step, lr, val_loss, window)
                    write_record(run, record, board)
                    dashboard.update(step, record)
                if step % tc.ckpt_every == 0:
                    save(run, step, ckpt_path)
                if step % tc.snapshot_every == 0:
                    save(run, step, out_dir / f"step_{step:07d}.pt")
    except KeyboardInterrupt:
        dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")
    # --- final save ----------------------------------------------------------------------------
    save(run, step, ckpt_path)
    dashboard.message(f"saved {ckpt_path} at step {step}")
    if run.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir


def setup_run(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[Run, dict | None]:
    """Processes, device, the read-only checks, then model, EMA, optimizer, scaler and schedule (fresh weights).

    Returns the Run and the checkpoint to resume from (on the CPU), None for a fresh run.
    """
    tc = cfg.train
    rank, world_size, local_rank = setup_distributed()
    device = resolve_device(tc.device, local_rank)
    if cfg.data.loader == "dali" and device.type != "cuda":
        raise ConfigError("data.loader = 'dali' needs a CUDA device; use data.loader = 'webdataset' on CPU")
    if tc.tensorboard and rank == 0:
        check_tensorboard()
    data.check_shards(cfg)
    ckpt = check_out_dir(cfg, resume=resume, overwrite=overwrite, loud=rank == 0)  # reads only; None for a fresh run
    stream = run_stream(ckpt, cfg, world_size, Path(tc.out_dir) / "last.pt", loud=rank == 0)  # refuses inexact ones
    # Stop requests are OR-ed over ranks on a CPU group: no GPU sync for them (stop_agreed).
    stop_group = dist.new_group(backend="gloo") if world_size > 1 and dist.get_backend() == "nccl" else None
    torch.manual_seed(tc.seed)
    raw_model = build_model(cfg).to(device)
    if tc.channels_last:
        raw_model = to_channels_last(raw_model)
    ema = make_ema(raw_model) if tc.ema else None
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    # fp16's narrow range needs loss scaling; bf16 has fp32's exponent and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=train_dtype(tc, device) == torch.float16)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)
    run = Run(cfg=cfg, rank=rank, world_size=world_size, device=device, raw_model=raw_model, ema=ema,
              optimizer=optimizer, scaler=scaler, schedule=schedule, stop_group=stop_group,
              flops=flops_per_sample(cfg), peak=peak_tflops(device, tc.peak_tflops),
              stream=stream)
    return run, ckpt


def resume_from(run: Run, ckpt: dict, ckpt_path: Path) -> int:
    """Load weights, EMA, optimizer, scaler and RNG states from `ckpt`; returns its step."""
    # adapt_*: a checkpoint of the other model.spacetime form differs only in conv kernel ranks.
    load_weights(run.raw_model, adapt_conv_weights(ckpt["model"], run.raw_model), ckpt_path)
    if run.ema is not None and ckpt.get("ema") is not None:
        load_weights(run.ema, adapt_conv_weights(ckpt["ema"], run.ema), ckpt_path)
    if ckpt.get("optimizer") is not None:
        run.optimizer.load_state_dict(adapt_optimizer_state(ckpt["optimizer"], run.raw_model))
    if ckpt.get("scaler"):  # {} from a run without fp16: the scaler starts fresh
        run.scaler.load_state_dict(ckpt["scaler"])
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


def wrap_model(run: Run) -> torch.nn.Module:
    """run.raw_model under DDP, then torch.compile: after the weights are loaded; checkpoints save raw_model."""
    model: torch.nn.Module = run.raw_model
    if run.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if wants_compile(run.cfg.train.compile, run.device):
        # fullgraph=True on one process: the denoiser is one graph, and a graph break is an error rather
        # than a silent slowdown. Under DDP, torch's DDPOptimizer splits the graph at gradient-bucket
        # boundaries on purpose (all-reduce overlaps the backward), which fullgraph=True cannot express
        # (pytorch issues 107639, 108966): there the default, fullgraph=False.
        model = torch.compile(model, fullgraph=run.world_size == 1)
    return model


def loss_of(model: torch.nn.Module, schedule: Schedule, x: torch.Tensor, gen: torch.Generator, cfg: RunConfig,
            cfg_drop_prob: float) -> torch.Tensor:
    """The diffusion loss of clips x: [B, C, T, H, W] in [-1, 1], with t, noise and cond drop drawn from `gen`,
    under train.precision's autocast. Training and validation both call it."""
    K = cfg.context
    middle_shape = (x.shape[0], x.shape[1], cfg.middle_frames, *x.shape[3:])
    t, noise, cond_drop = draw_training_noise(
        middle_shape, timesteps=cfg.diffusion.timesteps, cfg_drop_prob=cfg_drop_prob,
        noise_offset=cfg.diffusion.noise_offset, generator=gen, device=x.device,
    )
    with amp_context(cfg.train, x.device):
        loss, _ = diffusion_loss(
            model, schedule, x, t, noise, cond_drop, K=K, prediction=cfg.diffusion.prediction,
            temporal_loss_weight=cfg.diffusion.temporal_loss_weight, residual=cfg.diffusion.residual,
        )
    return loss


def train_step(run: Run, step: int, window: Window) -> float:
    """One optimizer step over train.grad_accum_steps micro-batches, then the EMA update; returns the LR used.

    Each micro-batch's loss is divided by grad_accum_steps, so the summed gradients are those of the
    mean loss over all micro-batches: accumulating N batches of B is one batch of N*B.
    """
    cfg, tc = run.cfg, run.cfg.train
    gen = torch.Generator(device=run.device).manual_seed(step_seed(tc.seed, run.rank, step))
    lr = lr_at(step, tc)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.model.train()
    for micro in range(tc.grad_accum_steps):
        wait_start = time.perf_counter()
        batch_u8 = next(run.loader)
        window.wait_s += time.perf_counter() - wait_start
        x = data.to_model_input(batch_u8, run.device, channels_last=tc.channels_last,
                                hflip_generator=gen if cfg.data.hflip else None)
        # Gradients are all-reduced only on the last micro-step of an accumulation.
        last_micro = micro == tc.grad_accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or run.world_size == 1 else run.model.no_sync()
        with sync:
            loss = loss_of(run.model, run.schedule, x, gen, cfg, cfg.diffusion.cfg_drop_prob)
            run.scaler.scale(loss / tc.grad_accum_steps).backward()
        window.loss_sum += loss.detach().float() / tc.grad_accum_steps
    run.scaler.unscale_(run.optimizer)
    window.grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), tc.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        update_ema(run.ema, run.raw_model, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
    window.steps += 1
    return lr


def is_val_step(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.val_every == 0 or step == cfg.max_steps


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module, s: Schedule, val_u8: torch.Tensor, cfg: RunConfig, device: torch.device
) -> float | None:
    """Mean diffusion loss over the fixed val clips, with fixed noise, timesteps and no cond drop.

    None when a stop request (SIGINT/SIGTERM) cuts it short: the step's record is written without it.
    """
    gen = torch.Generator(device=device).manual_seed(VAL_SEED)
    total, count = 0.0, 0
    for chunk in val_u8.split(cfg.train.batch_size):
        if stop_requested():
            return None
        x = data.to_model_input(chunk, device, channels_last=cfg.train.channels_last)
        total += loss_of(model, s, x, gen, cfg, cfg_drop_prob=0.0).float().item() * x.shape[0]
        count += x.shape[0]
    return total / count


def log_record(run: Run, step: int, lr: float, val_loss: float | None, window: Window) -> dict:
    """The metrics.jsonl record of the window ending at `step` (all ranks: the loss is averaged over them);
    resets the window."""
    tc = run.cfg.train
    if run.world_size > 1:
        dist.all_reduce(window.loss_sum)
        window.loss_sum /= run.world_size
    elapsed = time.perf_counter() - window.start
    samples_per_step = tc.batch_size * tc.grad_accum_steps * run.world_size
    samples_per_s = window.steps * samples_per_step / elapsed
    tflops, mfu = utilisation(samples_per_s / run.world_size, run.flops, run.peak)
    record = {
        "step": step,
        "epoch": run.stream.epoch_at(step),
        "loss": window.loss_sum.item() / window.steps,  # the one sync per log interval
        "val_loss": val_loss,
        "lr": lr,
        "grad_norm": float(window.grad_norm),
        "samples_per_s": samples_per_s,
        "tflops": tflops,  # achieved model TFLOP/s per GPU
        "mfu": mfu,  # tflops / the GPU's bf16 dense peak; None when unknown (CPU)
        "data_wait": window.wait_s / elapsed,
        "skipped_shards": run.loader.skipped_shards,
        "gpu_mem_gb": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None,
    }
    window.loss_sum.zero_()
    window.steps, window.wait_s, window.start = 0, 0.0, time.perf_counter()
    return record


def write_record(run: Run, record: dict, board: Board) -> None:
    """Rank 0: metrics.jsonl, loss.png (at validations), TensorBoard scalars (when train.tensorboard)."""
    if not run.is_main:
        return
    out_dir = Path(run.cfg.train.out_dir)
    append_metrics(out_dir / "metrics.jsonl", record)
    if record["val_loss"] is not None:
        plot_losses(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
    board.scalars(record)


def save(run: Run, step: int, path: Path) -> None:
    """Rank 0 writes the checkpoint of `step` (raw_model: never the DDP or compiled wrapper's keys)."""
    if run.is_main:
        save_checkpoint(path, make_payload(step=step, cfg=run.cfg, model=run.raw_model, ema=run.ema,
                                           optimizer=run.optimizer, scaler=run.scaler, stream=run.stream.as_dict()))


def stop_agreed(local: bool, world_size: int, group: dist.ProcessGroup | None) -> bool:
    """Any rank's stop request, seen by every rank at the same step (ranks get signals at different moments).

    A one-float all_reduce on a CPU (gloo) group: a network round trip per step, never a device sync.
    """
    if world_size == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
