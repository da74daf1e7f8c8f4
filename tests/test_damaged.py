"""Damaged shards on disk: each is skipped with one warning line naming it, counted, and the stream goes on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import clip_bytes, random_clips, take, write_shards
from conftest import train_loader, val_clips
from evdm.data.shardset import ShardSet, open_checked
from evdm.data.tar import iter_clips
from evdm.config import ConfigError, from_dict
from evdm.data.schema import encode_sample
from preprocess.writer import write_shard

T, SIZE, C = 6, 16, 3
CLIPS_PER_SHARD = 4

SHARDS = 4
BAD = "train-000001.tar"


def write_dataset(d: Path, seed: int = 0) -> dict[bytes, str]:
    """SHARDS train shards and one val shard of random clips, with manifest.json; returns {train clip bytes: shard name}."""
    rng = np.random.default_rng(seed)
    owner = write_shards(d, {split: [random_clips(rng, CLIPS_PER_SHARD, (T, SIZE, SIZE, C)) for _ in range(n)]
                             for split, n in (("train", SHARDS), ("val", 1))})
    return {clip: name for clip, name in owner.items() if name.startswith("train")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("pristine")
    return d, write_dataset(d)


@pytest.fixture
def shard_dir(pristine, tmp_path):
    """A fresh copy of the pristine shards for a test to damage."""
    d = tmp_path / "shards"
    shutil.copytree(pristine[0], d)
    return d


def cfg_for(d: Path, **overrides):
    return from_dict({"data": {"train_shards": str(d / "train-*.tar"), "val_shards": str(d / "val-*.tar"),
                               "size": SIZE, "T": T, "num_workers": 0, "shuffle_buffer": 0, **overrides},
                      "train": {"batch_size": 4}})


def overwrite(path: Path, at: bytes, new: bytes, *, last: bool = False) -> None:
    """Overwrite the bytes of `path` where `at` first (or last) occurs with `new`: same length, a real in-place flip."""
    raw = bytearray(path.read_bytes())
    i = raw.rfind(at) if last else raw.find(at)
    assert i >= 0 and len(new) == len(at)
    raw[i:i + len(new)] = new
    path.write_bytes(bytes(raw))


def cut(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


NPY_BYTES = T * SIZE * SIZE * C + 128  # a v1 .npy header is 128 bytes here


def cut_at_member_boundary(path: Path) -> None:
    """Keep the first sample whole (clip header + data, meta header + one data block): a tar with no end."""
    path.write_bytes(path.read_bytes()[: 3 * 512 + (NPY_BYTES + 511) // 512 * 512])


def wrong_size_member(path: Path) -> None:
    clips = random_clips(np.random.default_rng(9), 2, (T, SIZE, SIZE, C)) + random_clips(np.random.default_rng(9), 1, (T - 1, SIZE, SIZE, C))
    write_shard(path, [encode_sample(f"w{i}", c, {}) for i, c in enumerate(clips)])


DAMAGE = {  # how to damage the shard -> what the warning says is wrong
    "truncated": (cut, "truncated tar"),
    "cut at a member boundary": (cut_at_member_boundary, "truncated tar (no end-of-archive block"),
    "text file named .tar": (lambda p: p.write_text("not a tar\n" * 100), "not a tar file"),
    "short text file": (lambda p: p.write_text("hello\n"), "not a tar file (6 bytes)"),
    "empty file": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "damaged tar header": (lambda p: overwrite(p, b"%011o\0" % NPY_BYTES, b"0000001z200\0"),
                           "damaged tar header at byte 0"),
    "damaged first npy header": (lambda p: overwrite(p, b"{'descr'", b"{'dXscr'"), "damaged .npy header"),
    "damaged later npy header": (lambda p: overwrite(p, b"'shape': (6", b"'shape': (7", last=True),
                                 "is not a (6, 16, 16, 3) uint8 clip like the shard's first one"),
    "wrong-size member": (wrong_size_member, "is not a (6, 16, 16, 3) uint8 clip"),
}


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: skipping shard")]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_shard_is_skipped_named_and_counted(shard_dir, pristine, capfd, kind):
    damage, reason = DAMAGE[kind]
    damage(shard_dir / BAD)
    good = {b for b, name in pristine[1].items() if name != BAD}
    loader = train_loader(cfg_for(shard_dir))
    batches = take(loader, 2 * len(good) // 4)  # two passes
    assert [b for batch in batches for b in clip_bytes(batch)].count(next(iter(good))) == 2
    assert {b for batch in batches for b in clip_bytes(batch)} == good
    err = capfd.readouterr().err
    (line,) = warning_lines(err)  # once, though the shard was dealt in both passes
    assert str(shard_dir / BAD) in line and reason in line and "Traceback" not in err
    assert loader.skipped_shards == 2  # once per pass that dealt it


def test_shard_that_vanishes_after_start_up_is_skipped(shard_dir, capfd):
    loader = train_loader(cfg_for(shard_dir))
    (shard_dir / BAD).unlink()
    take(loader, 3)
    (line,) = warning_lines(capfd.readouterr().err)
    assert f"{shard_dir / BAD}: No such file or directory" in line and loader.skipped_shards == 1


def test_workers_skip_and_count_through_their_tickets(shard_dir, pristine, capfd, monkeypatch):
    monkeypatch.setattr("evdm.data.loader._CHUNK_BYTES", 1)  # one batch per ticket: the two workers alternate
    cut(shard_dir / BAD)
    good = {b for b, name in pristine[1].items() if name != BAD}
    loader = train_loader(cfg_for(shard_dir, num_workers=2))
    seen = {b for batch in take(loader, 12) for b in clip_bytes(batch)}
    assert seen == good
    (line,) = warning_lines(capfd.readouterr().err)
    assert BAD in line and "truncated tar" in line and "worker" in line
    assert loader.skipped_shards >= 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_with_a_damaged_shard(shard_dir, monkeypatch, workers):
    overwrite(shard_dir / BAD, b"{'descr'", b"{'dXscr'")
    monkeypatch.setattr("evdm.data.loader._CHUNK_BYTES", 2 * 4 * T * SIZE * SIZE * C)
    cfg = cfg_for(shard_dir, num_workers=workers, shuffle_buffer=6)
    fresh = [clip_bytes(b) for b in take(train_loader(cfg, seed=3), 12)]
    for start in (3, 7):
        assert [clip_bytes(b) for b in take(train_loader(cfg, seed=3, start_batch=start), 12 - start)] \
            == fresh[start:]


@pytest.mark.parametrize("workers", [0, 2])
def test_all_shards_unreadable_is_one_config_error(shard_dir, workers):
    for p in shard_dir.glob("train-*.tar"):
        cut(p)
    with pytest.raises(ConfigError, match=r"^data.train_shards: all 4 shards are unreadable \(e.g. .*train-0000\d\d"
                                          r"\.tar: truncated tar[^\n]*$"):
        take(train_loader(cfg_for(shard_dir, num_workers=workers)), 1)


def test_manifest_check_names_missing_empty_and_resized_shards(shard_dir, capfd):
    (shard_dir / "train-000000.tar").unlink()
    (shard_dir / "train-000002.tar").write_bytes(b"")
    cut(shard_dir / "train-000003.tar")
    size = (shard_dir / "train-000003.tar").stat().st_size
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    want = manifest["splits"]["train"]["shards"][3]["bytes"]
    take(train_loader(cfg_for(shard_dir)), 1)
    lines = [x for x in capfd.readouterr().err.splitlines() if "manifest.json lists" in x]
    assert lines == [f"warning: manifest.json lists 3 train shard(s) that are missing or of the wrong size: "
                     f"train-000000.tar (missing), train-000002.tar (0 bytes, manifest says {want}), "
                     f"train-000003.tar ({size} bytes, manifest says {want})"]


def test_manifest_without_sizes_checks_existence_only(shard_dir, capfd):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        del s["bytes"]
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    cut(shard_dir / "train-000003.tar")
    (shard_dir / "train-000000.tar").unlink()
    assert ShardSet.open(str(shard_dir / "train-*.tar"), 'data.train_shards').problems() == ["train-000000.tar (missing)"]
    assert ShardSet.open(str(shard_dir / "train-00000[1-3].tar"), 'data.train_shards').problems() == []


# ---- the trainer ---------------------------------------------------------------------------------


def test_training_goes_on_past_a_damaged_shard_and_logs_the_count(tmp_path, capfd):
    from evdm.train import train
    from conftest import load_tiny, make_train_shards

    shards = tmp_path / "shards"
    shards.mkdir()
    make_train_shards(shards, train_shards=3, per_shard=2)
    cut(shards / BAD)
    out = train(load_tiny(shards, tmp_path / "run", **{"train.max_steps": 4, "train.log_every": 2,
                                                         "train.val_every": 100, "train.preview_every": 100,
                                                         "data.shuffle_buffer": 0}))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 4 good clips a pass, batch 2: steps 1-2 read pass 0, steps 3-4 pass 1; the shard is dealt once a pass.
    assert [(r["step"], r["skipped_shards"]) for r in records] == [(2, 1), (4, 2)]
    err = capfd.readouterr().err
    assert len(warning_lines(err)) == 1 and "Traceback" not in err


def test_every_shard_unreadable_exits_2_with_one_line(tmp_path):
    from conftest import make_train_shards, run_cli, set_args, tiny_overrides

    shards = tmp_path / "shards"
    shards.mkdir()
    make_train_shards(shards, train_shards=2, per_shard=2)
    for p in shards.glob("train-*.tar"):
        p.write_text("not a tar\n" * 100)
    proc = run_cli(["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shards, tmp_path / "run",
                                                                                **{"data.num_workers": 2}))])
    assert proc.returncode == 2, proc.stderr[-2000:]
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "all 2 shards are unreadable" in error and "train-00000" in error and "not a tar file" in error
    assert "Traceback" not in proc.stderr


# ---- sha256 against the manifest: inspect --verify and data.verify_shards ------------------------------


def flip_pixels(path: Path, n: int = 50) -> None:
    """Invert n pixel bytes of the first clip: the tar and .npy headers stay valid, only the sha256 tells."""
    raw = bytearray(path.read_bytes())
    start = 512 + 128 + 1000
    raw[start:start + n] = bytes(255 - b for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


def test_inspect_verify_names_each_changed_or_missing_shard(shard_dir, capsys):
    from preprocess.inspect import main as inspect_main

    assert inspect_main([str(shard_dir), "--verify"]) == 0
    assert "verified 5 shards: 0 missing or changed" in capsys.readouterr().out
    flip_pixels(shard_dir / BAD)
    (shard_dir / "val-000000.tar").unlink()
    assert inspect_main([str(shard_dir), "--verify"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{BAD}: sha256 [0-9a-f]{{16}}\.\.\. differs from the manifest's [0-9a-f]{{16}}\.\.\. "
                        r"\(damaged or replaced since it was written\)", out[-3])
    assert out[-2:] == ["val-000000.tar: missing", "verified 5 shards: 2 missing or changed"]


def test_verify_shards_skips_a_shard_whose_pixels_changed(shard_dir, pristine, capfd, monkeypatch):
    from evdm.data import stream

    flip_pixels(shard_dir / BAD)
    good = {b for b, name in pristine[1].items() if name != BAD}
    # Without verification the changed clip is trained on, silently.
    plain = {b for batch in take(train_loader(cfg_for(shard_dir)), 4) for b in clip_bytes(batch)}
    assert len(plain - set(pristine[1])) == 1 and not warning_lines(capfd.readouterr().err)
    hashed = []
    # stream opens a shard's file only to hash it (the tar reads go through evdm.data.tar)
    monkeypatch.setattr(stream, "open", lambda url, mode: hashed.append(url) or open(url, mode), raising=False)
    loader = train_loader(cfg_for(shard_dir, verify_shards=True))
    seen = {b for batch in take(loader, 2 * len(good) // 4) for b in clip_bytes(batch)}  # two passes
    assert seen == good and loader.skipped_shards == 2
    (line,) = warning_lines(capfd.readouterr().err)
    assert BAD in line and "differs from manifest.json" in line
    assert sorted(hashed) == sorted(str(p) for p in shard_dir.glob("train-*.tar"))  # once each, not once a pass


def test_verify_shards_needs_a_manifest(shard_dir):
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"data.verify_shards = true needs manifest.json beside .*train-000000"):
        train_loader(cfg_for(shard_dir, verify_shards=True))


def test_damaged_val_shard_is_left_out_with_one_line(shard_dir, capfd):
    originals = [c for _, c in iter_clips(str(shard_dir / "val-000000.tar"))]
    shutil.copy(shard_dir / "val-000000.tar", shard_dir / "val-000001.tar")
    cut(shard_dir / "val-000000.tar")
    val = val_clips(cfg_for(shard_dir, val_clips=3))
    assert clip_bytes(val) == [c.tobytes() for c in originals[:3]]  # from the intact copy
    (line,) = [x for x in capfd.readouterr().err.splitlines() if x.startswith("warning:")]
    assert line.startswith(f"warning: skipping shard {shard_dir / 'val-000000.tar'}: truncated tar")
    assert line.endswith("(data.val_shards)")  # the same line as a train shard's, naming the set


def test_start_up_check_without_a_manifest_peeks_past_a_damaged_first_shard(shard_dir):
    (shard_dir / "manifest.json").unlink()
    (shard_dir / "train-000000.tar").write_text("not a tar\n" * 100)
    open_checked(cfg_for(shard_dir))
    for p in shard_dir.glob("train-*.tar"):
        p.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"^data.train_shards: no shard can be read \(e.g. .*train-000000.tar: empty"):
        open_checked(cfg_for(shard_dir))
