"""WebDataset loader: shard lists, disjoint shard slices across ranks and workers, batches, val, checks."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import clip_bytes, random_clips, take, train_loader, val_clips, write_shards
from evdm.config import ConfigError, from_dict
from evdm.data.schema import encode_clip, encode_sample, expand_urls, shard_slice
from evdm.data.shardset import ShardSet, open_checked
from evdm.data.tar import iter_clips
from preprocess.writer import write_manifest, write_shard

T, SIZE, C = 6, 16, 3
CLIPS_PER_SHARD = 4
TRAIN_SHARDS = 8


def write_split(shard_dir: Path, split: str, shards: int, rng: np.random.Generator, shape=(T, SIZE, SIZE, C)):
    """Write `shards` shards of CLIPS_PER_SHARD random clips (no manifest); return {clip bytes: shard name}."""
    return write_shards(shard_dir, {split: [random_clips(rng, CLIPS_PER_SHARD, shape) for _ in range(shards)]},
                        manifest=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    train = write_split(d, "train", TRAIN_SHARDS, rng)
    val = write_split(d, "val", 2, rng)
    return d, train, val


def cfg_for(shard_dir: Path, **data_overrides):
    raw = {
        "data": {"train_shards": str(shard_dir / "train-*.tar"), "val_shards": str(shard_dir / "val-*.tar"),
                 "size": SIZE, "T": T, "num_workers": 0, "shuffle_buffer": 0, "val_clips": 3, **data_overrides},
        "train": {"batch_size": 4},
    }
    return from_dict(raw)


# ---- shard lists ------------------------------------------------------------------------------


def test_expand_urls_glob_brace_list_pipe(shards):
    d, _, _ = shards
    globbed = expand_urls(str(d / "train-*.tar"))
    assert globbed == sorted(str(p) for p in d.glob("train-*.tar")) and len(globbed) == TRAIN_SHARDS
    assert expand_urls(str(d / "train-{000000..000007}.tar")) == globbed
    assert expand_urls([str(d / "train-00000[0-3].tar"), str(d / "train-00000[4-7].tar")]) == globbed
    assert expand_urls("pipe:aws s3 cp s3://b/train-{0..2}.tar -") == [
        f"pipe:aws s3 cp s3://b/train-{i}.tar -" for i in range(3)]


def test_expand_urls_errors_name_the_pattern(tmp_path):
    with pytest.raises(ConfigError, match=r"nothing-\*\.tar.*matches no file"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ConfigError, match="missing.tar.*not found"):
        expand_urls(str(tmp_path / "missing.tar"))


def test_shard_slice_disjoint_and_complete_per_pass():
    urls = [f"s{i}.tar" for i in range(10)]
    for epoch in range(3):
        parts = [shard_slice(urls, r, 2, w, 2, epoch, seed=7) for r in range(2) for w in range(2)]
        read = Counter(u for p in parts for u in p)
        assert set(read) == set(urls) and set(read.values()) == {1}
    assert shard_slice(urls, 1, 2, 0, 2, 0, 7) == shard_slice(urls, 1, 2, 0, 2, 0, 7)
    assert shard_slice(urls, 0, 1, 0, 1, 0, 7) != shard_slice(urls, 0, 1, 0, 1, 1, 7)
    assert shard_slice(urls, 0, 1, 0, 1, 5, 7, shuffle=False) == urls


# ---- batches ----------------------------------------------------------------------------------


def test_batches_are_uint8_channels_last_views_of_the_clips(shards):
    d, train, _ = shards
    (batch,) = take(train_loader(cfg_for(d)), 1)
    assert batch.dtype == torch.uint8 and batch.shape == (4, C, T, SIZE, SIZE)
    assert batch.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(b in train for b in clip_bytes(batch))


def test_two_ranks_two_workers_read_every_shard_once_per_pass(shards, monkeypatch):
    """Real DataLoaders (num_workers=2) for ranks 0 and 1: one pass = every clip, so every shard, once."""
    d, train, _ = shards
    cfg = cfg_for(d, num_workers=2)
    monkeypatch.setattr("evdm.data.loader._CHUNK_BYTES", 1)  # one batch per worker ticket: workers alternate batch by batch
    per_rank_batches = TRAIN_SHARDS * CLIPS_PER_SHARD // 4 // 2
    seen = []
    for rank in range(2):
        # Different sample seeds per rank, as the trainer passes them; the partition must not depend on it.
        for batch in take(train_loader(cfg, rank=rank, world_size=2, seed=100 + rank), per_rank_batches):
            seen.extend(clip_bytes(batch))
    assert Counter(seen) == Counter(train.keys())
    assert Counter(train[b] for b in seen) == {name: CLIPS_PER_SHARD for name in set(train.values())}


def test_worker_tickets_of_several_batches_keep_passes_whole(shards):
    """Default chunking (several batches per worker ticket): whole passes, every clip equally often."""
    d, train, _ = shards
    loader = train_loader(cfg_for(d, num_workers=2))
    counts = Counter(b for batch in take(loader, 32) for b in clip_bytes(batch))
    assert set(counts) == set(train) and len(set(counts.values())) == 1


def test_stream_is_infinite_and_each_pass_is_complete(shards):
    d, train, _ = shards
    batches = take(train_loader(cfg_for(d)), 2 * len(train) // 4)
    counts = Counter(b for batch in batches for b in clip_bytes(batch))
    assert counts == Counter({b: 2 for b in train})


def test_shuffle_buffer_shuffles_deterministically(shards):
    d, train, _ = shards
    cfg = cfg_for(d, shuffle_buffer=8)
    first = [clip_bytes(b) for b in take(train_loader(cfg, seed=1), 4)]
    again = [clip_bytes(b) for b in take(train_loader(cfg, seed=1), 4)]
    other = [clip_bytes(b) for b in take(train_loader(cfg, seed=2), 4)]
    plain = [clip_bytes(b) for b in take(train_loader(cfg_for(d)), 4)]
    assert first == again and first != other and first != plain
    assert all(b in train for batch in first for b in batch)


def test_fewer_shards_than_readers_warns_and_splits_samples(tmp_path):
    owner = write_split(tmp_path, "train", 2, np.random.default_rng(1))
    write_split(tmp_path, "val", 1, np.random.default_rng(2))
    cfg = from_dict({**_raw(tmp_path), "train": {"batch_size": 2}})
    seen = []
    for rank in range(4):
        with pytest.warns(UserWarning, match="2 shard"):
            loader = train_loader(cfg, rank=rank, world_size=4)
        seen.extend(b for batch in take(loader, 1) for b in clip_bytes(batch))
    assert Counter(seen) == Counter(owner.keys())


def _raw(d: Path) -> dict:
    return {"data": {"train_shards": str(d / "train-*.tar"), "val_shards": str(d / "val-*.tar"), "size": SIZE,
                     "T": T, "num_workers": 0, "shuffle_buffer": 0}}


def test_pipe_urls_and_tar_name_formats(tmp_path):
    """pipe: URLs stream through gopen; long keys in GNU and PAX tars parse like ustar ones."""
    clips = random_clips(np.random.default_rng(3), 2, (T, SIZE, SIZE, C))
    keys = ["k" * 150 + "_0", "dir/sub/short_1"]
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.PAX_FORMAT, "pax.tar")):
        with tarfile.open(tmp_path / name, "w", format=fmt) as tar:
            for key, clip in zip(keys, clips):
                for ext, payload in encode_sample(key, clip, {}).items():
                    if ext != "__key__":
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
        for url in (str(tmp_path / name), f"pipe:cat {tmp_path / name}"):
            got = list(iter_clips(url))
            assert [k for k, _ in got] == keys
            assert all(np.array_equal(a, b) for (_, a), b in zip(got, clips))


def test_corrupt_shards_are_errors_naming_the_file(tmp_path):
    clip = random_clips(np.random.default_rng(7), 1, (T, SIZE, SIZE, C))[0]
    write_shard(tmp_path / "good.tar", [encode_sample("k", clip, {})])
    whole = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:2048])
    with pytest.raises(OSError, match=r"cut\.tar: truncated tar"):
        list(iter_clips(str(tmp_path / "cut.tar")))
    as_float = encode_clip(clip).replace(b"'|u1'", b"'<f4'")  # same length, so the header stays valid
    write_shard(tmp_path / "f32.tar", [{"__key__": "k", "clip.npy": as_float}])
    with pytest.raises(ValueError, match=r"f32\.tar: k\.clip\.npy: clip must be C-ordered uint8"):
        list(iter_clips(str(tmp_path / "f32.tar")))


def test_shape_mismatch_inside_the_stream_names_the_shard(tmp_path):
    write_split(tmp_path, "train", 1, np.random.default_rng(4), shape=(T, SIZE, SIZE, 1))
    cfg = from_dict({**_raw(tmp_path), "train": {"batch_size": 2}})
    with pytest.raises(ConfigError, match=r"train-000000\.tar.*\(6, 16, 16, 1\).*\(6, 16, 16, 3\)"):
        take(train_loader(cfg), 1)


# ---- config check -----------------------------------------------------------------------------


def test_check_shards_accepts_matching_shards(shards):
    open_checked(cfg_for(shards[0]))


def test_check_shards_peeks_first_clip_and_names_the_shard(shards):
    d = shards[0]
    with pytest.raises(ConfigError, match=r"train-000000\.tar.*\[6, 16, 16, 3\].*data.T=8.*\[8, 16, 16, 3\]"):
        open_checked(cfg_for(d, T=8))
    with pytest.raises(ConfigError, match=r"train-000000\.tar: clips are 'rgb' \(C=3\), but data.train_shards needs 'gray'"):
        open_checked(cfg_for(d, color_mode="gray"))


def test_check_shards_reads_the_manifest(tmp_path):
    write_split(tmp_path, "train", 1, np.random.default_rng(5))
    write_split(tmp_path, "val", 1, np.random.default_rng(6))
    write_manifest(tmp_path, options={"frame_stride": 1}, clip_shape=(T, 32, 32, C), splits={}, skipped=[])
    with pytest.raises(ConfigError, match=r"manifest\.json.*\[6, 32, 32, 3\].*\[6, 16, 16, 3\]"):
        open_checked(from_dict(_raw(tmp_path)))
    write_manifest(tmp_path, options={"frame_stride": 2}, clip_shape=(T, SIZE, SIZE, C), splits={}, skipped=[])
    with pytest.raises(ConfigError, match=r"manifest\.json.*frame_stride=2"):
        open_checked(from_dict(_raw(tmp_path)))


def test_check_shards_names_an_empty_glob(shards, tmp_path):
    cfg = cfg_for(shards[0], train_shards=str(tmp_path / "nope-*.tar"))
    with pytest.raises(ConfigError, match=r"data.train_shards.*nope-\*\.tar"):
        open_checked(cfg)


# ---- validation clips -------------------------------------------------------------------------


def test_val_clips_are_the_first_in_sorted_shard_order_and_fixed(shards):
    d, _, _ = shards
    cfg = cfg_for(d, val_clips=6)
    val = val_clips(cfg)
    assert val.shape == (6, C, T, SIZE, SIZE) and val.dtype == torch.uint8
    expected = [c for _, c in iter_clips(str(d / "val-000000.tar"))]
    expected += [c for _, c in iter_clips(str(d / "val-000001.tar"))][:2]
    assert clip_bytes(val) == [c.tobytes() for c in expected]
    assert torch.equal(val, val_clips(cfg))
    assert val_clips(cfg_for(d, val_clips=100)).shape[0] == 8


def test_empty_val_shards_are_a_clear_error(shards, tmp_path):
    write_shard(tmp_path / "val-000000.tar", [])
    with pytest.raises(ConfigError, match="val shards hold no clips"):
        val_clips(cfg_for(shards[0], val_shards=str(tmp_path / "val-*.tar")))
