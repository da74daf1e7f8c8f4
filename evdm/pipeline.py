"""Inference: load a trained denoiser from a checkpoint and fill in the middle between endpoints.

`load_model` builds the model from a checkpoint's stored config (EMA weights by default) and
`fill_middle` is the torch-level call that sample.py, evdm.evaluate, the training previews and the
benchmarks share: endpoint tensors in, whole clips out, with the model run under bf16 autocast and
torch.compile where asked (`sample.precision`, `sample.compile`; "auto" turns both on for CUDA
only: on a CPU, bf16 convolutions are slow and compiling costs minutes for no gain). The sampler's
arithmetic (schedule, guidance combination, DDIM update) stays fp32 whatever the model runs in.
File formats (images, shards, MP4, PNG) are evdm.sampling's business, not this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evdm.checkpoint import CheckpointError, config_of, load_checkpoint, load_weights
from evdm.config import ConfigError, RunConfig
from evdm.diffusion import Schedule, make_schedule, sample_clip
from evdm.models import adapt_conv_weights, build_model, to_channels_last


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


def load_model(ckpt: str | Path, device: torch.device, *, use_ema: bool = True, color_mode: str | None = None,
               compile: str | None = None) -> tuple[torch.nn.Module, RunConfig, Schedule]:
    """(model in eval mode, its stored config, its schedule) on `device`; CheckpointError names the file.

    use_ema: the EMA weights when the checkpoint has them. color_mode: when given, the checkpoint must
    have been trained in it. compile: "auto" | "on" | "off", None for the checkpoint's sample.compile.
    On CUDA the weights go channels-last (the layout fill_middle feeds there).
    """
    state = load_checkpoint(ckpt)
    cfg = config_of(state, ckpt)
    if color_mode is not None and color_mode != cfg.data.color_mode:
        raise CheckpointError(f"{ckpt}: checkpoint was trained on {cfg.data.color_mode!r} clips, "
                              f"but {color_mode!r} was asked")
    model = build_model(cfg)
    weights = state["ema"] if use_ema and state.get("ema") is not None else state["model"]
    load_weights(model, adapt_conv_weights(weights, model), ckpt)  # Conv3d-form checkpoints load too
    model = model.to(device).eval()
    if device.type == "cuda":
        model = to_channels_last(model)
    if wants_compile(compile or cfg.sample.compile, device):
        model = compile_for_inference(model)
    return model, cfg, make_schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps).to(device)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, C, T, H, W] in [-1, 1] -> uint8 numpy [B, T, H, W, C], rounded to nearest: the exact
    bytes back for frames that came from uint8 as u / 127.5 - 1."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for "bf16" (and "auto" on CUDA), None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    use = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.bfloat16 if use else None


def wants_compile(mode: str, device: torch.device) -> bool:
    """True for "on", and for "auto" on CUDA."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_for_inference(model: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """torch.compile(fullgraph, static shapes): fill_middle pads ragged batches so one graph serves."""
    return torch.compile(model, fullgraph=True, dynamic=False)


def pad_size(model: Callable[..., torch.Tensor], batch_size: int) -> int | None:
    """The batch fill_middle should pad a short batch to: batch_size for a compiled model (one static
    graph, no recompile for the last batch), None for an eager one, where padding only adds work."""
    return batch_size if hasattr(model, "_orig_mod") else None  # torch.compile's wrapper holds _orig_mod


def denoiser(model: Callable[..., torch.Tensor], dtype: torch.dtype | None,
             channels_last: bool) -> Callable[..., torch.Tensor]:
    """The model as the sampler calls it: inputs in channels_last_3d when asked, forward under
    autocast(dtype) when dtype is set, output as fp32."""
    def call(x_t, t, start_context, end_context, cond_drop):
        if channels_last:
            x_t, start_context, end_context = (
                v.contiguous(memory_format=torch.channels_last_3d) for v in (x_t, start_context, end_context))
        with torch.autocast(x_t.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x_t, t, start_context, end_context, cond_drop).float()

    return call


@torch.no_grad()
def fill_middle(
    model: Callable[..., torch.Tensor], schedule: Schedule, cfg: RunConfig,
    start_context: torch.Tensor, end_context: torch.Tensor, *,
    steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
    generator: torch.Generator | None = None, precision: str = "fp32", channels_last: bool = False,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Sample the middle frames between the endpoints with cfg's sampler settings.

    start_context [B, C, K_start, H, W], end_context [B, C, K_end, H, W] in [-1, 1] on the model's device. steps, eta,
    guidance_scale: None takes cfg.sample's. precision: "fp32" | "bf16" | "auto" (the model's
    forward only). pad_to: run batches of exactly this many clips (repeating the last endpoints), so a
    compiled model never recompiles for a short last batch. Returns clip [B, C, T, H, W]: the input
    context frames bit for bit, the generated middle clamped to [-1, 1].
    """
    sc, B = cfg.sample, start_context.shape[0]
    if pad_to is not None and B < pad_to:
        fill = lambda x: torch.cat([x, x[-1:].expand(pad_to - B, *x.shape[1:])])  # noqa: E731
        start_context, end_context = fill(start_context), fill(end_context)
    clip = sample_clip(
        denoiser(model, autocast_dtype(precision, start_context.device), channels_last), schedule,
        start_context, end_context, sampler=sc.sampler, steps=sc.steps if steps is None else steps,
        eta=sc.eta if eta is None else eta,
        guidance_scale=sc.guidance_scale if guidance_scale is None else guidance_scale,
        prediction=cfg.diffusion.prediction, residual=cfg.diffusion.residual, middle_frames=cfg.middle_frames,
        dynamic_threshold=sc.dynamic_threshold, generator=generator,
    )
    return clip[:B]
