"""Deterministic, atomic WebDataset shard writing, shared by preprocess.shard and preprocess.bair."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path
from typing import Iterable

from evdm.atomic import atomic_write
from evdm.data.manifest import Manifest, ShardEntry, Split

SPLITS = ("train", "val")  # the manifest's splits, in its order


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    # Fixed metadata so the same samples give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shard(path: str | Path, samples: Iterable[dict[str, bytes | str]]) -> tuple[int, str]:
    """Write samples ({"__key__": str, ext: bytes, ...}) to a tar at `path`; return (count, sha256).

    Written to `path.tmp`, fsynced, then renamed: a crash never leaves a half-written shard
    under the final name.
    """
    count, digest = 0, ""

    def write(tmp: Path) -> None:
        nonlocal count, digest
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    tar.addfile(*_tar_member(f"{key}.{ext}", sample[ext]))
                count += 1
        digest = sha256_file(tmp)

    atomic_write(path, write, fsync=True)
    return count, digest


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: str | Path, text: str) -> None:
    """Write text to `path` via a temporary name, fsync and rename."""
    atomic_write(path, lambda tmp: tmp.write_text(text), fsync=True)


def split_entries(records: Iterable[dict]) -> dict[str, Split]:
    """The manifest's splits from per-shard records ({"name", "split", "videos", "clips", "sha256"}) in shard order."""
    totals = {split: [0, 0, []] for split in SPLITS}
    for r in records:
        entry = totals[r["split"]]
        entry[0] += r["videos"]
        entry[1] += r["clips"]
        if r["clips"]:  # a shard whose every video was skipped is never written
            entry[2].append(ShardEntry(name=r["name"], clips=r["clips"], sha256=r["sha256"]))
    return {split: Split(videos, clips, tuple(shards)) for split, (videos, clips, shards) in totals.items()}


def rate_label(fps: float | None) -> str:
    """A frame rate as a histogram key: "25", "29.97", or "unknown"."""
    return "unknown" if fps is None else f"{fps:.2f}".rstrip("0").rstrip(".")


def rate_histogram(rates: Iterable[float | None]) -> dict[str, int]:
    """{rate label: videos}, slowest first (unknown last)."""
    counts: dict[str, int] = {}
    for fps in sorted(rates, key=lambda r: (r is None, r or 0.0)):
        counts[rate_label(fps)] = counts.get(rate_label(fps), 0) + 1
    return counts


def write_manifest(
    shard_dir: str | Path,
    *,
    options: dict,
    clip_shape: tuple[int, ...],
    splits: dict[str, Split],
    skipped: list[dict],
    sources: list[dict] | None = None,
    scan: dict | None = None,
) -> Manifest:
    """Write SHARD_DIR/manifest.json atomically (last, after every shard) and return it.

    Each shard entry gains "bytes", the file's size, here. skipped: [{"path": rel path, "reason": str}];
    sources: [{"path", "split", "fps", ...}] per usable video, with "source_fps" (their rates'
    histogram); scan: what the scan found and left out. The last two are optional (evdm.data.manifest).
    """
    sized = {name: dataclasses.replace(split, shards=tuple(
        dataclasses.replace(s, bytes=(Path(shard_dir) / s.name).stat().st_size) if (Path(shard_dir) / s.name).is_file()
        else s for s in split.shards)) for name, split in splits.items()}
    manifest = Manifest(options=options, clip_shape=tuple(clip_shape), splits=sized, skipped=skipped, sources=sources,
                        source_fps=None if sources is None else rate_histogram([s["fps"] for s in sources]), scan=scan)
    manifest.write(shard_dir)
    return manifest
