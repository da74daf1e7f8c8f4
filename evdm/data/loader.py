"""WebDataset shards -> the trainer's uint8 [B, C, T, H, W] batches, views of [B, T, H, W, C] buffers (the
channels_last_3d layout: no one permutes bytes; Denoiser.to_input converts them on the device), and clips read in
order (the val subset, sample.py's and evaluate's inputs) under evdm.data.stream's damaged-shard policy."""

from __future__ import annotations

import itertools
import warnings
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from evdm.cli import warn
from evdm.config import ConfigError, RunConfig
from evdm.data.shardset import ShardSet, expected_clip_shape
from evdm.data.stream import BatchPool, BatchRing, ShardClipStream, ShardReader
from evdm.data.tar import read_clip
from evdm.preemption import ignore_stop_signals, stop_signals_blocked

_PREFETCH_TICKETS = 2  # per DataLoader worker
_CHUNK_BYTES = 8 << 20  # batches per worker ticket: up to this many bytes, at most 16


class TrainBatches:
    """The trainer's infinite iterator of uint8 [B, C, T, H, W] batches, and `skipped_shards`: the damaged
    shards this rank's readers skipped so far (once per pass that deals one)."""

    def __init__(self, dataset: ShardClipStream | None, batches: Iterator[torch.Tensor],
                 worker_skipped: dict[int, int] | None = None) -> None:
        self._dataset, self._batches = dataset, batches
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


def make_train_loader(cfg: RunConfig, train: ShardSet, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                      start_batch: int = 0) -> TrainBatches:
    """Infinite uint8 [B, C, T, H, W] batches (B = train.batch_size, pinned when CUDA is present) of the
    `train` shards for this rank, from batch `start_batch` of the fresh stream (exact resume). `seed` drives the
    sample shuffle; the shard partition uses train.seed, equal on every rank, so ranks stay disjoint.
    data.loader = "dali" dispatches to DALI, whose resume restarts its reader instead."""
    d = cfg.data
    if d.loader == "dali":
        from evdm.data.dali import make_dali_train_loader

        if start_batch and rank == 0:
            warn("data.loader = 'dali' cannot fast-forward: the resumed run restarts DALI's shard order "
                 "and sees other clips than a straight run would")
        return TrainBatches(None, make_dali_train_loader(cfg, train.urls, rank=rank, world_size=world_size, seed=seed))
    urls = train.urls
    if (problems := train.problems()) and rank == 0:
        warn(f"manifest.json lists {len(problems)} train shard(s) that are missing or of the wrong size: "
             + ", ".join(problems))
    readers = world_size * max(d.num_workers, 1)
    if len(urls) < readers:
        warnings.warn(f"data.train_shards: {len(urls)} shard(s) for {world_size} rank(s) x {max(d.num_workers, 1)} "
                      f"worker(s); every reader will read every shard and keep 1 clip in {readers}. "
                      f"Write at least {readers} shards (preprocess.shard --shard-size) to read each shard once.",
                      stacklevel=2)
    pin, clip_shape = torch.cuda.is_available(), expected_clip_shape(cfg)
    batch_shape = (cfg.train.batch_size, *clip_shape)
    ring = (BatchRing(d.num_workers, batch_shape, prefetch=_PREFETCH_TICKETS, chunk_bytes=_CHUNK_BYTES)
            if d.num_workers > 0 else None)
    dataset = ShardClipStream(urls, batch_size=cfg.train.batch_size, expected_shape=clip_shape, rank=rank,
                              world_size=world_size, partition_seed=cfg.train.seed, sample_seed=seed,
                              shuffle_buffer=d.shuffle_buffer, ring=ring, pin=pin, start_batch=start_batch,
                              digests=train.digests() if d.verify_shards else None)
    if ring is None:
        return TrainBatches(dataset, iter(dataset))
    loader = DataLoader(dataset, batch_size=None, num_workers=d.num_workers, prefetch_factor=_PREFETCH_TICKETS,
                        worker_init_fn=ignore_stop_signals)  # preemption signals are the main process's
    skipped: dict[int, int] = {}
    batches = _batches_from_ring(loader, ring, BatchPool(batch_shape, pin=pin), skipped, drop=start_batch % ring.chunk)
    return TrainBatches(dataset, batches, skipped)


def _batches_from_ring(loader: DataLoader, ring: BatchRing, pool: BatchPool, skipped: dict[int, int], *,
                       drop: int) -> Iterator[torch.Tensor]:
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


def read_clips(shards: ShardSet, shape: tuple[int, ...], limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(sample key, uint8 [T, H, W, C]) for the first `limit` clips (None: all) in sorted shard order;
    a shard is opened only when the clips before it did not reach `limit`."""
    reader = ShardReader(shape, who=shards.key)

    def keyed_refs() -> Iterator[tuple[str, object]]:
        for url in sorted(shards.urls):
            keys: list[str] = []
            refs = reader.refs(url, keys=keys) or []
            yield from zip(keys, refs)

    for key, ref in itertools.islice(keyed_refs(), limit):
        yield key, read_clip(ref, shape)


def load_val_clips(val: ShardSet, cfg: RunConfig) -> torch.Tensor:
    """The first min(data.val_clips, available) val clips: uint8 [N, C, T, H, W], a channels_last_3d view."""
    clips = [clip for _, clip in read_clips(val, expected_clip_shape(cfg), cfg.data.val_clips)]
    if not clips:
        raise ConfigError(f"data.val_shards {val.spec!r}: the val shards hold no clips")
    out = torch.empty((len(clips), *clips[0].shape), dtype=torch.uint8)
    np.stack(clips, out=out.numpy())
    return out.permute(0, 4, 1, 2, 3)
