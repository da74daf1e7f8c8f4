"""Live training display: a rich progress bar with stats on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def format_stats(stats: dict) -> dict[str, str]:
    """Human-readable values for the known stats keys; missing keys are left out."""
    fmt = {
        "epoch": lambda v: f"{v:.2f}",
        "loss": lambda v: f"{v:.4f}",
        "val_loss": lambda v: f"{v:.4f}",
        "lr": lambda v: f"{v:.2e}",
        "grad_norm": lambda v: f"{v:.3f}",
        "samples_per_s": lambda v: f"{v:.1f}",
        "tflops": lambda v: f"{v:.1f} TFLOP/s",
        "mfu": lambda v: f"{100 * v:.1f}% MFU",
        "data_wait": lambda v: f"{100 * v:.1f}%",
        "gpu_mem_gb": lambda v: f"{v:.2f} GiB",
    }
    return {k: f(stats[k]) for k, f in fmt.items() if stats.get(k) is not None}


class Dashboard:
    """Shows step, ETA, samples/s, smoothed loss, val loss, lr, data-wait % and GPU memory.

    Use as a context manager; `enabled=False` (non-zero ranks) makes every call a no-op.
    """

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console()
        self.live_mode = enabled and self.console.is_terminal
        self.total_steps = total_steps
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.stats: dict = {}
        if self.live_mode:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        shown = format_stats(self.stats)
        table.add_row(*[f"[dim]{k}[/] {v}" for k, v in shown.items()] or ["[dim]waiting for the first log step[/]"])
        return Group(self.progress, table)

    def __enter__(self) -> "Dashboard":
        if self.live_mode:
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live_mode:
            self.live.__exit__(*exc)

    def update(self, step: int, stats: dict) -> None:
        """Called at log time with the latest reduced stats."""
        if not self.enabled:
            return
        self.stats.update({k: v for k, v in stats.items() if v is not None})
        if self.live_mode:
            self.progress.update(self.task, completed=step)
            self.live.update(self._render())
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {v}" for k, v in format_stats(self.stats).items()]
        parts.append(f"eta {eta:.0f}s")
        self.console.print(" | ".join(parts), highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)
