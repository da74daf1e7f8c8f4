"""DALI loader: same clips (same bytes) as the WebDataset loader, rank sharding, clear errors without a GPU.

The pipeline tests run in DALI's CPU-only mode (device_id=None); only the final .gpu() differs on CUDA.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_clips, train_loader, write_shards
from evdm.config import ConfigError, from_dict
from evdm.data.schema import expand_urls

HAVE_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia.dali is not importable (pip install 'evdm[dali]')")
T, SIZE = 6, 16
SHARDS, PER_SHARD = 3, 5  # 15 clips: batches of 4 straddle shard and epoch boundaries


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_shards")
    rng = np.random.default_rng(0)
    write_shards(d, {split: [random_clips(rng, PER_SHARD, (T, SIZE, SIZE, 3)) for _ in range(n)]
                     for split, n in (("train", SHARDS), ("val", 1))}, manifest=False)
    return d


def cfg_for(d: Path, **data_overrides):
    return from_dict({
        "data": {"train_shards": str(d / "train-*.tar"), "val_shards": str(d / "val-*.tar"), "size": SIZE, "T": T,
                 "num_workers": 0, "shuffle_buffer": 0, **data_overrides},
        "train": {"batch_size": 4, "device": "cpu"},
    })


def clip_bytes(batches) -> list[bytes]:
    return [b.permute(1, 2, 3, 0).contiguous().numpy().tobytes() for batch in batches for b in batch]


def take(it, n):
    it = iter(it)
    return [next(it) for _ in range(n)]


@needs_dali
def test_dali_cpu_yields_the_same_clips_as_webdataset(shard_dir):
    """Shuffling off: the same bytes in the same order, across shard and epoch boundaries."""
    from evdm.data.dali import dali_batches

    cfg = cfg_for(shard_dir)
    urls = expand_urls(cfg.data.train_shards)
    dali = take(dali_batches(urls, batch_size=4, device_id=None), 8)  # 32 clips > 2 passes over 15
    wds = take(train_loader(cfg), 8)
    assert dali[0].shape == (4, 3, T, SIZE, SIZE) and dali[0].dtype == torch.uint8
    assert dali[0].is_contiguous(memory_format=torch.channels_last_3d)
    assert clip_bytes(dali) == clip_bytes(wds)


@needs_dali
def test_dali_ranks_read_disjoint_parts(shard_dir):
    from evdm.data.dali import dali_batches

    urls = expand_urls(str(shard_dir / "train-*.tar"))
    everything = Counter(clip_bytes(take(train_loader(cfg_for(shard_dir)), 1 + SHARDS * PER_SHARD // 4)))
    per_rank = [clip_bytes(take(dali_batches(urls, batch_size=1, device_id=None, shard_id=r, num_shards=3), PER_SHARD))
                for r in range(3)]
    assert Counter(b for part in per_rank for b in part) == Counter({b: 1 for b in everything})


@needs_dali
def test_dali_shuffle_draws_from_the_dataset(shard_dir):
    from evdm.data.dali import dali_batches

    urls = expand_urls(str(shard_dir / "train-*.tar"))
    known = set(clip_bytes(take(train_loader(cfg_for(shard_dir)), 4)))
    shuffled = clip_bytes(take(dali_batches(urls, batch_size=4, device_id=None, shuffle_buffer=8, seed=3), 3))
    assert set(shuffled) <= known


@needs_dali
def test_dali_rejects_pipe_urls(shard_dir):
    from evdm.data.dali import dali_batches

    with pytest.raises(ConfigError, match="local shard files only"):
        next(dali_batches(["pipe:cat x.tar"], batch_size=4, device_id=None))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_dali_without_gpu_is_a_clear_config_error(shard_dir):
    expected = "needs a CUDA GPU" if HAVE_DALI else "needs NVIDIA DALI"
    with pytest.raises(ConfigError, match=expected):
        train_loader(cfg_for(shard_dir, loader="dali"))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_DALI and torch.cuda.is_available()), reason="needs CUDA and nvidia.dali")
def test_dali_gpu_batches_match_webdataset(shard_dir):
    cfg = cfg_for(shard_dir, loader="dali")
    dali = [b.cpu() for b in take(train_loader(cfg), 4)]
    assert clip_bytes(dali) == clip_bytes(take(train_loader(cfg_for(shard_dir)), 4))
