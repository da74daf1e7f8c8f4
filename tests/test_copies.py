"""Copies a training step makes (bench/copies.py), counted on the CPU with the real step.

On an H200, copies were 28% of an eager bf16 step: 1,323 copy ops a step. The bounds below are on the
copies of *activations* in one eager step of a 3-level model (parameter-shaped copies, autocast's
weight casts and their gradients, scale with the parameter count and are counted apart):
- layout copies: at most 8 per attention call, forward and backward (the eager attention's batched
  matrix products over the channels-last tokens; compiled, the attention is a broadcast product
  without them) plus 24 (the CPU convolution backward's per-frame views in the endpoint encoder, the
  fusion's weight views, the context slices, the EMA's constant buffers);
- dtype conversions: none in fp32 beyond the timestep (int -> float) and its gradient-free twin;
  under bf16 autocast at most one per norm call (autocast runs torch's eager norms in fp32), two per
  attention call (the fp32 softmax) and 16 at the edges (inputs, timestep embedding, fusion, loss).
Measured when written: fp32 95 layout (77 of them attention's) and 2 dtype; bf16 95 and 97, for 74
norm and 11 attention calls; with model.direct_input "both" (the default since), 98 layout in both. For comparison, the model of commit fb4df0c (SDPA attention, autocast norms),
forward and backward only, of a 3-level model of the same size (mults 1 2 4): 73 activation layout
copies in fp32, and 410 activation copies in bf16.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COUNT = r"""
import dataclasses, json, sys
import torch
sys.path.insert(0, "tests")
from conftest import square_batches, tiny_config
from evdm.config import ModelConfig
from evdm.models.blocks import TemporalAttention, ChannelNorm, GroupNorm
from evdm.train import make_trainer, train_step
from bench.copies import count_copies

precision = sys.argv[1]
cfg = tiny_config()
cfg = dataclasses.replace(cfg, model=ModelConfig(base_channels=8, channel_mults=(1, 2, 2), res_blocks=2,
                                                 temporal_attn_levels=(1, 2), attn_head_channels=4),
                          train=dataclasses.replace(cfg.train, precision=precision))
trainer = make_trainer(cfg, torch.device("cpu"))
batches = square_batches(cfg)
train_step(trainer, batches, 0)  # first-call allocations out of the way
calls = {"norm": 0, "attention": 0}
for m in trainer.denoiser.net.modules():
    kind = "norm" if isinstance(m, (GroupNorm, ChannelNorm)) else "attention" if isinstance(m, TemporalAttention) else None
    if kind:
        m.register_forward_hook(lambda *args, kind=kind: calls.__setitem__(kind, calls[kind] + 1))
count = count_copies(lambda: train_step(trainer, batches, 1), trainer.denoiser.net)
print(json.dumps(dict(calls, **count.as_dict())))
"""


def count(precision: str) -> dict:
    # A subprocess: ONEDNN_MAX_CPU_ISA must be set before torch loads (oneDNN's AMX bf16 kernels can hang).
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", COUNT, precision], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_copies_activations_within_the_stated_bound(precision):
    c = count(precision)
    assert c["norm"] > 50 and c["attention"] > 5  # the step really ran the model
    assert 0 < c["layout"] <= 8 * c["attention"] + 24, c
    if precision == "fp32":
        assert c["dtype"] <= 2, c
    else:
        assert c["params"] > c["dtype"] > 0, c  # autocast really cast weights and activations
        assert c["dtype"] <= c["norm"] + 2 * c["attention"] + 16, c
