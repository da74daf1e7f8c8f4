"""The Denoiser: the network together with everything that gives its output a meaning.

One object owns the U-Net, the noise schedule, the prediction type, the residual parameterisation, the
context counts, and the device, layout and precision policy (in the spirit of EDM's preconditioning
wrapper and diffusers' pipelines). Training calls `loss(clip, draws)`; every sampler call (previews,
sample.py, evaluate, the benchmarks) goes through `generate(start, end, sample)`; both run the
network through `output`, the one place where precision and layout are applied:

- layout: channels_last_3d for weights and activations, always (evdm.models.blocks says why);
- precision: autocast to `dtype` (bf16 or fp16) around the network only, or none (fp32); the
  diffusion arithmetic around it (schedule, loss, guidance, sampler updates) stays fp32.

`load_denoiser(ckpt, device)` builds one from a checkpoint. `compile()` compiles the U-Net's blocks
regionally, with a symbolic batch, cached on disk. Compiling the whole reference model took 124-198 s
on an H200 before its first step, and every new batch size traced it again. The U-Net is a few kinds
of blocks repeated at several widths and resolutions, so each block is compiled instead (PyTorch's
"regional compilation" recipe): instances of one kind at one width and resolution share a graph, and
the batch is symbolic in every graph, so a batch change or the validation's short last batch compiles
nothing new. Channels and resolution stay static: with symbolic sizes there, channels-last strides
become symbolic products that Inductor cannot order (`get_stride_order`: "cannot determine truth
value of Relational", seen here on the training step). The glue between blocks (stem, resampling,
skip concatenation) stays eager. Inductor's caches go to a folder the run owns (`cache_in`), so a
resumed run compiles in seconds.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
import torch._functorch.config
import torch.fx.experimental._config

from evdm.checkpoint import CheckpointError, config_of, load_checkpoint, load_weights
from evdm.cli import one_line, warn
from evdm.config import ConfigError, Context, RunConfig, SampleConfig
from evdm.diffusion import (Draws, Schedule, apply_dynamic_threshold, diffusion_loss, guided_output, make_schedule,
                            residual_base, sample, split_output)
from evdm.models import adapt_conv_weights, build_model
from evdm.models.blocks import ResBlock3D, TemporalAttention
from evdm.models.conditioning import EncoderBlock, EndpointFusion

LAYOUT = torch.channels_last_3d


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" or None: this rank's GPU when CUDA is present, else the CPU; "cuda": cuda:local_rank.
    A cuda device on a machine without CUDA is a ConfigError."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: CUDA is not available on this machine (use cpu)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The network's autocast dtype for a precision setting: "auto" is bf16 on CUDA and fp32 (None)
    elsewhere (on a CPU, bf16 convolutions are slow); "bf16", "fp16"; "fp32" is None."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, bf16, fp16 or fp32, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def to_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Every conv weight in the channels-last layout of its rank, in place (5-D: channels_last_3d)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim in (4, 5):
                p.data = p.data.contiguous(memory_format=torch.channels_last if p.ndim == 4 else LAYOUT)
    return module


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, C, T, H, W] in [-1, 1] -> uint8 numpy [B, T, H, W, C], rounded to nearest: the exact
    bytes back for frames that came from uint8 as u / 127.5 - 1."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


class Denoiser:
    """A video U-Net with its schedule, prediction type, residual, context counts and numerics.

    net: the module checkpoints save (never a wrapper); `call` is what forward passes run: the net
    itself, or its DistributedDataParallel wrapper (`wrap_ddp`). dtype: autocast dtype, None for fp32.
    """

    def __init__(self, net: torch.nn.Module, schedule: Schedule, *, context: Context, prediction: str,
                 residual: str, device: torch.device, dtype: torch.dtype | None) -> None:
        self.net = to_layout(net.to(device))
        self.call: torch.nn.Module = self.net
        self.schedule = schedule.to(device)
        self.context, self.prediction, self.residual = context, prediction, residual
        self.device, self.dtype = device, dtype
        self.compiled = False

    @classmethod
    def from_config(cls, net: torch.nn.Module, cfg: RunConfig, device: torch.device, precision: str) -> Denoiser:
        """The denoiser cfg describes around `net`, with a precision setting ("auto", "bf16", "fp16", "fp32")."""
        d = cfg.diffusion
        return cls(net, make_schedule(d.schedule, d.timesteps), context=cfg.context, prediction=d.prediction,
                   residual=d.residual, device=device, dtype=autocast_dtype(precision, device))

    def with_net(self, net: torch.nn.Module) -> Denoiser:
        """The same denoiser around another network of the same shape (the EMA weights)."""
        return Denoiser(net, self.schedule, context=self.context, prediction=self.prediction,
                        residual=self.residual, device=self.device, dtype=self.dtype)

    # ---- inputs and the network call -------------------------------------------------------------

    def to_input(self, u8: torch.Tensor, hflip: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, C, T, H, W] -> float [B, C, T, H, W] in [-1, 1] on the device, in the layout; with
        `hflip` each clip is flipped left-right with probability 1/2 (on the device)."""
        x = u8.to(self.device, non_blocking=True)
        if hflip is not None:
            flip = torch.rand(x.shape[0], generator=hflip, device=hflip.device).to(x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1, 1), x.flip(-1), x)
        return (x.float() / 127.5 - 1.0).contiguous(memory_format=LAYOUT)

    def output(self, x_t: torch.Tensor, t: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
               cond_drop: torch.Tensor) -> torch.Tensor:
        """The network's output (eps, v or x0 of the diffused variable) as fp32, run under autocast."""
        x_t, start, end = (v.contiguous(memory_format=LAYOUT) for v in (x_t, start, end))
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.call(x_t, t, start, end, cond_drop).float()

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, start: torch.Tensor, end: torch.Tensor,
                cond_drop: torch.Tensor) -> torch.Tensor:
        """The x0 estimate of the diffused variable (the middle, or middle - blend) at x_t; fp32."""
        return split_output(self.schedule, x_t, t, self.output(x_t, t, start, end, cond_drop), self.prediction)[0]

    # ---- training ----------------------------------------------------------------------------------

    def loss(self, clip: torch.Tensor, draws: Draws, *, temporal_loss_weight: float) -> tuple[torch.Tensor, dict]:
        """The diffusion loss of clips [B, C, T, H, W] in [-1, 1] (evdm.diffusion)."""
        start, middle, end = self.context.split(clip)
        return diffusion_loss(self.output, self.schedule, start, middle, end, draws, prediction=self.prediction,
                              temporal_loss_weight=temporal_loss_weight, residual=self.residual)

    # ---- sampling ----------------------------------------------------------------------------------

    def pad_for(self, batch_size: int) -> int | None:
        """The batch `generate` should pad short batches to: a compiled model specialises on shapes."""
        return batch_size if self.compiled else None

    @torch.no_grad()
    def generate(self, start: torch.Tensor, end: torch.Tensor, sample_cfg: SampleConfig, *,
                 generator: torch.Generator | None = None, pad_to: int | None = None) -> torch.Tensor:
        """Fill in the middle between start [B, C, K_start, H, W] and end [B, C, K_end, H, W] (in [-1, 1],
        on the device) with sample_cfg's sampler, steps, eta, guidance and thresholding.

        Returns clip [B, C, T, H, W]: the context frames bit for bit, the middle clamped to [-1, 1].
        pad_to: run a batch of exactly this many clips (repeating the last endpoints).
        """
        B = start.shape[0]
        if pad_to is not None and B < pad_to:
            fill = lambda x: torch.cat([x, x[-1:].expand(pad_to - B, *x.shape[1:])])  # noqa: E731
            start, end = fill(start), fill(end)
        M = self.net.middle_frames
        base = residual_base(self.residual, start, end, M)
        base = torch.zeros((), device=start.device) if base is None else base
        sc = sample_cfg
        # Guidance in a limited interval: the noisier steps run the conditional branch alone (no null
        # branch computed to be discarded).
        max_t = sc.guidance_max_t * (self.schedule.timesteps - 1)

        def x0_fn(x: torch.Tensor, t: torch.Tensor, t_int: int) -> torch.Tensor:
            out = guided_output(self.output, x, t, start, end, sc.guidance_scale if t_int <= max_t else 1.0)
            # Keep x0 in the data range (Imagen's dynamic thresholding when asked, else ADM's static
            # clipping to [-1, 1]), on the frames (x0 + base), not on the residual.
            frames = split_output(self.schedule, x, t, out, self.prediction)[0] + base
            frames = apply_dynamic_threshold(frames, sc.dynamic_threshold) if sc.dynamic_threshold else frames.clamp(-1, 1)
            return frames - base

        x_T = torch.randn((start.shape[0], start.shape[1], M, *start.shape[3:]), generator=generator, device=start.device)
        x = sample(x0_fn, self.schedule, x_T, sampler=sc.sampler, steps=sc.steps, eta=sc.eta, generator=generator)
        middle = (x + base).clamp(-1, 1).to(start.dtype)
        return torch.cat([start, middle, end], dim=2)[:B]

    def generate_u8(self, starts: np.ndarray, ends: np.ndarray, sample_cfg: SampleConfig, *,
                    generator: torch.Generator | None = None, pad_to: int | None = None) -> np.ndarray:
        """`generate` from uint8 endpoints starts [B, K_start, H, W, C], ends [B, K_end, H, W, C] to uint8
        clips [B, T, H, W, C] whose context frames are the input bytes exactly."""
        start, end = (self.to_input(torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 4, 1, 2, 3))
                      for u8 in (starts, ends))
        out = to_uint8(self.generate(start, end, sample_cfg, generator=generator, pad_to=pad_to))
        out[:, : starts.shape[1]], out[:, out.shape[1] - ends.shape[1]:] = starts, ends  # exact by construction too
        return out

    def compile(self) -> None:
        """Compile the network's repeated blocks in place (`compile_regions`)."""
        compile_regions(self.net)
        self.compiled = True

    def train(self, mode: bool = True) -> Denoiser:
        self.net.train(mode)
        return self

    def eval(self) -> Denoiser:
        return self.train(False)


def load_denoiser(ckpt: str | Path, device: torch.device, *, use_ema: bool = True, color_mode: str | None = None,
                  precision: str | None = None, compile: str | None = None) -> tuple[Denoiser, RunConfig]:
    """(denoiser in eval mode, its stored config) from a checkpoint; CheckpointError names the file.

    use_ema: the EMA weights when the checkpoint has them. color_mode: when given, the checkpoint must
    have been trained in it. precision / compile: None for the checkpoint's sample.precision /
    sample.compile; "auto" turns either on for CUDA only.
    """
    state = load_checkpoint(ckpt)
    cfg = config_of(state, ckpt)
    if color_mode is not None and color_mode != cfg.data.color_mode:
        raise CheckpointError(f"{ckpt}: checkpoint was trained on {cfg.data.color_mode!r} clips, "
                              f"but {color_mode!r} was asked")
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
        cfg.sample, precision=precision or cfg.sample.precision, compile=compile or cfg.sample.compile))
    net = build_model(cfg)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    load_weights(net, adapt_conv_weights(weights, net), ckpt)  # Conv3d-form checkpoints load too
    denoiser = Denoiser.from_config(net, cfg, device, cfg.sample.precision).eval()
    if wants_compile(cfg.sample.compile, device):
        denoiser.compile()
    return denoiser, cfg


def wants_compile(mode: str, device: torch.device) -> bool:
    """True for "on", and for "auto" on CUDA (on a CPU a compile costs minutes and buys nothing)."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


# The blocks compiled, one graph per kind, width and resolution (and training or not).
REGIONS = (ResBlock3D, TemporalAttention, EncoderBlock, EndpointFusion)
# Graphs Dynamo may keep per block class: the reference model has about 12 ResBlock shapes, each
# for training and for inference (no_grad), and a batch of 1 is a graph of its own.
RECOMPILE_LIMIT = 64
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_regions(net: torch.nn.Module) -> int:
    """Compile every REGIONS block of `net` in place (fullgraph, symbolic batch); returns how many.

    In place: the state dict keeps its names (no `_orig_mod.`), DDP can wrap the net as usual, and an
    uncompiled copy (the EMA) is unaffected. Sets torch._dynamo's recompile limit and turns off its
    automatic dynamic shapes (which would make a second resolution's sizes symbolic) and duck shaping,
    for the process. A compile that fails on this machine (an Inductor or Triton error, raised at a
    block's first call) puts every block back to eager with one warning line (`uncompile`).
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.automatic_dynamic_shapes = False
    # Duck shaping gives equal sizes one symbol: a batch of 2 beside the 2 observed frames (a static
    # size) would specialise the batch, and the next batch size would compile everything again.
    torch.fx.experimental._config.use_duck_shape = False
    # The backward graph is lowered with the forward, so that its compile error too surfaces in the
    # forward call, where the fallback catches it, rather than in loss.backward().
    if hasattr(torch._functorch.config, "force_non_lazy_backward_lowering"):
        torch._functorch.config.force_non_lazy_backward_lowering = True
    regions = [module for module in net.modules() if isinstance(module, REGIONS)]
    for module in regions:
        module.forward = batch_symbolic(torch.compile(module.forward, fullgraph=True), module.forward,
                                        on_failure=lambda err: uncompile(regions, err))
    return len(regions)


def batch_symbolic(compiled, eager, *, on_failure):
    """`compiled` called with dim 0 (the batch) of its tensor arguments marked dynamic, the rest static.

    Where `compiled` raises and `eager` (the same forward uncompiled) does not, the compile failed on
    this machine: `on_failure(err)`, and eager's result. A genuine error (bad inputs) raises again from
    eager; out of memory is not retried.
    """
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
    """Every compiled block back to its class's eager forward, with one warning line naming `err`
    (Dynamo wraps the backend's error: the inner one is named)."""
    if not any("forward" in module.__dict__ for module in regions):
        return  # already uncompiled (by another block's failure)
    for module in regions:
        module.__dict__.pop("forward", None)
    inner = getattr(err, "inner_exception", None) or err
    warn(f"torch.compile failed on this machine ({type(inner).__name__}: {one_line(inner)}); "
         "the model runs uncompiled (eager), slower")


def cache_in(folder: str | Path) -> Path:
    """Keep Inductor's compile caches in `folder` (unless TORCHINDUCTOR_CACHE_DIR is set already, which
    wins); call before the first compile of the process. Returns the folder in use."""
    os.environ.setdefault(CACHE_ENV, str(Path(folder).resolve()))
    return Path(os.environ[CACHE_ENV])


SEED_MULTIPLIER = 1_000_003  # a prime a little over 10**6: distinct small parts give distinct seeds


def mix_seed(*parts: int) -> int:
    """Fold parts into one integer: mix_seed(a, b, c) == (a * M + b) * M + c with M = 1_000_003.

    Not reduced: callers that need a bounded seed take it modulo what their generator accepts.
    """
    mixed = 0
    for part in parts:
        mixed = mixed * SEED_MULTIPLIER + part
    return mixed
