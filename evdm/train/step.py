"""The training step: what it updates (`Trainer`) and the step itself (`train_step`), with the EMA. The loop,
the benchmarks and the tests all run this one step, so what they time or train is what users train."""

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from evdm.config import RunConfig, TrainConfig
from evdm.denoiser import Denoiser
from evdm.seeds import step_seed


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then constant or cosine decay to lr * lr_min_ratio at max_steps."""
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.lr_warmup_steps) / max(1, cfg.max_steps - cfg.lr_warmup_steps))
    floor = cfg.lr * cfg.lr_min_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


@dataclass
class Trainer:
    """What a training step updates; ema (train.ema): an fp32 copy of denoiser.net, for validation and samples."""

    cfg: RunConfig
    denoiser: Denoiser
    ema: Denoiser | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    @property
    def eval_denoiser(self) -> Denoiser:
        return self.ema if self.ema is not None else self.denoiser


def make_trainer(cfg: RunConfig, device: torch.device) -> Trainer:
    """Fresh weights from train.seed, the EMA copy, AdamW and the GradScaler (on for fp16 only)."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    denoiser = Denoiser(cfg, device, precision=tc.precision)
    ema = Denoiser(cfg, device, precision=tc.precision, net=make_ema(denoiser.net)) if tc.ema else None
    optimizer = torch.optim.AdamW(denoiser.net.parameters(), lr=tc.lr, betas=tc.adam_betas,
                                  weight_decay=tc.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=denoiser.dtype == torch.float16)
    return Trainer(cfg=cfg, denoiser=denoiser, ema=ema, optimizer=optimizer, scaler=scaler)


class TrainingDiverged(RuntimeError):
    """The run produced non-finite gradients or weights; the message says where it stopped and what was kept."""


@dataclass
class StepResult:
    """One step's numbers, kept on the device (read them at log time: `.item()` syncs a GPU)."""

    loss: torch.Tensor  # mean over the micro-batches
    grad_norm: torch.Tensor  # before clipping
    lr: float
    wait_s: float  # time spent waiting for batches
    finite: bool  # False: the gradients were not finite, and the weights and the EMA were left as they were


def train_step(trainer: Trainer, batches: Iterator[torch.Tensor], step: int, *, rank: int = 0) -> StepResult:
    """One optimizer step over train.grad_accum_steps uint8 batches [B, C, T, H, W] from `batches`, then the EMA
    update; noise, timesteps, cond drops and augmentations seeded by (train.seed, rank, step). N batches of B are
    one batch of N*B (each loss divided by N), all-reduced under DDP on the last micro-batch only. A step whose
    gradient norm is not finite changes no weight, as the fp16 GradScaler skips such steps (one device sync)."""
    tc, den = trainer.cfg.train, trainer.denoiser
    gen = torch.Generator(device=den.device).manual_seed(step_seed(tc.seed, rank, step))
    lr = lr_at(step, tc)
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    den.train()
    loss_sum, wait_s = torch.zeros((), device=den.device), 0.0
    for micro in range(tc.grad_accum_steps):
        wait_start = time.perf_counter()
        u8 = next(batches)
        wait_s += time.perf_counter() - wait_start
        x = den.to_input(u8, augment=gen)
        with den.no_sync() if micro < tc.grad_accum_steps - 1 else contextlib.nullcontext():
            loss, _ = den.loss(x, gen)
            trainer.scaler.scale(loss / tc.grad_accum_steps).backward()
        loss_sum += loss.detach() / tc.grad_accum_steps
    trainer.scaler.unscale_(trainer.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(den.net.parameters(), tc.grad_clip)
    finite = bool(torch.isfinite(grad_norm))
    if finite or trainer.scaler.is_enabled():  # the scaler skips the update itself, and lowers its scale
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.ema is not None and finite:
        update_ema(trainer.ema.net, den.net, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
    return StepResult(loss=loss_sum, grad_norm=grad_norm, lr=lr, wait_s=wait_s, finite=finite)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """Decay with warm-up, (1 + step) / (10 + step) capped at `decay` (TF's ExponentialMovingAverage with
    num_updates): early averages forget fast so the EMA is not stuck at init."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen fp32 copy of `model` in eval mode."""
    return copy.deepcopy(model).float().eval().requires_grad_(False)


def all_finite(*modules: torch.nn.Module | None) -> bool:
    """Whether every parameter and buffer of the modules is finite (one device sync)."""
    tensors = [t for m in modules if m is not None for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in model.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)
