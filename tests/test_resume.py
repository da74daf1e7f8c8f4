"""--resume when it cannot be exact (evdm.train.outdir) and when last.pt is damaged (evdm.train.outdir).

Tiny runs on conftest's shards: a checkpoint records what the data stream depends on; a resume that
would skip or repeat clips unseen is refused in one line, every other difference gets one warning line,
a new shard list restarts the stream with the epoch column going on, and a damaged last.pt falls back to
the newest intact snapshot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import load_tiny, make_train_shards, run_cli, set_args, tiny_overrides
from evdm.checkpoint import CheckpointError, load_checkpoint
from evdm.config import ConfigError
from evdm.data.shardset import ShardSet

QUICK = {"train.preview_every": 1000}  # no previews: sampling costs more than these tests' steps


def train_tiny(shards: Path, out: Path, *, resume: bool = False, **sets) -> Path:
    from evdm.train import train

    return train(load_tiny(shards, out, **{**QUICK, **sets}), resume=resume)


def epochs(out: Path) -> dict[int, float]:
    return {r["step"]: r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: --resume:")]


@pytest.fixture
def shards(tmp_path) -> Path:
    """Shards of their own: one test rewrites them."""
    path = tmp_path / "shards"
    make_train_shards(path)
    return path


def test_checkpoint_records_what_the_stream_depends_on(shards, tmp_path):
    out = train_tiny(shards, tmp_path / "run", **{"train.max_steps": 2, "data.shuffle_buffer": 9})
    assert torch.load(out / "last.pt", weights_only=True)["stream"] == {
        "batch_size": 2, "grad_accum_steps": 1, "num_workers": 0, "shuffle_buffer": 9, "world_size": 1,
        "shard_list": ShardSet.open(f"{shards}/train-*.tar", 'data.train_shards').identity(), "train_clips": 32,
        "start_step": 0, "start_epoch": 0.0,
    }


def test_other_clips_per_step_is_refused_in_one_line(shards, tmp_path):
    out = tmp_path / "run"
    train_tiny(shards, out, **{"train.max_steps": 3})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_cli(["train.py", "configs/smoke.toml", "--resume",
                    *set_args(tiny_overrides(shards, out, **QUICK, **{"train.batch_size": 1}))])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "1 clip(s) per step" in proc.stderr and "the checkpoint on 2 (2 x 1 x 1)" in proc.stderr
    assert "skip or repeat 3 clips" in proc.stderr and "--set train.grad_accum_steps=2" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_each_change_that_costs_exactness_is_one_warning_line(shards, tmp_path, capfd):
    out = tmp_path / "run"
    train_tiny(shards, out, **{"train.max_steps": 3})
    capfd.readouterr()
    # The same 2 clips per step as 1 x 2, another shuffle buffer, 2 workers instead of 0.
    changed = {"train.batch_size": 1, "train.grad_accum_steps": 2, "data.shuffle_buffer": 7, "data.num_workers": 2}
    train_tiny(shards, out, resume=True, **{"train.max_steps": 4, **changed})
    lines = warnings_in(capfd.readouterr().err)
    assert len(lines) == 3, lines
    assert "2 x 1 x 1 -> 1 x 2 x 1: still 2 clips per step" in lines[0]
    assert "data.num_workers 0 -> 2" in lines[1] and "data.shuffle_buffer 64 -> 7" in lines[2]
    assert all("not bit-identical" in line for line in lines)
    # The position in the stream is kept: the epoch column goes on as in a straight run.
    assert epochs(out)[4] == 4 * 2 / 32
    # Resuming again with the same settings says nothing: the checkpoint holds the new ones.
    train_tiny(shards, out, resume=True, **{"train.max_steps": 5, **changed})
    assert warnings_in(capfd.readouterr().err) == []


def test_resharding_restarts_the_stream_and_the_epoch_column_goes_on(shards, tmp_path, capfd):
    out = tmp_path / "run"
    train_tiny(shards, out, **{"train.max_steps": 3})
    make_train_shards(shards, per_shard=16)  # re-sharded in place: 64 clips instead of 32, same names
    capfd.readouterr()
    train_tiny(shards, out, resume=True, **{"train.max_steps": 6})
    (line,) = warnings_in(capfd.readouterr().err)
    assert "data.train_shards: the shard list differs" in line and "(32 -> 64 clips" in line
    assert "epoch column goes on from 0.1875" in line
    # 3 steps of 2 clips over 32 clips, then steps of 2 clips over 64: never backwards.
    assert epochs(out) == {2: 2 * 2 / 32, 3: 3 * 2 / 32, 4: 3 * 2 / 32 + 1 * 2 / 64, 6: 3 * 2 / 32 + 3 * 2 / 64}
    stream = torch.load(out / "last.pt", weights_only=True)["stream"]
    assert stream["start_step"] == 3 and stream["train_clips"] == 64


def test_the_new_stream_starts_at_its_first_batch(shards, tmp_path, monkeypatch):
    """After a re-shard the loader starts at batch 0 (a new pass), and a later resume fast-forwards from there."""
    out = tmp_path / "run"
    train_tiny(shards, out, **{"train.max_steps": 3})
    make_train_shards(shards, per_shard=16)
    starts = []
    import evdm.train.loop as loop

    make = loop.make_train_loader
    monkeypatch.setattr(loop, "make_train_loader", lambda cfg, train, **kw: starts.append(kw["start_batch"]) or make(cfg, train, **kw))
    train_tiny(shards, out, resume=True, **{"train.max_steps": 5})
    train_tiny(shards, out, resume=True, **{"train.max_steps": 6})
    assert starts == [0, 2]


def test_a_checkpoint_from_before_the_record_is_checked_by_its_config(shards, tmp_path, capfd):
    out = tmp_path / "run"
    train_tiny(shards, out, **{"train.max_steps": 2})
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["stream"]
    torch.save(ckpt, out / "last.pt")
    with pytest.raises(ConfigError, match=r"1 clip\(s\) per step .* the checkpoint on 2 \(2 x 1 x 1\)"):
        train_tiny(shards, out, resume=True, **{"train.max_steps": 3, "train.batch_size": 1})
    capfd.readouterr()
    train_tiny(shards, out, resume=True, **{"train.max_steps": 3})
    (line,) = warnings_in(capfd.readouterr().err)
    assert "predates the record of world size and shard list" in line
    assert epochs(out)[3] == 3 * 2 / 32


def test_shard_list_identity_follows_the_manifest_or_the_urls(shards, tmp_path):
    spec = f"{shards}/train-*.tar"
    first = ShardSet.open(spec, 'data.train_shards').identity()
    assert ShardSet.open(f"{shards}/train-00000[0-3].tar", 'data.train_shards').identity() == first
    assert ShardSet.open(f"{shards}/train-00000[0-2].tar", 'data.train_shards').identity() != first
    make_train_shards(shards, per_shard=8, train_shards=4)  # the same clips again: the same sha256s
    assert ShardSet.open(spec, 'data.train_shards').identity() == first
    (shards / "manifest.json").unlink()
    assert ShardSet.open(spec, 'data.train_shards').identity() != first  # now the urls alone


# ---- a damaged last.pt --------------------------------------------------------------------------


def flip_a_byte(path: Path) -> None:
    """Bit rot in the middle of the file: inside a tensor's bytes, which torch.load alone would not notice."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def pristine_run(shard_dir, tmp_path_factory) -> Path:
    """A run of 6 steps with snapshots at 3 and 6; last.pt at 6 (trained once, copied for each test)."""
    out = tmp_path_factory.mktemp("pristine") / "run"
    train_tiny(shard_dir, out, **{"train.max_steps": 6, "train.snapshot_every": 3})
    return out


@pytest.fixture
def snapshots(pristine_run, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_run, tmp_path / "run"))


def test_flipped_bit_in_a_checkpoint_is_refused_on_load(snapshots):
    flip_a_byte(snapshots / "step_0000003.pt")
    with pytest.raises(CheckpointError, match=r"step_0000003.pt: damaged checkpoint \(CRC mismatch in .*bit rot"):
        load_checkpoint(snapshots / "step_0000003.pt")


@pytest.mark.parametrize("damage", [flip_a_byte, cut_short], ids=["bit-rot", "cut-short"])
def test_damaged_last_pt_falls_back_to_the_newest_intact_snapshot(shard_dir, snapshots, capfd, damage):
    damage(snapshots / "last.pt")
    capfd.readouterr()
    train_tiny(shard_dir, snapshots, resume=True, **{"train.max_steps": 7, "train.snapshot_every": 3})
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and f"{snapshots / 'last.pt'}: damaged" in lines[0]
    assert f"resuming from {snapshots / 'step_0000006.pt'} (step 6) instead" in lines[0]
    assert load_checkpoint(snapshots / "last.pt")["step"] == 7  # written anew, intact


def test_fallback_skips_damaged_snapshots_and_refuses_when_none_is_intact(shard_dir, snapshots, capfd):
    flip_a_byte(snapshots / "last.pt")
    cut_short(snapshots / "step_0000006.pt")
    train_tiny(shard_dir, snapshots, resume=True, **{"train.max_steps": 4, "train.snapshot_every": 100})
    assert f"resuming from {snapshots / 'step_0000003.pt'} (step 3) instead" in capfd.readouterr().err
    assert [r for r in epochs(snapshots)] == [2, 3, 4]  # the records past step 3 were redone

    for snapshot in snapshots.glob("step_*.pt"):
        flip_a_byte(snapshot)
    flip_a_byte(snapshots / "last.pt")
    proc = run_cli(["train.py", "configs/smoke.toml", "--resume",
                    *set_args(tiny_overrides(shard_dir, snapshots, **QUICK, **{"train.max_steps": 8}))])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "last.pt: damaged checkpoint" in proc.stderr and "no intact step_*.pt" in proc.stderr
