"""Benchmark the training loaders: clips/s delivered as uint8 [B, C, T, H, W] batches (B 8, T 8, 64x64 rgb).

    python bench/loader.py [--videos 500] [--seconds 10] [--work DIR] [--out bench/results/loader.json]

Rows, over one synthetic dataset (preprocess.synth MP4s, sharded by preprocess.shard):
  baseline   a torch Dataset that decodes a random T-frame window of one MP4 per item with an ffmpeg
             subprocess, DataLoader with 0 and 2 workers (the plain research loader);
  wds stock  the stock webdataset pipeline over the same shards:
             `wds.WebDataset(shards).shuffle(1000).decode().to_tuple("clip.npy").batched(8)`, through
             `wds.WebLoader` with 0 and 2 workers (what evdm's own reader is measured against);
  webdataset evdm.data.loader.make_train_loader, 0 and 2 workers;
  dali       evdm.data.dali in DALI's CPU-only mode (2 threads), where nvidia.dali is installed;
  ceiling    reading the same shard bytes from page cache into one reused 1 MiB buffer, one
             process, no parsing or decoding at all.
"x baseline" compares with the baseline row of the same parallelism (processes or threads). "CPU µs/clip"
(all processes and threads, warm-up included) is the figure least moved by a busy, shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from evdm.data.loader import make_train_loader  # noqa: E402
from evdm.data.schema import expand_urls  # noqa: E402
from evdm.data.shardset import ShardSet, open_checked  # noqa: E402
from evdm.config import from_dict  # noqa: E402
from evdm.data.dali import dali_available, dali_batches  # noqa: E402
from evdm.ffmpeg import ffmpeg_exe  # noqa: E402
from results_io import machine, write_result  # noqa: E402
from preprocess.shard import Options, run  # noqa: E402
from preprocess.synth import generate  # noqa: E402

B, T, SIZE, FRAMES = 8, 8, 64, 30
CLIP_BYTES = T * SIZE * SIZE * 3


class FFmpegClipDataset(Dataset):
    """The baseline: item i decodes a random T-frame window of video i with an ffmpeg subprocess."""

    def __init__(self, videos: list[Path], frames: int) -> None:
        self.videos, self.frames = videos, frames

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = int(np.random.randint(0, self.frames - T + 1))
        cmd = [ffmpeg_exe(), "-v", "error", "-i", str(self.videos[i]),
               "-vf", f"trim=start_frame={start}:end_frame={start + T},scale={SIZE}:{SIZE}",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
        raw = subprocess.run(cmd, capture_output=True, check=True).stdout
        clip = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(T, SIZE, SIZE, 3)
        return clip.permute(3, 0, 1, 2)  # [C, T, H, W]


def forever(make_loader):
    loader = make_loader()
    while True:
        yield from loader


def stock_webdataset(shards: list[str], workers: int, shuffle: int):
    """webdataset's own pipeline (tarfile reads, per-sample dicts, np.load decoding) -> uint8
    [B, C, T, H, W] batches like evdm's loader; shards are split across workers by the pipeline."""
    dataset = (wds.WebDataset(shards, shardshuffle=len(shards), empty_check=False).repeat()
               .shuffle(shuffle).decode().to_tuple("clip.npy").batched(B))
    for (clips,) in wds.WebLoader(dataset, batch_size=None, num_workers=workers):
        yield torch.as_tensor(clips).permute(0, 4, 1, 2, 3)


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (DataLoader workers, ffmpeg)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches, seconds: float, warmup: int) -> dict:
    """Clips/s over `seconds` after `warmup` batches; CPU per clip over the whole run, workers included."""
    cpu0 = _cpu_s()
    it = iter(batches)
    for _ in range(warmup):
        batch = next(it)
    assert batch.shape == (B, 3, T, SIZE, SIZE) and batch.dtype == torch.uint8, batch.shape
    clips, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        clips += next(it).shape[0]
    del it, batches, batch
    gc.collect()  # ends (and reaps) DataLoader workers before the next row
    cpu_us = (_cpu_s() - cpu0) / (clips + warmup * B) * 1e6
    return {"clips": clips, "seconds": round(elapsed, 3), "clips_per_s": clips / elapsed,
            "mb_per_s": clips * CLIP_BYTES / elapsed / 1e6, "cpu_us_per_clip": cpu_us}


def page_cache_ceiling(shards: list[str], clips_total: int, seconds: float) -> dict:
    """Read the shard files into one reused buffer, again and again: the I/O with zero work."""
    buf = bytearray(1 << 20)
    total_bytes = sum(os.path.getsize(s) for s in shards)
    passes, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or passes == 0:
        for s in shards:
            with open(s, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
        passes += 1
    elapsed = time.perf_counter() - t0
    return {"clips": clips_total * passes, "seconds": round(elapsed, 3), "clips_per_s": clips_total * passes / elapsed,
            "mb_per_s": total_bytes * passes / elapsed / 1e6, "cpu_us_per_clip": elapsed / (clips_total * passes) * 1e6}


def make_dataset(work: Path, videos: int, shard_size: int) -> tuple[list[Path], Path, int]:
    """Synthetic MP4s + shards under `work`, reused when already there; returns (mp4s, shard dir, clips)."""
    data_dir, shard_dir = work / "data", work / "shards"
    mp4s = sorted(data_dir.rglob("*.mp4"))
    if len(mp4s) != videos:
        generate(data_dir, videos=videos, val_fraction=0.0, frames=FRAMES, size=SIZE, seed=0, workers=2)
        mp4s = sorted(data_dir.rglob("*.mp4"))
    opts = Options(T=T, size=SIZE, shard_size=shard_size, val_fraction=0.0)  # every video in train shards
    summary = run(data_dir, shard_dir, opts, workers=2, overwrite=True)
    return mp4s, shard_dir, summary.clips


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per row (after warm-up)")
    p.add_argument("--shard-size", type=int, default=100, help="clips per shard (default 100)")
    p.add_argument("--work", type=Path, default=None, help="keep (and reuse) the dataset here")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loader.json")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/loader.py", *(sys.argv[1:] if argv is None else argv)])
    if args.videos < B:
        p.error(f"--videos must be at least the batch size {B}")
    torch.set_num_threads(1)
    console = Console(width=None if sys.stdout.isatty() else 120)
    load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was

    with tempfile.TemporaryDirectory(prefix="evdm-bench-loader-") as tmp:
        work = args.work or Path(tmp)
        t0 = time.perf_counter()
        mp4s, shard_dir, clips_total = make_dataset(work, args.videos, args.shard_size)
        dataset_s = time.perf_counter() - t0
        shards = expand_urls(str(shard_dir / "train-*.tar"))
        cfg = from_dict({"data": {"train_shards": shards, "val_shards": shards, "size": SIZE, "T": T},
                         "train": {"batch_size": B}})
        open_checked(cfg)
        rows = []

        def row(name: str, workers: str, parallel: int, result: dict) -> None:
            rows.append({"loader": name, "workers": workers, "parallel": parallel, **result})
            console.log(f"{name} {workers}: {result['clips_per_s']:.1f} clips/s")

        page_cache_ceiling(shards, clips_total, 0.0)  # warm the page cache
        for w in (0, 2):
            def baseline(w=w):
                return DataLoader(FFmpegClipDataset(mp4s, FRAMES), batch_size=B, shuffle=True, num_workers=w,
                                  drop_last=True, persistent_workers=w > 0)

            row("baseline (mp4 + ffmpeg per item)", str(w), max(w, 1), measure(forever(baseline), args.seconds, 2))
        for w in (0, 2):
            warmup = (cfg.data.shuffle_buffer // B + 2) * max(w, 1)
            row("wds stock pipeline (WebDataset + WebLoader)", str(w), max(w, 1),
                measure(stock_webdataset(shards, w, cfg.data.shuffle_buffer), args.seconds, warmup))
        for w in (0, 2):
            wcfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=w))
            warmup = (cfg.data.shuffle_buffer // B + 2) * max(w, 1)  # past the shuffle buffer's fill
            row("evdm webdataset shards", str(w), max(w, 1), measure(make_train_loader(wcfg, ShardSet.open(wcfg.data.train_shards, 'data.train_shards')), args.seconds, warmup))
        dali_note = "nvidia.dali not installed"
        if dali_available():
            dali_note = "DALI CPU-only mode (device_id=None), 2 threads"
            batches = dali_batches(shards, batch_size=B, device_id=None, shuffle_buffer=cfg.data.shuffle_buffer)
            row("dali shards (cpu)", "2 threads", 2, measure(batches, args.seconds, 4))
        row("ceiling (page-cache read, no decode)", "-", 1, page_cache_ceiling(shards, clips_total, args.seconds))

    base = {r["parallel"]: r["clips_per_s"] for r in rows if r["loader"].startswith("baseline")}
    ceiling = rows[-1]["clips_per_s"]
    for r in rows:
        r["x_baseline"] = r["clips_per_s"] / base[r["parallel"]]
        r["of_ceiling"] = r["clips_per_s"] / ceiling
    shard2 = next(r for r in rows if r["loader"].startswith("evdm") and r["workers"] == "2")
    goals = {"x_baseline_at_2_workers": round(shard2["x_baseline"], 1), "x_baseline_goal": 20,
             "of_ceiling_at_2_workers": round(shard2["of_ceiling"], 3), "of_ceiling_goal": 0.5}

    table = Table(title=f"training loaders: {args.videos} synthetic videos -> {clips_total} clips in "
                        f"{len(shards)} shards; batch {B}, T {T}, {SIZE}x{SIZE} rgb")
    for col in ["loader", "workers", "clips/s", "MB/s", "x baseline", "of ceiling", "CPU µs/clip"]:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["loader"], r["workers"], f"{r['clips_per_s']:.1f}", f"{r['mb_per_s']:.1f}",
                      f"{r['x_baseline']:.1f}x", f"{100 * r['of_ceiling']:.1f}%", f"{r['cpu_us_per_clip']:.0f}")
    console.print(table)
    console.print(f"dataset {dataset_s:.1f} s; {dali_note}; shard loader at 2 workers: "
                  f"{goals['x_baseline_at_2_workers']}x baseline (goal 20x), "
                  f"{100 * goals['of_ceiling_at_2_workers']:.0f}% of ceiling (goal 50%)")

    result = {
        "command": command, "videos": args.videos, "frames": FRAMES, "clips": clips_total, "shards": len(shards),
        "batch": B, "T": T, "size": SIZE, "seconds_per_row": args.seconds, "shuffle_buffer": cfg.data.shuffle_buffer,
        "dali": dali_note, **machine(load_before), "torch": torch.__version__, "goals": goals,
        "rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
