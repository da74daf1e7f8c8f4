"""WebDataset shards -> uint8 [B, C, T, H, W] training batches; the fixed validation clips.

Each (DDP rank, DataLoader worker) reads a disjoint slice of the shard list (`shard_slice`),
reshuffled each epoch-equivalent pass with a seed shared by all ranks, and cycles it forever. A
worker indexes a shard's tar headers in one loop (evdm.shards): no tarfile, np.load or per-sample
dicts. Clips go through a shuffle buffer and are read, one copy each, straight into shared-memory
batch slots (`BatchRing`) that the main process copies out. Batches are
[B, C, T, H, W] views of [B, T, H, W, C] buffers -- exactly the channels_last_3d layout -- so no one
permutes bytes; float conversion, scaling to [-1, 1] and flips happen on the device
(evdm.denoiser.Denoiser.to_input).
The per-reader stream, its exact resume (`start_batch`) and the skipping of damaged shards live in
evdm.stream; this module builds it for the trainer and checks shards against manifest.json.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader

from evdm.config import ConfigError, RunConfig
from evdm.preemption import ignore_stop_signals, stop_signals_blocked
from evdm.schema import clip_shape
from evdm.shards import REMOTE_PREFIXES, expand_urls, iter_clips, manifest_beside, peek_clip_shape
from evdm.shards import shard_slice  # noqa: F401  (re-exported: part of this module's API)
from evdm.stream import DAMAGE, BatchRing, ShardClipStream, _BatchPool, damage_reason, warn

_PREFETCH_TICKETS = 2  # per DataLoader worker
_CHUNK_BYTES = 8 << 20  # batches per worker ticket: up to this many bytes, at most 16


# ---- batching ---------------------------------------------------------------------------------


def stack_clips(clips: list[np.ndarray]) -> torch.Tensor:
    """[T, H, W, C] uint8 arrays -> uint8 [B, C, T, H, W], a channels_last_3d view (one copy per clip)."""
    out = torch.empty((len(clips), *clips[0].shape), dtype=torch.uint8)
    np.stack(clips, out=out.numpy())
    return out.permute(0, 4, 1, 2, 3)


# ---- the trainer's API ------------------------------------------------------------------------


def expected_clip_shape(cfg: RunConfig) -> tuple[int, int, int, int]:
    d = cfg.data
    return clip_shape(d.T, d.size, d.color_mode)


def check_shards(cfg: RunConfig) -> None:
    """Raise ConfigError unless train and val shards exist and hold clips of the configured shape.

    Reads manifest.json beside the first shard when present, else peeks the first clip.
    """
    expected = expected_clip_shape(cfg)
    for key in ("train_shards", "val_shards"):
        spec = getattr(cfg.data, key)
        try:
            urls = expand_urls(spec)
        except ConfigError as err:
            raise ConfigError(f"data.{key}: {err}") from None
        manifest = manifest_beside(urls[0])
        if manifest is not None:
            info = json.loads(manifest.read_text())
            found, where = tuple(info.get("clip_shape", ())), str(manifest)
            stride = info.get("options", {}).get("frame_stride")
            if stride is not None and stride != cfg.data.frame_stride:
                raise ConfigError(
                    f"{manifest}: shards made with frame_stride={stride}, data.frame_stride={cfg.data.frame_stride}"
                )
        else:
            found, where = _peek_first_readable(urls, key)
        if found != expected:
            raise ConfigError(
                f"{where}: shard clips have shape [T, H, W, C] = {list(found)}, but data.T={cfg.data.T}, "
                f"data.size={cfg.data.size}, data.color_mode={cfg.data.color_mode!r} "
                f"(data.{key}) expect {list(expected)}"
            )


def _peek_first_readable(urls: list[str], key: str) -> tuple[tuple[int, ...], str]:
    """(clip shape, url) of the first shard that can be read; damaged ones are the loader's to skip and name."""
    reasons = []
    for url in urls:
        try:
            return tuple(peek_clip_shape(url)), url
        except DAMAGE as err:
            reasons.append(f"{url}: {damage_reason(url, err)}")
    raise ConfigError(f"data.{key}: no shard can be read (e.g. {reasons[0]})")


def _manifest_entries(manifest: Path) -> list[dict]:
    """Every shard entry ({"name", "clips", "sha256", "bytes"}) of every split in manifest.json."""
    return [s for split in json.loads(manifest.read_text()).get("splits", {}).values() for s in split.get("shards", [])]


def _listed_shards(spec: str | list[str]) -> tuple[Path | None, list[dict]]:
    """(manifest.json, its shard entries that the local patterns of `spec` name, whether or not the files exist)."""
    manifest = manifest_beside(expand_urls(spec)[0])
    if manifest is None:
        return None, []
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns = [os.path.normpath(u) for item in items for u in braceexpand.braceexpand(item)
                if not u.startswith(REMOTE_PREFIXES)]
    entries = _manifest_entries(manifest)
    listed = [s for s in entries
              if any(fnmatch.fnmatchcase(os.path.normpath(manifest.parent / s["name"]), p) for p in patterns)]
    return manifest, listed


def train_clip_count(cfg: RunConfig) -> int | None:
    """Clips in the train split per manifest.json beside the train shards (None when unknown: remote, no manifest)."""
    urls = expand_urls(cfg.data.train_shards)
    manifest = manifest_beside(urls[0])
    if manifest is None:
        return None
    names = {Path(u).name for u in urls}
    return sum(s["clips"] for s in _manifest_entries(manifest) if s["name"] in names) or None


def shard_list_identity(spec: str | list[str]) -> str:
    """A short sha256 naming the train shard list, to tell on --resume whether it is still the one trained on:
    of each shard's manifest.json entry (name, clips, sha256) in list order, or of the expanded urls when
    there is no manifest. Re-sharding (other clips, other contents) or another pattern changes it."""
    urls = expand_urls(spec)
    manifest = manifest_beside(urls[0])
    if manifest is None:
        items: list = urls
    else:
        entries = {s["name"]: s for s in _manifest_entries(manifest)}
        items = [[Path(u).name, *(entries.get(Path(u).name, {}).get(k) for k in ("clips", "sha256"))] for u in urls]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def manifest_problems(spec: str | list[str]) -> list[str]:
    """"name (what is wrong)" for each shard manifest.json lists under `spec` that is missing, empty or of
    another size than the manifest's `bytes` (older manifests record no size: existence only)."""
    manifest, listed = _listed_shards(spec)
    problems = []
    for entry in listed:
        path = manifest.parent / entry["name"]
        size = path.stat().st_size if path.is_file() else None
        if size is None:
            problems.append(f"{entry['name']} (missing)")
        elif size == 0 or entry.get("bytes", size) != size:
            want = f", manifest says {entry['bytes']}" if "bytes" in entry else ""
            problems.append(f"{entry['name']} ({size} bytes{want})")
    return problems


def _manifest_digests(urls: list[str]) -> dict[str, str]:
    """url -> sha256 from manifest.json for data.verify_shards; ConfigError when there is no manifest to check against."""
    manifest = manifest_beside(urls[0])
    if manifest is None:
        raise ConfigError(f"data.verify_shards = true needs manifest.json beside {urls[0]} (local shards only)")
    entries = _manifest_entries(manifest)
    by_path = {os.path.normpath(manifest.parent / s["name"]): s["sha256"] for s in entries if s.get("sha256")}
    return {u: by_path[os.path.normpath(u)] for u in urls if os.path.normpath(u) in by_path}


class TrainBatches:
    """The trainer's infinite iterator of uint8 [B, C, T, H, W] batches, and `skipped_shards`: the skip
    events of damaged shards in this rank's readers so far (a damaged shard counts once per pass that deals it)."""

    def __init__(self, dataset: ShardClipStream | None, batches: Iterator[torch.Tensor],
                 worker_skipped: dict[int, int] | None = None) -> None:
        self._dataset, self._batches = dataset, batches
        # Filled from the workers' tickets as they arrive (the same dict object the ticket reader fills).
        self.worker_skipped = worker_skipped if worker_skipped is not None else {}

    @property
    def skipped_shards(self) -> int:
        if self.worker_skipped:
            return sum(self.worker_skipped.values())
        return self._dataset.skipped_shards if self._dataset is not None else 0

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._batches)


def make_train_loader(
    cfg: RunConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0, start_batch: int = 0
) -> TrainBatches:
    """Infinite iterator of uint8 [B, C, T, H, W] batches (B = train.batch_size) for this rank, from batch `start_batch`.

    Batches are channels_last_3d views of [B, T, H, W, C] buffers, in pinned memory when CUDA is present.

    `seed` drives the sample shuffle; the shard partition uses train.seed, equal on every rank, so
    ranks stay disjoint even when `seed` differs per rank. The stream is a function of (train.seed,
    seed, rank, worker, batches consumed): with `start_batch = s` it yields exactly batches s, s+1, ...
    of a fresh stream with the same data.num_workers and world_size (evdm.stream). data.loader =
    "dali" dispatches to DALI, whose resume restarts its reader instead.
    """
    d = cfg.data
    if d.loader == "dali":
        from evdm.dali_loader import make_dali_train_loader

        if start_batch and rank == 0:
            warn("data.loader = 'dali' cannot fast-forward: the resumed run restarts DALI's shard order "
                 "and sees other clips than a straight run would")
        return TrainBatches(None, make_dali_train_loader(cfg, rank=rank, world_size=world_size, seed=seed))
    urls = expand_urls(d.train_shards)
    problems = manifest_problems(d.train_shards)
    if problems and rank == 0:
        warn(f"manifest.json lists {len(problems)} train shard(s) that are missing or of the wrong size: "
             + ", ".join(problems))
    readers = world_size * max(d.num_workers, 1)
    if len(urls) < readers:
        warnings.warn(
            f"data.train_shards: {len(urls)} shard(s) for {world_size} rank(s) x {max(d.num_workers, 1)} "
            f"worker(s); every reader will read every shard and keep 1 clip in {readers}. "
            f"Write at least {readers} shards (preprocess.shard --shard-size) to read each shard once.",
            stacklevel=2,
        )
    pin = torch.cuda.is_available()
    batch_shape = (cfg.train.batch_size, *expected_clip_shape(cfg))
    ring = None
    if d.num_workers > 0:
        ring = BatchRing(d.num_workers, batch_shape, prefetch=_PREFETCH_TICKETS, chunk_bytes=_CHUNK_BYTES)
    dataset = ShardClipStream(
        urls, batch_size=cfg.train.batch_size, expected_shape=expected_clip_shape(cfg), rank=rank,
        world_size=world_size, partition_seed=cfg.train.seed, sample_seed=seed, shuffle_buffer=d.shuffle_buffer,
        ring=ring, pin=pin, start_batch=start_batch, digests=_manifest_digests(urls) if d.verify_shards else None,
    )
    if ring is None:
        return TrainBatches(dataset, iter(dataset))
    loader = DataLoader(dataset, batch_size=None, num_workers=d.num_workers, prefetch_factor=_PREFETCH_TICKETS,
                        worker_init_fn=ignore_stop_signals)  # preemption signals are the main process's
    skipped: dict[int, int] = {}
    batches = _batches_from_ring(loader, ring, _BatchPool(batch_shape, pin=pin), skipped, drop=start_batch % ring.chunk)
    return TrainBatches(dataset, batches, skipped)


def _batches_from_ring(
    loader: DataLoader, ring: BatchRing, pool: _BatchPool, skipped: dict[int, int], *, drop: int
) -> Iterator[torch.Tensor]:
    """Batches out of the workers' tickets; `drop`: leading batches a resume has already trained on."""
    with stop_signals_blocked():  # the workers fork here (see evdm.preemption)
        tickets = iter(loader)
    try:
        for ticket in tickets:
            if isinstance(ticket, str):
                raise ConfigError(ticket)
            worker, first, count, skipped[worker] = ticket
            for i in range(count):
                if drop:
                    ring.drop(worker, (first + i) % ring.slots)
                    drop -= 1
                else:
                    yield ring.take(worker, (first + i) % ring.slots, pool)
    finally:  # closed or dropped: free the workers waiting on a full ring, so the loader can shut down
        ring.close()


def load_val_clips(cfg: RunConfig) -> torch.Tensor:
    """The fixed val subset: uint8 [N, C, T, H, W], the first N = min(val_clips, available) clips in sorted shard order."""
    expected = expected_clip_shape(cfg)
    clips: list[np.ndarray] = []
    for url in sorted(expand_urls(cfg.data.val_shards)):
        try:
            found = list(itertools.islice(iter_clips(url), cfg.data.val_clips - len(clips)))
        except DAMAGE as err:  # a damaged val shard is left out whole, like a train shard
            warn(f"skipping val shard {url}: {damage_reason(url, err)}")
            continue
        for key, clip in found:
            if clip.shape != expected:
                raise ConfigError(f"{url}: sample {key} has clip shape {clip.shape}, config expects {expected}")
        clips += [clip for _, clip in found]
        if len(clips) >= cfg.data.val_clips:
            break
    if not clips:
        raise ConfigError(f"data.val_shards {cfg.data.val_shards!r}: the val shards hold no clips")
    return stack_clips(clips)
