"""WebDataset shards -> uint8 [B, C, T, H, W] training batches; the fixed validation clips.

Each (DDP rank, DataLoader worker) reads a disjoint slice of the shard list (`shard_slice`),
reshuffled each epoch-equivalent pass with a seed shared by all ranks, and cycles it forever. A
worker indexes a shard's tar headers in one loop (evdm.shards): no tarfile, np.load or per-sample
dicts. Clips go through a shuffle buffer and are read, one copy each, straight into shared-memory
batch slots (`BatchRing`) that the main process copies out. Batches are
[B, C, T, H, W] views of [B, T, H, W, C] buffers -- exactly the channels_last_3d layout -- so no one
permutes bytes; float conversion, scaling to [-1, 1] and flips happen on the device (`to_model_input`).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from evdm.config import ConfigError, RunConfig
from evdm.preemption import ignore_stop_signals, stop_signals_blocked
from evdm.schema import clip_shape
from evdm.shards import (
    clip_refs, expand_urls, fill_batch, iter_clips, manifest_beside, peek_clip_shape, shard_slice,
)

_PREFETCH_TICKETS = 2  # per DataLoader worker
_CHUNK_BYTES = 8 << 20  # batches per worker ticket: up to this many bytes, at most 16


# ---- batching ---------------------------------------------------------------------------------


def stack_clips(clips: list[np.ndarray]) -> torch.Tensor:
    """[T, H, W, C] uint8 arrays -> uint8 [B, C, T, H, W], a channels_last_3d view (one copy per clip)."""
    out = torch.empty((len(clips), *clips[0].shape), dtype=torch.uint8)
    np.stack(clips, out=out.numpy())
    return out.permute(0, 4, 1, 2, 3)


class _BatchPool:
    """Recycles batch buffers the consumer has let go of: fresh 1 MB allocations cost an mmap and a
    page fault per 4 KiB on every batch. Each tensor handed out holds a reference to its numpy
    buffer until the last view of it dies, so a buffer whose refcount is back to the pool's own is free.
    With CUDA, pinned buffers come from torch's caching host allocator instead.
    """

    def __init__(self, shape: tuple[int, ...], *, pin: bool, size: int = 16) -> None:
        self.shape, self.pin, self.size = shape, pin, size
        self.buffers: list[np.ndarray] = []
        for buf in [np.empty(0)]:  # the count get() sees for a buffer held by no tensor: list, loop, call
            self.free_refcount = sys.getrefcount(buf)

    def get(self) -> tuple[torch.Tensor, np.ndarray]:
        """A uint8 tensor of `shape` and a numpy view of it."""
        if self.pin:
            out = torch.empty(self.shape, dtype=torch.uint8, pin_memory=True)
            return out, out.numpy()
        for buf in self.buffers:
            if sys.getrefcount(buf) <= self.free_refcount:
                return torch.from_numpy(buf), buf
        buf = np.empty(self.shape, dtype=np.uint8)
        if len(self.buffers) < self.size:
            self.buffers.append(buf)
        return torch.from_numpy(buf), buf


class BatchRing:
    """Shared-memory batch slots per DataLoader worker, created before the workers start.

    A worker reads `chunk` batches straight into its next free slots and hands over one small ticket
    (worker, first slot, count); the main process copies each slot out (into pinned memory when CUDA
    is present) and frees it. Measured here: sending each batch through the DataLoader as a tensor
    (a fresh shared-memory segment and file descriptor per batch) caps out near 560 batches/s with
    no work at all, and one DataLoader round trip per batch leaves workers idle waiting for requests
    on a busy machine; chunked tickets amortise both.
    """

    def __init__(self, num_workers: int, batch_shape: tuple[int, ...], *, prefetch: int) -> None:
        batch_bytes = int(np.prod(batch_shape))
        self.chunk = int(np.clip(_CHUNK_BYTES // batch_bytes, 1, 16))
        # A worker's ticket k is requested when its ticket k - prefetch is handed over, so ticket
        # k - prefetch - 1 has been drained: prefetch + 1 chunks of slots never make a worker wait.
        self.slots = (prefetch + 1) * self.chunk
        self.data = torch.zeros((num_workers, self.slots, *batch_shape), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros((num_workers, self.slots), dtype=torch.uint8).share_memory_()
        self._written = 0  # batches this worker process has written

    def put(self, worker: int, refs: list) -> int:
        """Read one batch into this worker's next slot; returns the slot."""
        slot = self._written % self.slots
        self._written += 1
        busy = self.busy.numpy()
        while busy[worker, slot]:  # a safety net; see __init__
            time.sleep(1e-4)
        fill_batch(self.data[worker, slot].numpy(), refs)
        busy[worker, slot] = 1
        return slot

    def take(self, worker: int, slot: int, pool: _BatchPool) -> torch.Tensor:
        """Copy a slot out as uint8 [B, C, T, H, W] (channels_last_3d view) and free it."""
        out, out_np = pool.get()
        np.copyto(out_np, self.data[worker, slot].numpy())
        self.busy.numpy()[worker, slot] = 0
        return out.permute(0, 4, 1, 2, 3)


class ShardClipStream(IterableDataset):
    """Infinite stream of batches from this rank's and worker's shard slice.

    Yields uint8 [B, C, T, H, W] tensors, or (worker, first slot, count) tickets into `ring` in workers.
    """

    def __init__(
        self, urls: list[str], *, batch_size: int, expected_shape: tuple[int, ...], rank: int = 0,
        world_size: int = 1, partition_seed: int = 0, sample_seed: int = 0, shuffle_buffer: int = 0,
        ring: BatchRing | None = None, pin: bool = False,
    ) -> None:
        self.urls = list(urls)
        self.batch_size = batch_size
        self.expected_shape = tuple(expected_shape)
        self.rank, self.world_size = rank, world_size
        self.partition_seed, self.sample_seed = partition_seed, sample_seed
        self.shuffle_buffer = shuffle_buffer
        self.ring, self.pin = ring, pin

    def _clips(self, worker: int, num_workers: int) -> Iterator:
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker
        # Fewer shards than readers: everyone reads every shard and keeps every readers-th clip.
        split_samples = len(self.urls) < readers
        shuffle = self.shuffle_buffer > 1
        epoch = 0
        while True:
            if split_samples:
                urls = shard_slice(self.urls, 0, 1, 0, 1, epoch, self.partition_seed, shuffle=shuffle)
            else:
                urls = shard_slice(self.urls, self.rank, self.world_size, worker, num_workers,
                                   epoch, self.partition_seed, shuffle=shuffle)
            seen = 0
            for url in urls:
                refs = clip_refs(url, self.expected_shape)
                if split_samples:
                    refs = refs[reader::readers]
                seen += len(refs)
                yield from refs
            if not seen:
                raise RuntimeError(f"rank {self.rank} worker {worker}: shards {urls} hold no clips")
            epoch += 1

    def _shuffled(self, clips: Iterator, rng: np.random.Generator) -> Iterator:
        """Reservoir-style shuffle buffer; uniforms drawn in blocks (one rng call per 4096 clips)."""
        size = self.shuffle_buffer
        buffer: list = []
        uniforms, used = rng.random(4096), 0
        for clip in clips:
            if len(buffer) < size:
                buffer.append(clip)
                continue
            if used == len(uniforms):
                uniforms, used = rng.random(4096), 0
            i = int(uniforms[used] * size)
            used += 1
            buffer[i], clip = clip, buffer[i]
            yield clip

    def __iter__(self) -> Iterator[torch.Tensor | tuple[int, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        clips = self._clips(worker, num_workers)
        if self.shuffle_buffer > 1:
            clips = self._shuffled(clips, np.random.default_rng([self.sample_seed, self.rank, worker]))
        ring = self.ring if info is not None else None
        pool = _BatchPool((self.batch_size, *self.expected_shape), pin=self.pin) if ring is None else None
        batch: list = []
        first, count = 0, 0
        for clip in clips:
            batch.append(clip)
            if len(batch) < self.batch_size:
                continue
            if ring is None:
                out, out_np = pool.get()
                fill_batch(out_np, batch)
                yield out.permute(0, 4, 1, 2, 3)
            else:
                slot = ring.put(worker, batch)
                first, count = (slot, 1) if count == 0 else (first, count + 1)
                if count == ring.chunk:
                    yield worker, first, count
                    count = 0
            batch = []


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
            found, where = tuple(peek_clip_shape(urls[0])), urls[0]
        if found != expected:
            raise ConfigError(
                f"{where}: shard clips have shape [T, H, W, C] = {list(found)}, but data.T={cfg.data.T}, "
                f"data.size={cfg.data.size}, data.color_mode={cfg.data.color_mode!r} "
                f"(data.{key}) expect {list(expected)}"
            )


def train_clip_count(cfg: RunConfig) -> int | None:
    """Clips in the train split per manifest.json beside the train shards (None when unknown: remote, no manifest)."""
    urls = expand_urls(cfg.data.train_shards)
    manifest = manifest_beside(urls[0])
    if manifest is None:
        return None
    names = {Path(u).name for u in urls}
    shards = [s for split in json.loads(manifest.read_text()).get("splits", {}).values() for s in split.get("shards", [])]
    return sum(s["clips"] for s in shards if s["name"] in names) or None


def make_train_loader(
    cfg: RunConfig, *, rank: int = 0, world_size: int = 1, seed: int = 0
) -> Iterable[torch.Tensor]:
    """Infinite iterator of uint8 [B, C, T, H, W] batches (B = train.batch_size) for this rank.

    Batches are channels_last_3d views of [B, T, H, W, C] buffers, in pinned memory when CUDA is present.

    `seed` drives the sample shuffle; the shard partition uses train.seed, equal on every rank, so
    ranks stay disjoint even when `seed` differs per rank. data.loader = "dali" dispatches to DALI.
    """
    d = cfg.data
    if d.loader == "dali":
        from evdm.dali_loader import make_dali_train_loader

        return make_dali_train_loader(cfg, rank=rank, world_size=world_size, seed=seed)
    urls = expand_urls(d.train_shards)
    readers = world_size * max(d.num_workers, 1)
    if len(urls) < readers:
        warnings.warn(
            f"data.train_shards: {len(urls)} shard(s) for {world_size} rank(s) x {max(d.num_workers, 1)} "
            f"worker(s); every reader will read every shard and keep 1 clip in {readers}. "
            f"Write at least {readers} shards (preprocess.shard --shard-size) to read each shard once.",
            stacklevel=2,
        )
    pin = torch.cuda.is_available()
    ring = None
    if d.num_workers > 0:
        ring = BatchRing(d.num_workers, (cfg.train.batch_size, *expected_clip_shape(cfg)), prefetch=_PREFETCH_TICKETS)
    dataset = ShardClipStream(
        urls, batch_size=cfg.train.batch_size, expected_shape=expected_clip_shape(cfg), rank=rank,
        world_size=world_size, partition_seed=cfg.train.seed, sample_seed=seed, shuffle_buffer=d.shuffle_buffer,
        ring=ring, pin=pin,
    )
    if ring is None:
        return iter(dataset)
    loader = DataLoader(dataset, batch_size=None, num_workers=d.num_workers, prefetch_factor=_PREFETCH_TICKETS,
                        worker_init_fn=ignore_stop_signals)  # preemption signals are the main process's
    return _batches_from_ring(loader, ring, _BatchPool((cfg.train.batch_size, *expected_clip_shape(cfg)), pin=pin))


def _batches_from_ring(loader: DataLoader, ring: BatchRing, pool: _BatchPool) -> Iterator[torch.Tensor]:
    with stop_signals_blocked():  # the workers fork here (see evdm.preemption)
        tickets = iter(loader)
    for worker, first, count in tickets:
        for i in range(count):
            yield ring.take(worker, (first + i) % ring.slots, pool)


def load_val_clips(cfg: RunConfig) -> torch.Tensor:
    """The fixed val subset: uint8 [N, C, T, H, W], the first N = min(val_clips, available) clips in sorted shard order."""
    expected = expected_clip_shape(cfg)
    clips: list[np.ndarray] = []
    for url in sorted(expand_urls(cfg.data.val_shards)):
        for key, clip in iter_clips(url):
            if len(clips) >= cfg.data.val_clips:
                break
            if clip.shape != expected:
                raise ConfigError(f"{url}: sample {key} has clip shape {clip.shape}, config expects {expected}")
            clips.append(clip)
        if len(clips) >= cfg.data.val_clips:
            break
    if not clips:
        raise ConfigError(f"data.val_shards {cfg.data.val_shards!r}: the val shards hold no clips")
    return stack_clips(clips)


def to_model_input(
    u8: torch.Tensor, device: torch.device | str, *, channels_last: bool,
    hflip_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 [B, C, T, H, W] -> float [B, C, T, H, W] in [-1, 1] on `device`; flips on the device.

    With `hflip_generator`, each sample is flipped left-right with probability 1/2.
    """
    x = u8.to(device, non_blocking=True)
    if hflip_generator is not None:
        flip = torch.rand(x.shape[0], generator=hflip_generator, device=hflip_generator.device) < 0.5
        flip = flip.to(x.device).view(-1, 1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    x = x.float() / 127.5 - 1.0
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)
