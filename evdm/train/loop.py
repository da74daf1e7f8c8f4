"""train(cfg): the one training loop. Single process or under torchrun (DDP: NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from evdm import data
from evdm.checkpoint import load_weights, make_payload, save_checkpoint, set_rng_state
from evdm.config import ConfigError, RunConfig, TrainConfig, to_toml
from evdm.train.dashboard import Dashboard
from evdm.diffusion.loss import diffusion_loss, draw_training_noise
from evdm.diffusion.schedule import Schedule, make_schedule
from evdm.train.ema import ema_decay_at, make_ema, update_ema
from evdm.train.mfu import flops_per_sample, peak_tflops, utilisation
from evdm.models import adapt_conv_weights, adapt_optimizer_state, build_model, to_channels_last
from evdm.preemption import default_signals, stop_on_signals, stop_requested
from evdm.train.outdir import check_out_dir, clear_run, lock_out_dir
from evdm.train.preview import write_preview
from evdm.train.runlog import append_metrics, plot_losses, read_metrics, truncate_metrics

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
    from evdm.seeds import mix_seed  # hoist to the import block when merging issue 13

    return mix_seed(seed, rank, step) % (2**63)


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {name!r} but CUDA is not available on this machine")
    return torch.device(name)


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


def amp_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    use = cfg.amp and (device.type == "cuda" or cfg.amp_on_cpu)
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype, enabled=use)


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
        K = cfg.context
        middle_shape = (x.shape[0], x.shape[1], cfg.middle_frames, *x.shape[3:])
        t, noise, cond_drop = draw_training_noise(
            middle_shape, timesteps=cfg.diffusion.timesteps, cfg_drop_prob=0.0,
            noise_offset=cfg.diffusion.noise_offset, generator=gen, device=device,
        )
        with amp_context(cfg.train, device):
            loss, _ = diffusion_loss(
                model, s, x, t, noise, cond_drop, K=K, prediction=cfg.diffusion.prediction,
                temporal_loss_weight=cfg.diffusion.temporal_loss_weight, residual=cfg.diffusion.residual,
            )
        total += loss.float().item() * x.shape[0]
        count += x.shape[0]
    return total / count


def stop_agreed(local: bool, world_size: int, group: dist.ProcessGroup | None) -> bool:
    """Any rank's stop request, seen by every rank at the same step (ranks get signals at different moments).

    A one-float all_reduce on a CPU (gloo) group: a network round trip per step, never a device sync.
    """
    if world_size == 1:
        return local
    flag = torch.tensor([1.0 if local else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Train from `cfg`; returns the output directory holding last.pt, metrics.jsonl, loss.png, previews/.

    SIGINT/SIGTERM stop the run after the current step, save last.pt and return (evdm.preemption).
    Rank 0 holds out_dir/.lock for the whole run; out_dir checks: evdm.train.outdir.
    """
    is_main = int(os.environ.get("RANK", "0")) == 0
    with stop_on_signals(), lock_out_dir(Path(cfg.train.out_dir)) if is_main else contextlib.nullcontext():
        return _train(cfg, resume=resume, overwrite=overwrite)


def _train(cfg: RunConfig, *, resume: bool, overwrite: bool) -> Path:
    # --- setup ---------------------------------------------------------------------------------
    tc = cfg.train
    rank, world_size, local_rank = setup_distributed()
    is_main = rank == 0
    device = resolve_device(tc.device, local_rank)
    if cfg.data.loader == "dali" and device.type != "cuda":
        raise ConfigError("data.loader = 'dali' needs a CUDA device; use data.loader = 'webdataset' on CPU")
    data.check_shards(cfg)
    out_dir = Path(tc.out_dir)
    ckpt_path = out_dir / "last.pt"
    ckpt = check_out_dir(cfg, resume=resume, overwrite=overwrite)  # reads only; None for a fresh run
    # Stop requests are OR-ed over ranks on a CPU group: no GPU sync for them (stop_agreed).
    stop_group = dist.new_group(backend="gloo") if world_size > 1 and dist.get_backend() == "nccl" else None
    torch.manual_seed(tc.seed)
    raw_model = build_model(cfg).to(device)
    if tc.channels_last:
        raw_model = to_channels_last(raw_model)
    ema = make_ema(raw_model) if tc.ema else None
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
    use_fp16_scaler = tc.amp and tc.amp_dtype == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16_scaler)
    schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)

    # --- resume --------------------------------------------------------------------------------
    step = 0
    if ckpt is not None:
        # adapt_*: a checkpoint of the other model.spacetime form differs only in conv kernel ranks.
        load_weights(raw_model, adapt_conv_weights(ckpt["model"], raw_model), ckpt_path)
        if ema is not None and ckpt.get("ema") is not None:
            load_weights(ema, adapt_conv_weights(ckpt["ema"], ema), ckpt_path)
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(adapt_optimizer_state(ckpt["optimizer"], raw_model))
        if ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    # Every check passed: only now does out_dir change.
    if is_main:
        if ckpt is None:
            clear_run(out_dir)  # --overwrite, or the metrics of an earlier run that saved no checkpoint
        else:
            truncate_metrics(out_dir / "metrics.jsonl", step)
        (out_dir / "previews").mkdir(parents=True, exist_ok=True)
        from evdm.atomic import atomic_write  # hoist to the import block when merging issue 13

        atomic_write(out_dir / "config.toml", lambda tmp: tmp.write_text(to_toml(cfg)))

    # Wrap after loading weights: DDP, then compile; checkpoints always save raw_model.
    model: torch.nn.Module = raw_model
    if world_size > 1:
        model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if tc.compile and (device.type == "cuda" or tc.compile_on_cpu):
        model = torch.compile(model)
    eval_model = ema if ema is not None else raw_model
    # The stream is a function of (seed, rank, worker, batches consumed): resume continues it exactly.
    loader = data.make_train_loader(cfg, rank=rank, world_size=world_size, seed=step_seed(tc.seed, rank, 0),
                                    start_batch=step * tc.grad_accum_steps)
    val_u8 = data.load_val_clips(cfg) if is_main else None
    K = cfg.context
    samples_per_step = tc.batch_size * tc.grad_accum_steps * world_size
    train_clips = data.train_clip_count(cfg)  # for the epoch column; None when the manifest is unknown
    flops = flops_per_sample(cfg)  # per training sample, fwd + bwd, for the tflops / mfu columns
    peak = peak_tflops(device, tc.peak_tflops)

    def save(path: Path) -> None:
        if is_main:
            save_checkpoint(path, make_payload(step=step, cfg=cfg, model=raw_model, ema=ema, optimizer=optimizer, scaler=scaler))

    # --- loop ----------------------------------------------------------------------------------
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    dashboard = Dashboard(tc.max_steps, step, enabled=is_main)
    try:
        with dashboard:
            while step < tc.max_steps:
                if stop_agreed(stop_requested(), world_size, stop_group):  # between steps: nothing half done
                    dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")
                    break
                gen = torch.Generator(device=device).manual_seed(step_seed(tc.seed, rank, step))
                lr = lr_at(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                for micro in range(tc.grad_accum_steps):
                    wait_start = time.perf_counter()
                    batch_u8 = next(loader)
                    window_wait += time.perf_counter() - wait_start
                    x = data.to_model_input(
                        batch_u8, device, channels_last=tc.channels_last,
                        hflip_generator=gen if cfg.data.hflip else None,
                    )
                    middle_shape = (x.shape[0], x.shape[1], cfg.middle_frames, *x.shape[3:])
                    t, noise, cond_drop = draw_training_noise(
                        middle_shape, timesteps=cfg.diffusion.timesteps, cfg_drop_prob=cfg.diffusion.cfg_drop_prob,
                        noise_offset=cfg.diffusion.noise_offset, generator=gen, device=device,
                    )
                    # Gradients are all-reduced only on the last micro-step of an accumulation.
                    last_micro = micro == tc.grad_accum_steps - 1
                    sync = contextlib.nullcontext() if last_micro or world_size == 1 else model.no_sync()
                    with sync, amp_context(tc, device):
                        loss, _ = diffusion_loss(
                            model, schedule, x, t, noise, cond_drop, K=K, prediction=cfg.diffusion.prediction,
                            temporal_loss_weight=cfg.diffusion.temporal_loss_weight, residual=cfg.diffusion.residual,
                        )
                        scaler.scale(loss / tc.grad_accum_steps).backward()
                    loss_sum += loss.detach().float() / tc.grad_accum_steps
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, raw_model, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
                step += 1
                window_steps += 1

                # --- log, validate, preview, checkpoint: all functions of `step` -------------------
                val_loss = None
                is_val_step = step % tc.val_every == 0 or step == tc.max_steps
                if is_val_step and is_main:
                    val_loss = validation_loss(eval_model, schedule, val_u8, cfg, device)
                if is_main and (step % tc.preview_every == 0 or step == tc.max_steps) and not stop_requested():
                    write_preview(eval_model, schedule, val_u8, cfg, out_dir / "previews", step, device)
                if step % tc.log_every == 0 or is_val_step:
                    if world_size > 1:
                        dist.all_reduce(loss_sum)
                        loss_sum /= world_size
                    elapsed = time.perf_counter() - window_start
                    samples_per_s = window_steps * samples_per_step / elapsed
                    tflops, mfu = utilisation(samples_per_s / world_size, flops, peak)
                    record = {
                        "step": step,
                        "epoch": step * samples_per_step / train_clips if train_clips else None,
                        "loss": loss_sum.item() / window_steps,  # the one sync per log interval
                        "val_loss": val_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "samples_per_s": samples_per_s,
                        "tflops": tflops,  # achieved model TFLOP/s per GPU
                        "mfu": mfu,  # tflops / the GPU's bf16 dense peak; None when unknown (CPU)
                        "data_wait": window_wait / elapsed,
                        "skipped_shards": loader.skipped_shards,
                        "gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                    }
                    if is_main:
                        append_metrics(out_dir / "metrics.jsonl", record)
                        if val_loss is not None:
                            plot_losses(read_metrics(out_dir / "metrics.jsonl"), out_dir / "loss.png")
                    dashboard.update(step, record)
                    loss_sum.zero_()
                    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
                if step % tc.ckpt_every == 0:
                    save(ckpt_path)
                if step % tc.snapshot_every == 0:
                    save(out_dir / f"step_{step:07d}.pt")
    except KeyboardInterrupt:
        dashboard.message(f"interrupted at step {step}: saving {ckpt_path}")

    # --- final save ----------------------------------------------------------------------------
    save(ckpt_path)
    dashboard.message(f"saved {ckpt_path} at step {step}")
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out_dir
