"""The Denoiser: the U-Net with its schedule, diffusion settings, context counts, and device, layout and
precision policy (as EDM's preconditioning wrapper owns its numerics). `loss` and `generate` run the
network through `_output`, the one place where the layout (channels_last_3d) and autocast (around the
network only; the diffusion arithmetic stays fp32) are applied; `compile(mode)` decides torch.compile."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch._functorch.config
import torch.fx.experimental._config
from torch.nn.parallel import DistributedDataParallel

from evdm.checkpoint import CheckpointError, config_of, load_checkpoint, load_weights
from evdm.cli import one_line, warn
from evdm.config import ConfigError, RunConfig, SampleConfig, with_sample
from evdm.diffusion import (apply_dynamic_threshold, diffusion_loss, draw_training_noise, floor_residual, guided_output,
                            linear_blend, make_schedule, sample, split_output)
from evdm.models import build_model
from evdm.models.blocks import ResBlock3D, TemporalAttention
from evdm.models.conditioning import EncoderBlock, EndpointFusion

LAYOUT = torch.channels_last_3d


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto"/None: this rank's GPU if any, else the CPU; "cuda": cuda:local_rank (ConfigError without CUDA)."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use cpu)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The network's autocast dtype: "auto" is bf16 on CUDA, else (bf16 is slow on a CPU) fp32, i.e. None."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def wants_compile(mode: str, device: torch.device) -> bool:
    """True for "on", and for "auto" on CUDA (on a CPU a compile costs minutes and buys nothing)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def to_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Every conv weight in the channels-last layout of its rank, in place (5-D: channels_last_3d). A Conv2d
    kernel gets the layout's own strides even on size-1 dimensions (a 1x1 kernel is "contiguous" in both
    layouts): the strides its gradient comes with, so DDP copies no gradient into its buckets."""
    for p in module.parameters():  # .data: no autograd history either way
        if p.ndim == 4:
            p.data = torch.empty_like(p.data, memory_format=torch.channels_last).copy_(p.data)
        elif p.ndim == 5:
            p.data = p.data.contiguous(memory_format=LAYOUT)
    return module


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, C, T, H, W] in [-1, 1] -> uint8 numpy [B, T, H, W, C], rounded: exact for u / 127.5 - 1."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


class Denoiser:
    """A video U-Net with its schedule, diffusion settings, context counts and numerics (module docstring).
    precision: "auto", "bf16", "fp16" or "fp32" autocast for the network. net: the network to wrap
    instead of a fresh one of cfg's shape (an EMA copy); `.net` is what checkpoints save, never a wrapper."""

    def __init__(self, cfg: RunConfig, device: torch.device, *, precision: str = "auto",
                 net: torch.nn.Module | None = None) -> None:
        self.cfg, self.context, self.device = cfg, cfg.context, device
        self.net = to_layout((build_model(cfg) if net is None else net).to(device))
        self._forward: torch.nn.Module = self.net  # the net, or its DDP wrapper (wrap_ddp)
        self.schedule = make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)
        self.dtype = autocast_dtype(precision, device)

    @classmethod
    def load(cls, ckpt: str | Path, device: torch.device, *, use_ema: bool = True, color_mode: str | None = None,
             precision: str | None = None, compile: str | None = None) -> Denoiser:
        """A checkpoint's denoiser in eval mode (EMA weights if any and use_ema), compiled per its sample.compile
        (or `compile`), `.cfg` its stored config; CheckpointError if trained in another `color_mode`."""
        state = load_checkpoint(ckpt)
        cfg = with_sample(config_of(state, ckpt), precision=precision, compile=compile)
        if color_mode is not None and color_mode != cfg.data.color_mode:
            raise CheckpointError(f"{ckpt}: checkpoint was trained on {cfg.data.color_mode!r} clips, "
                                  f"but {color_mode!r} was asked")
        denoiser = cls(cfg, device, precision=cfg.sample.precision)
        weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
        load_weights(denoiser.net, weights, ckpt)
        denoiser.compile(cfg.sample.compile)
        return denoiser.eval()

    def to_input(self, u8: torch.Tensor, augment: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, C, T, H, W] -> float in [-1, 1] on the device, in the layout. `augment` (training) draws
        which clips to flip left-right (data.hflip) and to play backwards (data.time_reverse), half of each."""
        x = u8.to(self.device, non_blocking=True)
        for on, dim in ((self.cfg.data.hflip, -1), (self.cfg.data.time_reverse, 2)):
            if on and augment is not None:
                flip = torch.rand(x.shape[0], generator=augment, device=augment.device).to(x.device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(dim), x)
        return (x.float() / 127.5 - 1.0).contiguous(memory_format=LAYOUT)

    def _conditions(self, start: torch.Tensor, end: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(cond, base): cond = (start, end, their linear blend at each middle frame), what the network sees; base,
        what the diffused variable is relative to: the blend (diffusion.residual = "blend"), else 0."""
        blend = linear_blend(start, end, self.net.middle_frames)
        base = blend if self.cfg.diffusion.residual == "blend" else torch.zeros((), device=start.device)
        return (start, end, blend), base

    def _output(self, x_t: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, ...],
                cond_drop: torch.Tensor) -> torch.Tensor:
        """The network's output (eps, v or x0 of the diffused variable) as fp32, run under autocast."""
        x_t, start, end, blend = (v.contiguous(memory_format=LAYOUT) for v in (x_t, *cond))
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self._forward(x_t, t, start, end, blend, cond_drop).float()

    def wrap_ddp(self, device_ids: list[int] | None) -> None:
        """Run the network under DDP (the group must be up); bucket-view gradients keep channels-last strides."""
        self._forward = DistributedDataParallel(self.net, device_ids=device_ids, gradient_as_bucket_view=True)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Under DDP, skip the gradient all-reduce (all micro-batches of an accumulation but the last)."""
        ddp = isinstance(self._forward, DistributedDataParallel)
        return self._forward.no_sync() if ddp else contextlib.nullcontext()

    def compile(self, mode: str, *, cache_dir: Path | None = None) -> bool:
        """Compile the network's blocks when `mode` asks here (`wants_compile`), caching in `cache_dir`; did it?"""
        if not wants_compile(mode, self.device):
            return False
        if cache_dir is not None:
            cache_in(cache_dir)
        compile_regions(self.net)
        return True

    def train(self, mode: bool = True) -> Denoiser:
        self.net.train(mode)
        return self

    def eval(self) -> Denoiser:
        return self.train(False)

    def loss(self, clip: torch.Tensor, generator: torch.Generator, *,
             drop_conditions: bool = True) -> tuple[torch.Tensor, dict]:
        """The diffusion loss of clips [B, C, T, H, W] in [-1, 1] (evdm.diffusion.diffusion_loss), its draws from
        `generator`. drop_conditions: at cfg.diffusion.cfg_drop_prob (training), or never (validation)."""
        d = self.cfg.diffusion
        start, middle, end = self.context.split(clip)
        draws = draw_training_noise(middle.shape, timesteps=d.timesteps, noise_offset=d.noise_offset,
                                    cfg_drop_prob=d.cfg_drop_prob if drop_conditions else 0.0,
                                    generator=generator, device=clip.device)
        cond, base = self._conditions(start, end)
        return diffusion_loss(lambda x_t, t, drop: self._output(x_t, t, cond, drop), self.schedule, start, middle, end,
                              draws, base=base, prediction=d.prediction, temporal_loss_weight=d.temporal_loss_weight)

    @torch.no_grad()
    def generate(self, start: torch.Tensor, end: torch.Tensor, sample_cfg: SampleConfig | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Fill in the middle between start [B, C, K_start, H, W] and end [B, C, K_end, H, W] in [-1, 1] per
        sample_cfg (default cfg.sample): clip [B, C, T, H, W], the context bit for bit, the middle clamped."""
        sc = sample_cfg or self.cfg.sample
        cond, base = self._conditions(start, end)
        # Guidance in a limited interval: the noisier steps run the conditional branch alone.
        max_t = sc.guidance_max_t * (self.schedule.timesteps - 1)

        def x0_fn(x: torch.Tensor, t: torch.Tensor, t_int: int) -> torch.Tensor:
            out = guided_output(self._output, x, t, cond, sc.guidance_scale if t_int <= max_t else 1.0)
            # Keep x0 in the data range (Imagen's dynamic thresholding when asked, else ADM's static
            # clipping to [-1, 1]), on the frames (x0 + base), not on the residual.
            frames = split_output(self.schedule, x, t, out, self.cfg.diffusion.prediction)[0] + base
            frames = (apply_dynamic_threshold(frames, sc.dynamic_threshold) if sc.dynamic_threshold
                      else frames.clamp(-1, 1))
            return frames - base

        x_T = torch.randn(cond[2].shape, generator=generator, device=start.device)
        x = sample(x0_fn, self.schedule, x_T, sampler=sc.sampler, steps=sc.steps, eta=sc.eta, generator=generator)
        middle = floor_residual((x + base).clamp(-1, 1), cond[2], sc.residual_floor).to(start.dtype)
        return torch.cat([start, middle, end], dim=2)

    def generate_u8(self, starts: np.ndarray, ends: np.ndarray, sample_cfg: SampleConfig | None = None, *,
                    generator: torch.Generator | None = None) -> np.ndarray:
        """`generate` from uint8 endpoints starts [B, K_start, H, W, C], ends [B, K_end, H, W, C] to uint8
        clips [B, T, H, W, C] whose context frames are the input bytes exactly."""
        start, end = (self.to_input(torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 4, 1, 2, 3))
                      for u8 in (starts, ends))
        out = to_uint8(self.generate(start, end, sample_cfg, generator=generator))
        out[:, : starts.shape[1]], out[:, out.shape[1] - ends.shape[1]:] = starts, ends  # exact by construction too
        return out


REGIONS = (ResBlock3D, TemporalAttention, EncoderBlock, EndpointFusion)  # compiled: one graph per shape
RECOMPILE_LIMIT = 64  # graphs per block class: ~12 ResBlock shapes, for training and no_grad, and batch 1
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_regions(net: torch.nn.Module) -> int:
    """Compile every REGIONS block of `net` in place (fullgraph, symbolic batch; names and the EMA copy kept);
    returns how many. Sets Dynamo's options for the process; a compile that fails on this machine puts
    every block back to eager with one warning line (`uncompile`)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.automatic_dynamic_shapes = False  # a second resolution would become symbolic
    # Duck shaping would give a batch of 2 the (static) symbol of 2 observed frames: every batch size recompiles.
    torch.fx.experimental._config.use_duck_shape = False
    # Lower the backward with the forward: its compile error then surfaces where the fallback catches it.
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    regions = [module for module in net.modules() if isinstance(module, REGIONS)]
    for module in regions:
        module.forward = batch_symbolic(torch.compile(module.forward, fullgraph=True), module.forward,
                                        on_failure=lambda err: uncompile(regions, err))
    return len(regions)


def batch_symbolic(compiled, eager, *, on_failure):
    """`compiled` with dim 0 (the batch) of its tensor arguments dynamic; where it raises and `eager` does not
    (a failed compile), `on_failure(err)` and eager's result. Bad inputs raise from eager; OOM is not retried."""
    def forward(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.ndim:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return compiled(*args)
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError since 2.5, the same class
            raise
        except Exception as err:
            out = eager(*args)
            on_failure(err)
            return out

    return forward


def uncompile(regions: list[torch.nn.Module], err: Exception) -> None:
    """Every compiled block back to its class's eager forward, with one warning line naming `err`'s inner error."""
    if not any("forward" in module.__dict__ for module in regions):
        return  # already uncompiled (by another block's failure)
    for module in regions:
        module.__dict__.pop("forward", None)
    inner = getattr(err, "inner_exception", None) or err
    warn(f"torch.compile failed on this machine ({type(inner).__name__}: {one_line(inner)}); "
         "the model runs uncompiled (eager), slower")


def cache_in(folder: str | Path) -> Path:
    """Keep Inductor's compile caches in `folder` unless the user set TORCHINDUCTOR_CACHE_DIR (torch's
    default, which importing torch._dynamo sets, counts as unset). Returns the folder in use."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get(CACHE_ENV)
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ[CACHE_ENV] = str(Path(folder).resolve())
    return Path(os.environ[CACHE_ENV])
