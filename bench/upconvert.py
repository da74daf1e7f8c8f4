"""Up-conversion rate: output frames/s of evdm.upconvert on a model of configs/upsample4x.toml's shape.

    python bench/upconvert.py                                    # batch 1 4 16, 10 DDIM steps, 33 input frames
    python bench/upconvert.py --video                            # and a row through the ffmpeg pipes
    python bench/upconvert.py --batch_sizes 2 --frames 3 --steps 1 --out ''     # smoke (seconds)

Each row up-converts a video of --frames random input frames at the model's size with
evdm.upconvert.upconvert_array (the window code `sample.py --video` runs), after an untimed warm-up
batch at the same shapes; untrained weights (the rate does not depend on them), fp32, guidance as the
config's (1.5: the network runs on twice the windows). frames/s counts the N output frames each
window adds (the first frame of a video is free). --video adds one row at the largest batch through
upconvert_video: decode, the model, encode (H.264), from and to files. Prints a rich table and
writes JSON (default bench/results/upconvert.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_video(cfg, frames: int):
    """uint8 [frames, size, size, C] of uniform noise (the rate does not depend on the pixels)."""
    import numpy as np

    shape = (frames, cfg.data.size, cfg.data.size, cfg.channels)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def measure(denoiser, cfg, *, batch: int, frames: int, steps: int) -> dict:
    """Time upconvert_array over `frames` input frames in windows batches of `batch`; one result row."""
    import torch

    from evdm.upconvert import factor_of, upconvert_array

    factor, video = factor_of(cfg), random_video(cfg, frames)
    sc = dataclasses.replace(cfg.sample, steps=steps)

    def run(frames_in, settings) -> float:
        if denoiser.device.type == "cuda":
            torch.cuda.synchronize(denoiser.device)
        t0 = time.perf_counter()
        upconvert_array(frames_in, denoiser, settings, batch_size=batch)
        if denoiser.device.type == "cuda":
            torch.cuda.synchronize(denoiser.device)
        return time.perf_counter() - t0

    run(video[: batch + 1], dataclasses.replace(sc, steps=1))  # warm-up: allocator, kernel selection (compile)
    seconds = run(video, sc)
    windows = frames - 1
    calls = math.ceil(windows / batch) * steps
    return dict(batch=batch, frames_in=frames, windows=windows, factor=factor, steps=steps, guidance=sc.guidance_scale,
                forward_batch=batch * (1 if sc.guidance_scale == 1.0 else 2), seconds=round(seconds, 3),
                frames_per_s=round(windows * factor / seconds, 2), windows_per_s=round(windows / seconds, 3),
                ms_per_model_call=round(1000 * seconds / calls, 2))


def measure_video(denoiser, cfg, *, batch: int, frames: int, steps: int) -> dict:
    """upconvert_video from an MP4 of `frames` random frames to another: the rate with ffmpeg's pipes around it."""
    from evdm.ffmpeg import write_mp4
    from evdm.upconvert import upconvert_video

    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=steps))
    with tempfile.TemporaryDirectory(prefix="evdm-bench-upconvert-") as tmp:
        source = Path(tmp) / "in.mp4"
        write_mp4(random_video(cfg, frames), source, fps=10)
        record = upconvert_video(source, Path(tmp) / "out.mp4", denoiser, cfg, batch_size=batch, progress=False)
    return dict(batch=batch, frames_in=frames, windows=frames - 1, factor=record["factor"], steps=steps,
                guidance=cfg.sample.guidance_scale, seconds=record["seconds"], frames_per_s=record["frames_per_s"],
                via="ffmpeg pipes")


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("path", "batch", "windows", "steps", "guidance", "s", "ms / model call", "output frames/s"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        table.add_row(r.get("via", "in memory"), str(r["batch"]), str(r["windows"]), str(r["steps"]),
                      f"{r['guidance']:g}", f"{r['seconds']:.2f}",
                      f"{r['ms_per_model_call']:.1f}" if "ms_per_model_call" in r else "-",
                      f"[bold]{r['frames_per_s']:.3g}[/]")
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/upsample4x.toml"), help="a context (1, 1) config (TOML)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16], help="windows per batch")
    p.add_argument("--frames", type=int, default=33, help="input frames (frames - 1 windows)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--video", action="store_true", help="add a row through ffmpeg's pipes (sample.py --video's path)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench/results/upconvert.json"), help="JSON output ('' for none)")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/upconvert.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]

    import torch

    from evdm.config import load_config
    from evdm.denoiser import Denoiser, resolve_device
    from evdm.models import count_parameters
    from results_io import machine, write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    denoiser = Denoiser(cfg, device, precision="fp32").eval()
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    rows = []
    for batch in args.batch_sizes:
        rows.append(measure(denoiser, cfg, batch=batch, frames=args.frames, steps=args.steps))
        print(f"batch {batch}: {rows[-1]['frames_per_s']} output frames/s", file=sys.stderr, flush=True)
    if args.video:
        rows.append(measure_video(denoiser, cfg, batch=max(args.batch_sizes), frames=args.frames, steps=args.steps))
    desc = (f"{Path(args.config).name} ({cfg.data.size} px, context {list(cfg.context)}, T {cfg.data.T}: "
            f"{cfg.data.T - 1}x the frame rate), {count_parameters(denoiser.net) / 1e6:.2f}M params")
    print_table(rows, f"Up-conversion on {label}: {desc}")
    if args.out:
        write_result(Path(args.out), dict(command=command, model=desc, device=label, torch=torch.__version__,
                                          threads=torch.get_num_threads(), **machine(load_before), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
