"""Count the tensor copies a training step makes: layout changes and dtype conversions of activations.

On an H200, copies were 28% of an eager bf16 training step (`aten::copy_`, `clone`, `contiguous`,
`_to_copy`: 1,323 a step) before the norms and the attention kept the channels-last layout and the
activations' dtype (evdm.models.blocks). `count_copies` runs a function under
a dispatch mode and classifies every copy op the model's code (and autograd, for the backward)
dispatches, so a test can bound them on a CPU and bench/gpu_check.py can report them on a GPU,
where the same ops run. Copies of parameter-shaped tensors (autocast's weight casts, gradients
cast back to fp32, gradient accumulation) are counted apart: they scale with the parameter count,
not with the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
COPY_OPS = {_aten.copy_.default: "copy_", _aten.clone.default: "clone", _aten._to_copy.default: "_to_copy"}


@dataclass
class CopyCount:
    """Copies seen while the counted function ran, by kind.

    layout: activation copies that keep the dtype (a layout change, `.contiguous()`, `copy_`);
    dtype: activation conversions to another dtype; params: copies of parameter-shaped tensors.
    by_op: (op name, "layout" | "dtype" | "params") -> count.
    """

    layout: int = 0
    dtype: int = 0
    params: int = 0
    by_op: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"layout": self.layout, "dtype": self.dtype, "params": self.params,
                "by_op": {f"{op} {kind}": n for (op, kind), n in sorted(self.by_op.items())}}


class _CopyCounter(TorchDispatchMode):
    def __init__(self, param_shapes: set[tuple[int, ...]], count: CopyCount) -> None:
        super().__init__()
        self.param_shapes, self.count = param_shapes, count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = COPY_OPS.get(func)
        if name is not None:
            src, dst = (args[1], args[0]) if name == "copy_" else (args[0], out)
            if tuple(dst.shape) in self.param_shapes:
                kind = "params"
            else:
                kind = "layout" if src.dtype == dst.dtype else "dtype"
            setattr(self.count, kind, getattr(self.count, kind) + 1)
            self.count.by_op[name, kind] += 1
        return out


def count_copies(fn: Callable[[], object], model: torch.nn.Module) -> CopyCount:
    """Run fn() (e.g. one forward + backward) and count the copies it dispatches, classified against
    `model`'s parameter shapes. Works on any device (the dispatch mode sees the ops, not the kernels:
    a kernel's own internal conversions, like CUDA group_norm's, do not show; gpu_check's profile does)."""
    count = CopyCount()
    with _CopyCounter({tuple(p.shape) for p in model.parameters()}, count):
        fn()
    return count
