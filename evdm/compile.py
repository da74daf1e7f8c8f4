"""torch.compile for the U-Net: its blocks compiled regionally, with dynamic shapes, cached on disk.

Compiling the whole reference model took 124-198 s on an H200 before its first step, and every new
batch size traced it again. The U-Net is a few kinds of blocks repeated at several widths and
resolutions, so each block *class* is compiled instead (PyTorch's "regional compilation" recipe), with
symbolic shapes: one graph (forward and backward) per kind of block and width serves every resolution
and batch size, so a batch change or the validation's short last batch costs no new compile. The
glue between blocks (stem, down/up-sampling convolutions, skip concatenation) stays eager: a few
dozen cuDNN and elementwise calls. Inductor's caches (FX graphs, AOTAutograd, kernels) go to a folder
the run owns (`cache_in`), so a resumed run finds them and compiles in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.fx.experimental._config

from evdm.models.attention import TemporalAttention
from evdm.models.blocks import ResBlock3D
from evdm.models.conditioning import EncoderBlock, EndpointFusion

# The blocks compiled one graph per class (and per variant: 1x1 skip or not, training or not).
REGIONS = (ResBlock3D, TemporalAttention, EncoderBlock, EndpointFusion)
# Graphs Dynamo may keep per block class: variants x grad mode x sizes it must specialise (size 1).
RECOMPILE_LIMIT = 64
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_regions(net: torch.nn.Module, *, dynamic_widths: bool = False) -> int:
    """Compile every REGIONS block of `net` in place (fullgraph, dynamic shapes); returns how many.

    In place: the state dict keeps its names (no `_orig_mod.`), DDP can wrap the net as usual, and an
    uncompiled copy (the EMA) is unaffected. Sizes a parameter fixes (the channel counts) are static:
    each width of a block compiles once, and batch size and resolution stay symbolic. dynamic_widths:
    the channel counts too are symbolic, one graph per kind of block; Inductor's C++ backend fails on
    some of those graphs here (a symbolic comparison in the convolution's layout code), so it is
    off by default and bench/gpu_check.py times it on the GPU. Sets torch._dynamo's recompile limit,
    whether sizes from parameters and module attributes are static, and duck shaping, for the process.
    """
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    config.force_parameter_static_shapes = config.force_nn_module_property_static_shapes = not dynamic_widths
    # Duck shaping gives equal sizes one symbol: a batch of 2 beside the 2 observed frames (a static
    # size) would specialise the batch, and the next batch size would compile everything again.
    torch.fx.experimental._config.use_duck_shape = False
    count = 0
    for module in net.modules():
        if isinstance(module, REGIONS):
            module.compile(fullgraph=True, dynamic=True)
            count += 1
    return count


def cache_in(folder: str | Path) -> Path:
    """Keep Inductor's compile caches in `folder` (unless TORCHINDUCTOR_CACHE_DIR is set already, which
    wins); call before the first compile of the process. Returns the folder in use."""
    os.environ.setdefault(CACHE_ENV, str(Path(folder).resolve()))
    return Path(os.environ[CACHE_ENV])
