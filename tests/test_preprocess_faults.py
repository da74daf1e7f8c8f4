"""The shard writers under faults: two runs on one SHARD_DIR, a read-only folder (the trainer's out_dir too), a
full disk, and --fps far above a video's own rate. Each ends in one line with the documented exit code and
leaves a folder that `inspect --verify` accepts, or that a rerun completes byte-identically.
"""

import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, set_args, tiny_overrides
from evdm.atomic import DiskFullError
from evdm.ffmpeg import ffmpeg_exe
from evdm.lock import LOCK_NAME, lock_folder
from preprocess import bair
from preprocess.inspect import main as inspect_main
from preprocess.inspect import read_samples
from preprocess.options import UserError
from preprocess.shard import main as shard_main
from test_bair import dataset  # noqa: F401  (fixture)
from test_disk_full import fill, full_disk, small_disk  # noqa: F401  (fixtures)
from test_shard import data  # noqa: F401  (fixture: 8 videos at 10 fps, 16 px)

ROOT = Path(__file__).resolve().parents[1]


def shard_args(data: Path, out: Path, *flags) -> list[str]:
    return [str(data), str(out), "--T", "4", "--size", "16", "--shard-size", "6", "--workers", "1", *flags]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ---- two writers on one SHARD_DIR ---------------------------------------------------------------------

# `python -c RACER READY GO ARGS...`: preprocess.shard ARGS, started once the file GO exists (after writing READY),
# so two of them leave the barrier together, each with its imports already done.
RACER = """
import sys, time
from pathlib import Path
from preprocess.shard import main
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sizes", [(16, 16), (16, 24)], ids=["same options", "other options"])
def test_two_runs_started_together_one_proceeds_the_other_is_refused(data, tmp_path, sizes):
    # A slow ffmpeg (a wrapper that sleeps first) so the first run still holds the folder when the second arrives.
    slow = tmp_path / "slow-ffmpeg"
    slow.write_text(f"#!/bin/sh\nsleep 0.1\nexec '{ffmpeg_exe()}' \"$@\"\n")
    slow.chmod(0o755)
    out, go = tmp_path / "shards", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / f"ready{k}"), str(go),
                               *shard_args(data, out, "--size", str(size))], cwd=ROOT, text=True,
                              env=dict(os.environ, EVDM_FFMPEG=str(slow)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for k, size in enumerate(sizes)]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], errs
    won = [p.returncode for p in procs].index(0)
    err = one_line(errs[1 - won])
    assert err.startswith(f"error: SHARD_DIR {out} is in use by pid {procs[won].pid} on host {socket.gethostname()} "
                          f"({out / LOCK_NAME})"), err
    assert inspect_main([str(out), "--verify"]) == 0
    manifest = (out / "manifest.json").read_text()
    assert f'"size": {sizes[won]}' in manifest and not list(out.glob("*.tmp")) and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("tool", [shard_main, bair.main], ids=["shard", "bair"])
def test_the_lock_is_taken_before_anything_else(tmp_path, capsys, tool):
    """The refusal comes before the input is even looked at (this input does not exist)."""
    out = tmp_path / "shards"
    with lock_folder(out, "SHARD_DIR", UserError):
        assert tool([str(tmp_path / "no-such-input"), str(out), "--workers", "1"]) == 2
        assert (out / LOCK_NAME).exists()  # the refused run leaves the holder's lock alone
    err = one_line(capsys.readouterr().err)
    assert err == (f"error: SHARD_DIR {out} is in use by pid {os.getpid()} on host {socket.gethostname()} "
                   f"({out / LOCK_NAME}); wait for that run to end or choose another SHARD_DIR")


def test_preprocess_stays_torch_free():
    code = "import sys, preprocess.shard, preprocess.bair; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout == "False\n"


# ---- a folder that cannot be written ------------------------------------------------------------------

# `python -c READ_ONLY TARGET ARGS...`: train.py or a module (-m) with ARGS, where opening any .lock fails as on a
# read-only mount.
READ_ONLY = """
import errno, os, runpy, sys
real_open = os.open
def read_only(path, flags, *args, **kwargs):
    if os.fspath(path).endswith("/.lock"):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
    return real_open(path, flags, *args, **kwargs)
os.open = read_only
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def read_only_lines(out: Path, label: str) -> str:
    return (f"error: {label} {out} cannot be written (Read-only file system); make it writable or choose "
            f"another {label}")


@pytest.mark.parametrize("tool", ["train.py", "preprocess.shard", "preprocess.bair"])
def test_a_read_only_folder_is_one_line_exit_2(shard_dir, data, tmp_path, tool):
    out = tmp_path / "out"
    out.mkdir()
    args = {"train.py": ["configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out)), "--resume"],
            "preprocess.shard": shard_args(data, out), "preprocess.bair": [str(tmp_path), str(out)]}[tool]
    proc = run_cli(["-c", READ_ONLY, tool, *args])
    assert proc.returncode == 2 and one_line(proc.stderr) == read_only_lines(
        out, "train.out_dir" if tool == "train.py" else "SHARD_DIR")


@pytest.fixture
def read_only():
    """read_only(folder): `folder` bind-mounted read-only onto itself until the test ends; skipped where
    mounting is impossible (no root, no mount rights: the patched test above covers the same code)."""
    mounted = []

    def mount(*args) -> None:
        try:
            proc = subprocess.run(["mount", *args], capture_output=True, text=True)
        except OSError as err:
            pytest.skip(f"no mount command here ({err})")
        if proc.returncode != 0:
            pytest.skip(f"cannot bind-mount read-only here ({proc.stderr.strip()})")

    def remount(folder: Path) -> None:
        mount("--bind", folder, folder)
        mounted.append(folder)
        mount("-o", "remount,bind,ro", folder)

    yield remount
    for folder in mounted:
        subprocess.run(["umount", "-l", folder], check=True)


def test_resume_on_a_read_only_mount_is_one_line_exit_2(shard_dir, data, tmp_path, read_only):
    run, shards = tmp_path / "ro" / "run", tmp_path / "ro" / "shards"
    run.mkdir(parents=True)  # what a run left there is never read: the lock comes first
    assert shard_main(shard_args(data, shards)) == 0
    read_only(tmp_path / "ro")
    proc = run_cli(["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, run)), "--resume"])
    assert proc.returncode == 2 and one_line(proc.stderr) == read_only_lines(run, "train.out_dir")
    proc = run_cli(["-m", "preprocess.shard", *shard_args(data, shards)])
    assert proc.returncode == 2 and one_line(proc.stderr) == read_only_lines(shards, "SHARD_DIR")
    assert inspect_main([str(shards), "--verify"]) == 0  # reading still works


# ---- a full disk: exit 1, as the trainer ---------------------------------------------------------------


def disk_full_line(err: str, where: Path) -> None:
    line = one_line(err)
    assert line.startswith(f"error: {where}") and line.endswith(" MiB free there)"), line
    assert ": no space left on the device (" in line, line


def test_a_full_disk_is_one_line_exit_1_and_the_rerun_resumes(data, tmp_path, capsys, full_disk):
    straight, out = tmp_path / "straight", tmp_path / "full"
    assert shard_main(shard_args(data, straight)) == 0
    full_disk(f"{out}/train-000001.tar.tmp")
    capsys.readouterr()
    assert shard_main(shard_args(data, out)) == 1
    disk_full_line(capsys.readouterr().err, out / "train-000001.tar")
    assert (out / "train-000000.tar").exists() and not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    full_disk("nothing")
    assert shard_main(shard_args(data, out)) == 0
    assert folder_bytes(out) == folder_bytes(straight)


def test_disk_full_error_crosses_a_process_pool():
    err = pickle.loads(pickle.dumps(DiskFullError(Path("/x/train-000003.tar"), 3 << 20)))
    assert isinstance(err, DiskFullError)
    assert str(err) == "/x/train-000003.tar: no space left on the device (3.0 MiB free there)"


def test_both_writers_on_a_really_full_disk(data, dataset, small_disk, tmp_path):  # noqa: F811
    root, _ = dataset
    commands = {"shard": ["-m", "preprocess.shard", *shard_args(data, small_disk / "shard")],
                "bair": ["-m", "preprocess.bair", str(root), str(small_disk / "bair"), "--workers", "2"]}
    fill(small_disk)
    with open(small_disk / "filler", "r+b") as f:  # a little room: the runs start, then a shard fills the disk
        f.truncate(f.seek(0, os.SEEK_END) - (32 << 10))
    for name, command in commands.items():
        proc = run_cli(command, timeout=120)
        assert proc.returncode == 1, proc.stderr
        disk_full_line(proc.stderr, small_disk / name)
        assert not list((small_disk / name).glob("*.tmp"))
    (small_disk / "filler").unlink()
    for name, command in commands.items():
        assert run_cli(command, timeout=120).returncode == 0
        straight = tmp_path / f"straight-{name}"
        assert run_cli([arg.replace(str(small_disk / name), str(straight)) for arg in command]).returncode == 0
        assert folder_bytes(small_disk / name) == folder_bytes(straight)


# ---- --fps far above a video's rate -------------------------------------------------------------------


def test_upsampling_warns_and_past_2x_is_refused_before_any_decode(data, tmp_path, capsys, monkeypatch):
    import preprocess.rates
    import preprocess.shard

    out = tmp_path / "x100"
    monkeypatch.setattr(preprocess.shard, "process_video", lambda *a: pytest.fail("decoded before the refusal"))
    assert shard_main(shard_args(data, out, "--fps", "1000")) == 2
    assert one_line(capsys.readouterr().err) == (
        "error: --fps 1000 is over 2x the frame rate of 8 videos (up to 100x: videos_train/a.mp4 at 10 fps): their "
        "clips would be mostly repeated frames; lower --fps, or pass --allow-upsampling")
    assert not list(out.glob("*.tar"))
    monkeypatch.undo()

    assert shard_main(shard_args(data, tmp_path / "x1.5", "--fps", "15")) == 0
    warning = ("warning: --fps 15 is above the frame rate of 8 videos (up to 1.5x: videos_train/a.mp4 at 10 fps): "
               "their frames are repeated to fill it\n")
    assert capsys.readouterr().err == warning
    # A rerun takes the rates of finished shards from progress.json: nothing is probed again.
    monkeypatch.setattr(preprocess.rates, "probe_task", lambda *a: pytest.fail("probed again"))
    assert shard_main(shard_args(data, tmp_path / "x1.5", "--fps", "15")) == 0
    assert capsys.readouterr().err == warning
    monkeypatch.undo()

    forced = tmp_path / "forced"
    flags = ["--fps", "1000", "--allow-upsampling", "--max-clips-per-video", "1"]
    assert shard_main(shard_args(data, forced, *flags)) == 0
    assert "warning: --fps 1000 is above the frame rate of 8 videos (up to 100x" in capsys.readouterr().err
    clips = [s["clip"] for tar in forced.glob("*.tar") for s in read_samples(tar).values()]
    assert clips and all(len({frame.tobytes() for frame in clip}) <= 2 for clip in clips)  # what was refused


@pytest.mark.parametrize("decoder", ["ffmpeg", "pyav"])
def test_the_probe_reads_the_rate_the_decoder_reports(data, tmp_path, decoder):
    """Batched (one ffmpeg for all), a file ffmpeg cannot open in the middle, and an audio-only file."""
    if decoder == "pyav":
        pytest.importorskip("av", reason="PyAV (av) is not installed")
    from preprocess.rates import probe_task

    (tmp_path / "text.mp4").write_text("not a video")
    subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i", "sine=duration=0.2", str(tmp_path / "audio.m4a")],
                   check=True)
    videos = sorted((data / "videos_train").glob("*.mp4"))
    paths = [videos[0], tmp_path / "text.mp4", videos[1], tmp_path / "audio.m4a", *videos[2:]]
    assert probe_task((paths, decoder)) == [10.0, None, 10.0, None] + [10.0] * len(videos[2:])
