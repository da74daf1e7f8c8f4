"""What a run reports: the live dashboard, metrics.jsonl, loss.png, TensorBoard events, previews, and MFU (model
FLOP/s per GPU over its dense bf16 peak; the FLOPs counted, not estimated: docs/GUIDE.md, Design notes)."""

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from evdm import visualize
from evdm.atomic import atomic_write, disk_full_as_error
from evdm.config import ConfigError, RunConfig
from evdm.denoiser import Denoiser
from evdm.models import build_model

_STAT_FORMATS = {"epoch": "{:.2f}", "loss": "{:.4f}", "val_loss": "{:.4f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
                 "samples_per_s": "{:.1f}", "tflops": "{:.1f} TFLOP/s", "mfu": "{:.1%} MFU", "data_wait": "{:.1%}",
                 "gpu_mem_gb": "{:.2f} GiB"}


def format_stats(stats: dict) -> dict[str, str]:
    """Human-readable values for the known stats keys; missing keys are left out."""
    return {k: f.format(stats[k]) for k, f in _STAT_FORMATS.items() if stats.get(k) is not None}


class Dashboard:
    """Shows step, ETA, samples/s, loss, val loss, lr, data-wait % and GPU memory: a rich progress bar
    on a terminal, plain log lines otherwise. A context manager; `enabled=False` makes every call a no-op."""

    def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console()
        self.live_mode = enabled and self.console.is_terminal
        self.total_steps, self.start_step, self.start_time = total_steps, start_step, time.perf_counter()
        self.stats: dict = {}
        self.live: contextlib.AbstractContextManager = contextlib.nullcontext()
        if self.live_mode:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                     TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step)
            self.live = Live(self._render(), console=self.console, refresh_per_second=4)

    def _render(self) -> Group:
        table = Table.grid(padding=(0, 2))
        shown = [f"[dim]{k}[/] {v}" for k, v in format_stats(self.stats).items()]
        table.add_row(*shown or ["[dim]waiting for the first log step[/]"])
        return Group(self.progress, table)

    def __enter__(self) -> "Dashboard":
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
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
        parts = [f"step {step}/{self.total_steps}", *(f"{k} {v}" for k, v in format_stats(self.stats).items())]
        self.console.print(" | ".join(parts + [f"eta {eta:.0f}s"]), highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)


def append_metrics(path: str | Path, record: dict) -> None:
    """Append one JSON line, flushed; on a full disk, DiskFullError and the file cut back to its whole lines."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    with disk_full_as_error(path, cleanup=lambda: os.truncate(path, size) if path.exists() else None):
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines() if Path(path).exists() else ():
        with contextlib.suppress(json.JSONDecodeError):  # a torn last line after a crash
            records.append(json.loads(line))
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Drop records past `last_step` (those a resumed run will redo)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write(path, lambda tmp: tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records)))


def plot_losses(records: list[dict], path: str | Path) -> None:
    """Train and val loss against step (log y axis) as a PNG, atomically. Agg canvas, no pyplot: no GUI backend."""
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, label, style in (("loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and r[key] > 0]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set(yscale="log", xlabel="step", ylabel="loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), keep_extension=True)


def check_tensorboard() -> None:
    """ConfigError (how to install) when train.tensorboard is on but tensorboard is missing."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
    except ImportError:
        raise ConfigError("train.tensorboard = true needs the tensorboard package: pip install tensorboard "
                          "(or pip install -e '.[tensorboard]')") from None


class TensorBoardLog:
    """TensorBoard logs under `log_dir`: metrics.jsonl's numbers as scalars, previews as images; `enabled=False`:
    no-ops. purge_step: a resumed run's first new step; events a crashed run logged from there on are hidden."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def scalars(self, record: dict) -> None:
        for key, value in record.items() if self.writer is not None else ():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["step"])

    def image(self, tag: str, png: str | Path, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(Image.open(png).convert("RGB")), step, dataformats="HWC")


PREVIEW_SEED = 4321


@torch.no_grad()
def write_preview(denoiser: Denoiser, val_u8: torch.Tensor, cfg: RunConfig, out_dir: str | Path,
                  step: int) -> list[Path]:
    """Sample the first `train.preview_clips` val clips (cfg.sample at train.preview_steps steps, eta 0) and
    write step_XXXXXXX.png (truth row over sample row per clip) and .mp4 (truth | sample) under out_dir;
    the MP4 is skipped, with one warning, when ffmpeg fails. val_u8: uint8 [N, C, T, H, W]. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = denoiser.net.training
    denoiser.eval()
    clips = val_u8[: cfg.train.preview_clips].permute(0, 2, 3, 4, 1).cpu().numpy()  # [B, T, H, W, C]
    starts, _, ends = cfg.context.split(clips, axis=1)
    settings = dataclasses.replace(cfg.sample, steps=cfg.train.preview_steps, eta=0.0)
    generator = torch.Generator(device=denoiser.device).manual_seed(PREVIEW_SEED)
    samples = denoiser.generate_u8(starts, ends, settings, generator=generator)
    denoiser.train(was_training)
    png, mp4 = (out_dir / f"step_{step:07d}.{ext}" for ext in ("png", "mp4"))
    strip, video, K = visualize.strip_scale(cfg.data.size), visualize.video_scale(cfg.data.size), cfg.context
    strips = [visualize.comparison_strip(truth, sample, K, scale=strip) for truth, sample in zip(clips, samples)]
    visualize.save_png(np.concatenate(strips, axis=0), png)
    # Video frame t: each clip's truth frame t next to its sample frame t, clips stacked vertically.
    frames = np.concatenate(list(np.concatenate([clips, samples], axis=3)), axis=1)  # [T, B*H, 2W, C]
    return [png, mp4] if visualize.try_save_video(frames, mp4, fps=visualize.FPS, scale=video) else [png]


# Dense bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets; the first name
# contained in torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1),
                    ("RTX 4090", 165.2))


def flops_per_sample(cfg: RunConfig) -> float:
    """Forward + backward FLOPs of one training sample at cfg's shapes (meta device, batch 1: costs are linear in B)."""
    (Ks, Ke), M, S, C = cfg.context, cfg.middle_frames, cfg.data.size, cfg.channels
    with torch.device("meta"):
        model = build_model(cfg)
        x_t, blend = torch.empty(1, C, M, S, S), torch.empty(1, C, M, S, S)
        start, end = torch.empty(1, C, Ks, S, S), torch.empty(1, C, Ke, S, S)
        t, drop = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        model(x_t, t, start, end, blend, drop).sum().backward()
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Dense bf16 peak TFLOP/s of `device`: `override` when > 0, else a known GPU's; None on CPU or unknown."""
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
