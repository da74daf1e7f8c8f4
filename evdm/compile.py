"""torch.compile for the U-Net: its blocks compiled regionally, with a symbolic batch, cached on disk.

Compiling the whole reference model took 124-198 s on an H200 before its first step, and every new
batch size traced it again. The U-Net is a few kinds of blocks repeated at several widths and
resolutions, so each block is compiled instead (PyTorch's "regional compilation" recipe): instances
of one kind at one width and resolution share a graph (forward and backward), and the batch is
symbolic in every graph, so a batch change or the validation's short last batch compiles nothing new.
Channels and resolution stay static: with symbolic sizes there, channels-last strides become symbolic
products that Inductor cannot order (`get_stride_order`: "cannot determine truth value of Relational",
seen here on the training step). The glue between blocks (stem, down/up-sampling convolutions, skip
concatenation) stays eager: a few dozen cuDNN and elementwise calls. Inductor's caches (FX graphs,
AOTAutograd, kernels) go to a folder the run owns (`cache_in`), so a resumed run compiles in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.fx.experimental._config

from evdm.models.blocks import ResBlock3D, TemporalAttention
from evdm.models.conditioning import EncoderBlock, EndpointFusion

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
    for the process.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    torch._dynamo.config.automatic_dynamic_shapes = False
    # Duck shaping gives equal sizes one symbol: a batch of 2 beside the 2 observed frames (a static
    # size) would specialise the batch, and the next batch size would compile everything again.
    torch.fx.experimental._config.use_duck_shape = False
    count = 0
    for module in net.modules():
        if isinstance(module, REGIONS):
            module.forward = batch_symbolic(torch.compile(module.forward, fullgraph=True))
            count += 1
    return count


def batch_symbolic(compiled):
    """`compiled` called with dim 0 (the batch) of its tensor arguments marked dynamic, the rest static."""
    def forward(*args):
        for a in args:
            if isinstance(a, torch.Tensor) and a.ndim:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return compiled(*args)

    return forward


def cache_in(folder: str | Path) -> Path:
    """Keep Inductor's compile caches in `folder` (unless TORCHINDUCTOR_CACHE_DIR is set already, which
    wins); call before the first compile of the process. Returns the folder in use."""
    os.environ.setdefault(CACHE_ENV, str(Path(folder).resolve()))
    return Path(os.environ[CACHE_ENV])
