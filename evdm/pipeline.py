"""Inference on the fast path: a trained denoiser fills in the middle between given endpoints.

`fill_middle` is the torch-level call that sample.py, evdm.evaluate, the training previews and the
benchmarks share: endpoints in, whole clips out, with the model run under bf16 autocast and
torch.compile where asked (`sample.precision`, `sample.compile`; "auto" turns both on for CUDA
only: on a CPU, bf16 convolutions are slow and compiling costs minutes for no gain). The sampler's
arithmetic (schedule, guidance combination, DDIM update) stays fp32 whatever the model runs in.
"""

from __future__ import annotations

from typing import Callable

import torch

from evdm.config import RunConfig
from evdm.diffusion import Schedule, sample_clip


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
        dynamic_threshold=sc.dynamic_threshold_percentile if sc.dynamic_threshold else None, generator=generator,
    )
    return clip[:B]
