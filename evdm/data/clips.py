"""Clips read in order, one at a time: the trainer's fixed val subset, sample.py's and evaluate's inputs.

One reader with the training stream's policy for damaged shards: a shard that cannot be read whole
(evdm.data.stream.ShardReader: every header and size checked before a clip is used) is skipped with
one warning line, never half used.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from evdm.config import ConfigError, RunConfig
from evdm.data.shardset import ShardSet, expected_clip_shape
from evdm.data.stream import ShardReader
from evdm.data.tar import read_clip


def read_clips(shards: ShardSet, shape: tuple[int, ...], limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(sample key, uint8 [T, H, W, C]) for the first `limit` clips (None: all) in sorted shard order.

    Lazy: a shard is opened only when the clips before it did not reach `limit`.
    """
    reader = ShardReader(shape, who=shards.key)
    count = 0
    for url in sorted(shards.urls):
        if limit is not None and count >= limit:
            return
        keys: list[str] = []
        refs = reader.refs(url, keys=keys)
        for key, ref in zip(keys, refs or []):
            if limit is not None and count >= limit:
                return
            yield key, read_clip(ref, shape)
            count += 1


def stack_clips(clips: list[np.ndarray]) -> torch.Tensor:
    """[T, H, W, C] uint8 arrays -> uint8 [B, C, T, H, W], a channels_last_3d view (one copy per clip)."""
    out = torch.empty((len(clips), *clips[0].shape), dtype=torch.uint8)
    np.stack(clips, out=out.numpy())
    return out.permute(0, 4, 1, 2, 3)


def load_val_clips(val: ShardSet, cfg: RunConfig) -> torch.Tensor:
    """The fixed val subset: uint8 [N, C, T, H, W], the first N = min(data.val_clips, available) clips."""
    clips = [clip for _, clip in read_clips(val, expected_clip_shape(cfg), cfg.data.val_clips)]
    if not clips:
        raise ConfigError(f"data.val_shards {val.spec!r}: the val shards hold no clips")
    return stack_clips(clips)
