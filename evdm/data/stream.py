"""The resumable training stream: shard passes -> shuffle buffer -> batches, in one reader process. Its output is a
pure function of (shard list, partition seed, sample seed, rank, worker, batches consumed), so a resume replays it
over clip references, reading no pixels of the batches already trained on (`start_batch`). A damaged shard is skipped
whole, with one warning line, when indexed: resume stays exact with damaged shards present (docs/RELIABILITY.md)."""

import hashlib
import sys
import time
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from evdm.cli import warn
from evdm.config import ConfigError
from evdm.data.schema import shard_slice
from evdm.data.tar import DAMAGE, clip_refs, damage_reason, fill_batch


class ShardReader:
    """Indexes shards into clip refs for one reader process, skipping and counting damaged ones; the verdict
    is cached, so a damaged shard is warned about once and its bytes are hashed at most once."""

    def __init__(self, expected_shape: tuple[int, ...], *, who: str, digests: dict[str, str] | None = None) -> None:
        self.expected_shape = expected_shape
        self.who = who  # "rank 0 worker 1; counted in skipped_shards", for the warning line
        self.digests = digests  # url -> manifest sha256 when data.verify_shards
        self.damaged: dict[str, str] = {}  # url -> reason
        self.verified: set[str] = set()
        self.skipped = 0  # skip events: a damaged shard counts once per pass that deals it here

    def refs(self, url: str, *, count: bool = True, keys: list | None = None) -> list | None:
        """The shard's clip refs (their sample keys appended to `keys`), or None (counted, warned once) if damaged."""
        if url not in self.damaged:
            try:
                self._verify(url)
                return clip_refs(url, self.expected_shape, keys)
            except DAMAGE as err:
                self.damaged[url] = damage_reason(url, err)
                warn(f"skipping shard {url}: {self.damaged[url]} ({self.who})")
        self.skipped += count
        return None

    def _verify(self, url: str) -> None:
        if self.digests is None or url in self.verified or url not in self.digests:
            return
        sha = hashlib.sha256()
        with open(url, "rb") as f:  # chunk by chunk: hashlib.file_digest needs Python 3.11
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digest = sha.hexdigest()
        if digest != self.digests[url]:
            raise ValueError(f"sha256 {digest[:12]}... differs from manifest.json's {self.digests[url][:12]}...")
        self.verified.add(url)


class BatchPool:
    """Recycles batch buffers the consumer has let go of (a fresh 1 MB allocation page-faults on every batch):
    a buffer whose refcount is back to the pool's own is held by no tensor. Pinned ones come from torch's cache."""

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
    """Shared-memory batch slots per DataLoader worker, created before the workers start. A worker reads
    `chunk` batches into its next free slots and hands over one ticket (worker, first slot, count, skipped
    shards so far); the main process copies each slot out and frees it. Chunked tickets amortise the
    DataLoader's per-item cost (docs/GUIDE.md, Design notes)."""

    def __init__(self, num_workers: int, batch_shape: tuple[int, ...], *, prefetch: int, chunk_bytes: int) -> None:
        batch_bytes = int(np.prod(batch_shape))
        self.chunk = int(np.clip(chunk_bytes // batch_bytes, 1, 16))
        # A worker's ticket k is requested when its ticket k - prefetch is handed over, so ticket
        # k - prefetch - 1 has been drained: prefetch + 1 chunks of slots never make a worker wait.
        self.slots = (prefetch + 1) * self.chunk
        self.data = torch.zeros((num_workers, self.slots, *batch_shape), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros((num_workers, self.slots), dtype=torch.uint8).share_memory_()
        self.closed = torch.zeros(1, dtype=torch.uint8).share_memory_()  # set when the consumer is gone
        self._written = 0  # batches this worker process has written

    def close(self) -> None:
        """The consumer stops taking batches: workers waiting for a free slot stop instead of spinning."""
        self.closed[0] = 1

    def put(self, worker: int, refs: list) -> int | None:
        """Read one batch into this worker's next slot; returns the slot (None once the ring is closed)."""
        slot = self._written % self.slots
        self._written += 1
        busy, closed = self.busy.numpy(), self.closed.numpy()
        while busy[worker, slot]:  # a safety net; see __init__
            if closed[0]:
                return None
            time.sleep(1e-4)
        fill_batch(self.data[worker, slot].numpy(), refs)
        busy[worker, slot] = 1
        return slot

    def take(self, worker: int, slot: int, pool: BatchPool) -> torch.Tensor:
        """Copy a slot out as uint8 [B, C, T, H, W] (channels_last_3d view) and free it."""
        out, out_np = pool.get()
        np.copyto(out_np, self.data[worker, slot].numpy())
        self.busy.numpy()[worker, slot] = 0
        return out.permute(0, 4, 1, 2, 3)

    def drop(self, worker: int, slot: int) -> None:
        """Free a slot without copying it out (a resumed run's already-trained batches)."""
        self.busy.numpy()[worker, slot] = 0


def worker_start(start_batch: int, worker_id: int, num_workers: int, chunk: int) -> tuple[int, int]:
    """(logical worker, batches it skips) for DataLoader worker `worker_id` of a stream resumed at `start_batch`.
    Batch n is in ticket t = n // chunk, made by logical worker t % W (tickets are taken round-robin).
    Worker i plays logical worker (t0 + i) % W, t0 the resumed run's first ticket, so the new loader's
    i-th ticket is the straight run's t0 + i; the consumer drops start_batch % chunk batches of ticket t0."""
    t0 = start_batch // chunk
    return (t0 + worker_id) % num_workers, (t0 + worker_id) // num_workers * chunk


class ShardClipStream(IterableDataset):
    """Infinite stream of batches from this rank's and worker's shard slice, from batch `start_batch` on:
    uint8 [B, C, T, H, W] tensors in the main process; in DataLoader workers, (worker, first slot, count,
    skipped shards) tickets into `ring`, or one line of text (a ConfigError)."""

    def __init__(self, urls: list[str], *, batch_size: int, expected_shape: tuple[int, ...], rank: int = 0,
                 world_size: int = 1, partition_seed: int = 0, sample_seed: int = 0, shuffle_buffer: int = 0,
                 ring: BatchRing | None = None, pin: bool = False, start_batch: int = 0,
                 digests: dict[str, str] | None = None) -> None:
        self.urls, self.batch_size, self.expected_shape = list(urls), batch_size, tuple(expected_shape)
        self.rank, self.world_size = rank, world_size
        self.partition_seed, self.sample_seed, self.shuffle_buffer = partition_seed, sample_seed, shuffle_buffer
        self.ring, self.pin, self.start_batch, self.digests = ring, pin, start_batch, digests
        self.skipped_shards = 0  # kept up to date when iterated in this process (no workers)

    def _clips(self, reader: ShardReader, worker: int, num_workers: int) -> Iterator:
        readers = self.world_size * num_workers
        index = self.rank * num_workers + worker
        # Fewer shards than readers: everyone reads every shard and keeps every readers-th clip.
        split_samples = len(self.urls) < readers
        shuffle = self.shuffle_buffer > 1
        epoch = 0
        while True:
            part = (0, 1, 0, 1) if split_samples else (self.rank, self.world_size, worker, num_workers)
            urls = shard_slice(self.urls, *part, epoch, self.partition_seed, shuffle=shuffle)
            seen = 0
            for url in urls:
                refs = reader.refs(url)
                self.skipped_shards = reader.skipped
                if refs is not None:
                    refs = refs[index::readers] if split_samples else refs
                    seen += len(refs)
                    yield from refs
            if not seen:
                self._check_readable(reader, urls, epoch, shuffle)
            epoch += 1

    def _check_readable(self, reader: ShardReader, urls: list[str], epoch: int, shuffle: bool) -> None:
        """ConfigError when a pass dealt this reader nothing to read and later passes cannot either."""
        damaged = [u for u in urls if u in reader.damaged]
        if damaged and all(reader.refs(u, count=False) is None for u in self.urls):
            raise ConfigError(f"data.train_shards: all {len(self.urls)} shards are unreadable "
                              f"(e.g. {damaged[0]}: {reader.damaged[damaged[0]]})")
        if damaged and shuffle:
            return  # the next pass deals this reader other shards
        raise ConfigError(f"data.train_shards: {reader.who}'s shards {urls} hold no readable clips in pass {epoch}")

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

    def __iter__(self) -> Iterator[torch.Tensor | tuple[int, int, int, int] | str]:
        info = get_worker_info()
        if info is None:
            worker, num_workers, skip = 0, 1, self.start_batch
        else:
            num_workers = info.num_workers
            worker, skip = worker_start(self.start_batch, info.id, num_workers, self.ring.chunk)
        reader = ShardReader(self.expected_shape, who=f"rank {self.rank} worker {worker}; counted in skipped_shards",
                             digests=self.digests)
        try:
            yield from self._batches(reader, worker, num_workers, skip, in_worker=info is not None)
        except ConfigError as err:
            if info is None:
                raise
            yield str(err)  # from a worker: one line for the trainer, not the DataLoader's wrapped traceback

    def _batches(self, reader: ShardReader, worker: int, num_workers: int, skip: int, *, in_worker: bool) -> Iterator:
        clips = self._clips(reader, worker, num_workers)
        if self.shuffle_buffer > 1:
            clips = self._shuffled(clips, np.random.default_rng([self.sample_seed, self.rank, worker]))
        ring = self.ring if in_worker else None
        pool = BatchPool((self.batch_size, *self.expected_shape), pin=self.pin) if ring is None else None
        batch: list = []
        first, count = 0, 0
        for clip in clips:
            batch.append(clip)
            if len(batch) < self.batch_size:
                continue
            if skip:  # fast-forward: the batch was trained on before the resume; read no pixels
                skip -= 1
            elif ring is None:
                out, out_np = pool.get()
                fill_batch(out_np, batch)
                yield out.permute(0, 4, 1, 2, 3)
            else:
                slot = ring.put(worker, batch)
                if slot is None:  # the trainer has let go of the loader
                    return
                first, count = (slot, 1) if count == 0 else (first, count + 1)
                if count == ring.chunk:
                    yield worker, first, count, reader.skipped
                    count = 0
            batch = []
