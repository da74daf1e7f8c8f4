"""Model FLOPs utilisation: the FLOPs of one training sample, and the peak of the GPU it runs on.

MFU = achieved model FLOP/s per GPU / the GPU's dense bf16 peak (PaLM, Chowdhery et al. 2022,
app. B; nanoGPT prints it). The FLOPs are counted, not estimated: FlopCounterMode runs the real
model's forward and backward once on the meta device (shapes only, no memory, no time), so the
count follows every config change. Convolutions, matmuls and attention are counted; elementwise
work (norms, activations) is not, as usual for MFU.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from evdm.config import RunConfig

# Dense bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)


def flops_per_sample(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of the denoiser for one training sample at cfg's shapes.

    The model is built on the meta device from cfg (same graph the trainer runs, at batch 1:
    every layer's cost is linear in the batch)."""
    from evdm.models import build_model

    d = cfg.data
    (Ks, Ke), M, S = cfg.context, cfg.middle_frames, d.size
    with torch.device("meta"):
        model = build_model(cfg)
        x_t = torch.empty(1, cfg.channels, M, S, S)
        start, end = torch.empty(1, cfg.channels, Ks, S, S), torch.empty(1, cfg.channels, Ke, S, S)
        t = torch.zeros(1, dtype=torch.long)
        drop = torch.zeros(1, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        model(x_t, t, start, end, drop).sum().backward()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of `device`: `override` when > 0, else the data-sheet value of a
    known GPU; None on CPU or an unknown GPU (MFU is then not reported)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def utilisation(samples_per_s_per_gpu: float, flops: float, peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s per GPU, MFU in [0, 1] or None when the peak is unknown)."""
    tflops = samples_per_s_per_gpu * flops / 1e12
    return tflops, (tflops / peak if peak else None)
