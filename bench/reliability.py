"""Benchmark what exact resume and shard verification cost: the stream's fast-forward, data.verify_shards.

    python bench/reliability.py [--clips 100000] [--verify-clips 2000] [--out bench/results/reliability.json]

fast-forward  `make_train_loader(start_batch=s)` over --clips tiny clips (T 8, 4x4 gray, no meta members:
              the fast-forward walks tar headers and the shuffle buffer but reads no pixels, so its cost
              follows the clip and shard count, not the clip size). Seconds to the first batch from
              start_batch 0 and from the last batch of the first pass, at 0 and 2 workers; the
              difference is what a resume at that point pays once.
verify_shards one pass over --verify-clips clips shaped like the loader benchmark's (B 8, T 8, 64x64 rgb,
              100 a shard) with data.verify_shards off and on, at 0 and 2 workers, page cache warm. Each
              reader hashes a shard once, in its first pass (the verdict is cached): later passes cost
              the same as without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evdm.data.loader import make_train_loader  # noqa: E402
from evdm.data.shardset import ShardSet  # noqa: E402
from evdm.config import from_dict  # noqa: E402
from evdm.data.schema import encode_clip  # noqa: E402
from results_io import machine, write_result  # noqa: E402
from preprocess.writer import split_entries, write_manifest, write_shard  # noqa: E402

B = 8


def write_dataset(shard_dir: Path, clips: int, shape: tuple[int, ...], per_shard: int) -> int:
    """`clips` random clips of `shape` in shards of `per_shard`, with manifest.json; returns the shard count."""
    rng = np.random.default_rng(0)
    records = []
    for s in range(0, clips, per_shard):
        name = f"train-{s // per_shard:06d}.tar"
        n = min(per_shard, clips - s)
        samples = [{"__key__": f"c{s + i:07d}", "clip.npy": encode_clip(rng.integers(0, 256, shape, np.uint8))}
                   for i in range(n)]
        _, sha = write_shard(shard_dir / name, samples)
        records.append({"name": name, "split": "train", "videos": 1, "clips": n, "sha256": sha})
    write_manifest(shard_dir, options={"frame_stride": 1}, clip_shape=shape, splits=split_entries(records), skipped=[])
    return len(records)


def config(shard_dir: Path, shape: tuple[int, ...], **data_overrides):
    T, size, _, channels = shape
    return from_dict({"data": {"train_shards": str(shard_dir / "train-*.tar"), "val_shards": str(shard_dir / "train-*.tar"),
                               "T": T, "size": size, "color_mode": "rgb" if channels == 3 else "gray",
                               **data_overrides},
                      "train": {"batch_size": B}})


def seconds_for(cfg, batches: int, start_batch: int = 0) -> float:
    """Seconds from building the loader to its `batches`-th batch (start-up and any fast-forward included)."""
    t0 = time.perf_counter()
    loader = make_train_loader(cfg, ShardSet.open(cfg.data.train_shards, 'data.train_shards'), start_batch=start_batch)
    for _ in range(batches):
        next(loader)
    elapsed = time.perf_counter() - t0
    del loader
    return elapsed


def fast_forward_rows(shard_dir: Path, clips: int, shape: tuple[int, ...]) -> list[dict]:
    rows = []
    start = clips // B - 1  # the last batch of the first pass: the longest replay within an epoch
    for workers in (0, 2):
        cfg = config(shard_dir, shape, num_workers=workers)
        seconds_for(cfg, 1)  # page cache and imports warm
        fresh = seconds_for(cfg, 1)
        resumed = seconds_for(cfg, 1, start)
        ff = max(resumed - fresh, 1e-9)
        rows.append({"workers": workers, "start_batch": start, "clip_refs": start * B, "first_batch_s": fresh,
                     "resumed_first_batch_s": resumed, "fast_forward_s": ff, "refs_per_s": start * B / ff})
        print(f"fast-forward {workers} workers: {start} batches ({start * B} clip refs) in {ff:.2f} s", flush=True)
    return rows


def verify_rows(shard_dir: Path, clips: int, shape: tuple[int, ...]) -> list[dict]:
    rows = []
    mb = sum(p.stat().st_size for p in shard_dir.glob("train-*.tar")) / 1e6
    for workers in (0, 2):
        for verify in (False, True):
            cfg = config(shard_dir, shape, num_workers=workers, verify_shards=verify)
            if not rows:
                seconds_for(cfg, clips // B)  # page cache warm
            seconds = seconds_for(cfg, clips // B)
            rows.append({"workers": workers, "verify_shards": verify, "pass_s": seconds,
                         "clips_per_s": clips // B * B / seconds, "mb_hashed": mb if verify else 0.0})
            print(f"verify_shards={verify} {workers} workers: {rows[-1]['clips_per_s']:.0f} clips/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=100_000, help="tiny clips for the fast-forward rows")
    p.add_argument("--verify-clips", type=int, default=2000, help="64x64 clips for the verify_shards rows")
    p.add_argument("--shard-size", type=int, default=100, help="clips per shard (default 100)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reliability.json")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/reliability.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    tiny, big = (8, 4, 4, 1), (8, 64, 64, 3)
    with tempfile.TemporaryDirectory(prefix="evdm-bench-reliability-") as tmp:
        ff_dir, verify_dir = Path(tmp, "ff"), Path(tmp, "verify")
        ff_dir.mkdir()
        verify_dir.mkdir()
        ff_shards = write_dataset(ff_dir, args.clips, tiny, args.shard_size)
        verify_shards = write_dataset(verify_dir, args.verify_clips, big, args.shard_size)
        ff = fast_forward_rows(ff_dir, args.clips, tiny)
        verify = verify_rows(verify_dir, args.verify_clips, big)
    result = {
        "command": command, "clips": args.clips, "shards": ff_shards, "verify_clips": args.verify_clips,
        "verify_shards": verify_shards, "shard_size": args.shard_size, "batch": B, **machine(load_before),
        "torch": torch.__version__,
        "fast_forward_rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in ff],
        "verify_rows": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in verify],
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
