"""A full disk while writing checkpoints, metrics, previews and sample/evaluate outputs: one line naming the
path and the space left, the previous checkpoint still loadable, no temporary file left behind.

Two ways to fill a disk: a real tmpfs of a few MiB mounted by the test (needs root and mount rights;
skipped, with the reason, where mounting is impossible), and, everywhere, open() patched so that writes
to chosen paths fail with ENOSPC the way the kernel reports it.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_tiny, run_cli, set_args, tiny_overrides
from evdm import evaluate as ev
from evdm.checkpoint import load_checkpoint

QUICK = {"train.preview_every": 1000}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def sample_main(args: list) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_entry", Path(__file__).resolve().parents[1] / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def one_disk_full_line(err: str, where: Path) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {where}") and "no space left on the device" in err and "MiB free there" in err, err


# ---- writes that fail with ENOSPC (patched open) ------------------------------------------------------


class NoSpaceFile(io.FileIO):
    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(pattern, after=0): files opened for writing whose path matches the glob `pattern` fail every
    write with ENOSPC, from the (after + 1)-th such file on (builtins.open and io.open, which pathlib uses)."""
    real_open = builtins.open

    def arm(pattern: str, after: int = 0) -> None:
        opened = []

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax") and fnmatch.fnmatch(os.fspath(file), pattern):
                opened.append(file)
                if len(opened) > after:
                    raw = NoSpaceFile(file, mode.replace("b", "").replace("t", ""))
                    return raw if "b" in mode else io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        if sys.version_info < (3, 11):  # 3.10's pathlib took its own reference to io.open when imported
            monkeypatch.setattr(pathlib._normal_accessor, "open", open_)

    return arm


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(shard_dir, tmp_path, full_disk, monkeypatch):
    from evdm.train import train

    out = tmp_path / "run"
    full_disk("*/last.pt.tmp", after=1)  # the save at step 3 goes through, the one at step 6 finds the disk full
    with pytest.raises(OSError) as err:  # DiskFullError, an OSError
        train(load_tiny(shard_dir, out, **QUICK))
    one_disk_full_line(f"error: {err.value}\n", out / "last.pt")
    assert load_checkpoint(out / "last.pt")["step"] == 3 and leftovers(out) == []
    monkeypatch.undo()  # space freed: the rerun resumes from step 3
    train(load_tiny(shard_dir, out, **QUICK), resume=True)
    assert load_checkpoint(out / "last.pt")["step"] == 6


@pytest.mark.parametrize("pattern, name, sets", [
    ("*/metrics.jsonl", "metrics.jsonl", QUICK),
    ("*/previews/*", "previews/step_0000002.png", {"train.preview_every": 2}),
    ("*/loss.png.tmp.png", "loss.png", QUICK),
], ids=["metrics", "preview", "loss-plot"])
def test_run_logs_on_a_full_disk_stop_the_run_in_one_line(shard_dir, tmp_path, full_disk, pattern, name, sets):
    from evdm.train import train

    out = tmp_path / "run"
    full_disk(pattern)
    with pytest.raises(OSError) as err:
        train(load_tiny(shard_dir, out, **sets))
    one_disk_full_line(f"error: {err.value}\n", out / name)
    assert leftovers(out) == []


def test_sample_outputs_on_a_full_disk(ckpt, val_shards, tmp_path, full_disk, capsys):
    out = tmp_path / "samples"
    full_disk(f"{out}/*")
    rc = sample_main(["--ckpt", ckpt, "--shards", val_shards, "--num", 2, "--steps", 1, "--device", "cpu",
                      "--out_dir", out])
    assert rc == 1
    one_disk_full_line(capsys.readouterr().err, out)
    assert leftovers(out) == []


@pytest.mark.parametrize("flag", ["--json", "--examples"])
def test_evaluate_outputs_on_a_full_disk(ckpt, val_shards, tmp_path, full_disk, capsys, flag):
    path = tmp_path / "eval" / ("eval.json" if flag == "--json" else "examples.png")
    full_disk(f"{path}*")
    rc = ev.main(["--ckpt", str(ckpt), "--shards", val_shards, "--num", "2", "--steps", "1", "--device", "cpu",
                  flag, str(path)])
    out, err = capsys.readouterr()
    assert rc == 1
    one_disk_full_line(err, path)
    assert leftovers(tmp_path / "eval") == []
    if flag == "--json":
        assert "linear blend" in out  # the table came first: the numbers are not lost with the file


# ---- a real small filesystem --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted at tmp_path/disk, unmounted after; skipped where mounting is impossible."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True,
                              text=True)
    except OSError as err:
        pytest.skip(f"no mount command here ({err}); the patched-open tests above cover the same code")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the patched-open tests cover the same code")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Leave no free block on `disk`."""
    with open(disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_training_on_a_small_disk_stops_in_one_line_and_resumes_after(shard_dir, small_disk):
    """Checkpoints of about 1.4 MB every step, plus a snapshot each: a 6 MiB disk fills up within a few steps."""
    out = small_disk / "run"
    args = set_args(tiny_overrides(shard_dir, out, **QUICK, **{"train.max_steps": 20, "train.ckpt_every": 1,
                                                                "train.snapshot_every": 1, "train.val_every": 100}))
    proc = run_cli(["train.py", "configs/smoke.toml", *args])
    assert proc.returncode == 1, proc.stderr
    one_disk_full_line(proc.stderr, out)
    step = load_checkpoint(out / "last.pt")["step"]
    assert 1 <= step < 20 and leftovers(out) == []
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run_cli(["train.py", "configs/smoke.toml", "--resume", *args])
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 20


def test_sample_and_evaluate_on_a_full_small_disk(ckpt, val_shards, small_disk):
    fill(small_disk)
    out = small_disk / "samples"
    proc = run_cli(["sample.py", "--ckpt", str(ckpt), "--shards", val_shards, "--num", "2", "--steps", "1",
                    "--device", "cpu", "--out_dir", str(out)])
    assert proc.returncode == 1, proc.stderr
    one_disk_full_line(proc.stderr, out)
    assert leftovers(out) == []
    path = small_disk / "eval.json"
    proc = run_cli(["-m", "evdm.evaluate", "--ckpt", str(ckpt), "--shards", val_shards, "--num", "2", "--steps", "1",
                    "--device", "cpu", "--json", str(path)])
    assert proc.returncode == 1 and "linear blend" in proc.stdout, proc.stderr
    one_disk_full_line(proc.stderr, path)
    assert leftovers(small_disk) == [] and not path.exists()
