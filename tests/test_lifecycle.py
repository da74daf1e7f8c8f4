"""A run's lifecycle with real signals to real processes: preemption at any moment, out_dir protection.

Signals go to the whole process group (os.killpg), as Slurm, Kubernetes and `docker stop` send them,
so DataLoader workers get them too. Runs use conftest's tiny config and shards; the tests wait for
files (metrics.jsonl records, config.toml) rather than for fixed times.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, load_tiny, run_cli, set_args, signal_during_step, tiny_overrides
from evdm.train.outdir import lock_out_dir
from evdm.train.report import read_metrics

QUICK = {"train.preview_every": 1000}  # no previews: sampling and MP4s cost more than these tests' steps
LONG = {**QUICK, "train.max_steps": 100_000, "train.val_every": 100_000, "train.ckpt_every": 100_000,
        "train.snapshot_every": 100_000, "train.log_every": 1}


def start(shard_dir: Path, out: Path, *extra_args: str, env: dict | None = None, **sets) -> subprocess.Popen:
    """train.py in a new process group (its own session, like a batch job); output to files beside out."""
    args = set_args(tiny_overrides(shard_dir, out, **{**LONG, **sets}))
    logs = out.parent / f"{out.name}.{env['RANK'] if env else 0}"
    return subprocess.Popen(
        [sys.executable, "train.py", "configs/smoke.toml", *args, *extra_args], cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=open(f"{logs}.out", "w"), stderr=open(f"{logs}.err", "w"),
        # A new session for one run; ranks share a process group in this session (setpgid cannot cross one).
        # setpgid through preexec_fn: Popen's process_group argument needs Python 3.11.
        start_new_session=env is None,
        preexec_fn=None if env is None else functools.partial(os.setpgid, 0, int(env.get("PGID", 0))),
    )


def wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def records(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def finish(proc: subprocess.Popen, out: Path, rank: int = 0) -> tuple[str, str]:
    """Wait for the exit (a few seconds is the promise; the limit is generous for a loaded CI machine)."""
    proc.wait(timeout=120)
    logs = out.parent / f"{out.name}.{rank}"
    return Path(f"{logs}.out").read_text(), Path(f"{logs}.err").read_text()


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_saved_at_last_record(out: Path, log_every: int = 1) -> int:
    """last.pt holds the last completed step, and metrics.jsonl has every log step's record up to it and
    the record of that step itself."""
    step = torch.load(out / "last.pt", weights_only=True)["step"]
    log_steps = list(range(log_every, step + 1, log_every))
    assert [r["step"] for r in records(out)] == log_steps + ([step] if step % log_every else [])
    assert not list(out.glob("*.tmp"))
    return step


@pytest.mark.parametrize("sig, ckpt_every", [(signal.SIGTERM, 100_000), (signal.SIGINT, 1)],
                         ids=["sigterm", "sigint-while-checkpointing-every-step"])
def test_signal_to_the_group_with_workers_saves_and_exits_0(shard_dir, tmp_path, sig, ckpt_every):
    out = tmp_path / "run"
    proc = start(shard_dir, out, **{"data.num_workers": 2, "train.ckpt_every": ckpt_every})
    wait_for(lambda: len(records(out)) >= 3, "three steps")
    os.killpg(proc.pid, sig)
    stdout, stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr
    step = assert_saved_at_last_record(out)
    assert step >= 3 and f"interrupted at step {step}" in stdout
    # Only the step-0 validation ran before the stop (best.pt, the untrained network): no loss.png, an
    # empty previews/; neither is listed.
    assert f"outputs in {out}/ (last.pt, best.pt, metrics.jsonl)\n" in stdout
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 0
    wait_for(lambda: group_gone(proc.pid), "the DataLoader workers to exit", timeout=60)


def test_signal_while_the_workers_start(shard_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(shard_dir, out, **{"data.num_workers": 2})
    # config.toml is written after the checks, just before the loader forks its workers.
    wait_for(lambda: (out / "config.toml").exists(), "config.toml")
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert_saved_at_last_record(out)
    wait_for(lambda: group_gone(proc.pid), "the DataLoader workers to exit", timeout=60)


def test_second_ctrl_c_prints_no_traceback(shard_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(shard_dir, out, **{"data.num_workers": 2})
    wait_for(lambda: len(records(out)) >= 2, "two steps")
    os.killpg(proc.pid, signal.SIGINT)
    # Signals sent back to back merge into one: the second goes once the first has been taken.
    wait_for(lambda: "SIGINT: stopping" in Path(f"{out}.0.err").read_text(), "the first SIGINT's message")
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "SIGINT again: already stopping" in stderr
    assert_saved_at_last_record(out)


def test_a_stop_between_log_steps_still_writes_the_stop_steps_record(shard_dir, tmp_path, monkeypatch):
    """log_every 5: a real SIGINT, sent by the run to itself during step 7, stops it at step 7, no log step."""
    from evdm.train import train

    signal_during_step(monkeypatch, 7, signal.SIGINT)
    out = train(load_tiny(shard_dir, tmp_path / "run", **{**LONG, "train.log_every": 5}))
    assert assert_saved_at_last_record(out, log_every=5) == 7
    assert records(out)[-1]["val_loss"] is None and records(out)[-1]["loss"] > 0


def test_sigterm_to_the_group_between_log_steps(shard_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(shard_dir, out, **{"train.log_every": 5})
    wait_for(lambda: len(records(out)) >= 1, "the record of step 5")
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert assert_saved_at_last_record(out, log_every=5) >= 5


def start_unbuffered(shard_dir: Path, out: Path, **sets) -> tuple[subprocess.Popen, Path]:
    """train.py in its own session with unbuffered output to a file (lines appear as they are printed)."""
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out, **QUICK, **sets))],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, stdout=open(log, "w"),
        stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signals_during_interpreter_shutdown_keep_exit_0(shard_dir, tmp_path, sig):
    """A run that has saved and printed "outputs in" is over: Ctrl-C pressed again and again while Python
    shuts down (it puts the default handlers back there) must not turn its exit 0 into 130 (143)."""
    out = tmp_path / "run"
    proc, log = start_unbuffered(shard_dir, out, **{"train.max_steps": 1})
    wait_for(lambda: "outputs in" in log.read_text() or proc.poll() is not None, '"outputs in"')
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        time.sleep(0.02)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc to see torch being loaded")
def test_a_signal_while_torch_loads_is_a_clean_stop(shard_dir, tmp_path):
    """The stop handlers are installed before anything imports torch (1-2 s): a SIGTERM sent while torch's
    library is being loaded stops the run cleanly (exit 0) instead of killing it (143)."""
    out = tmp_path / "run"
    proc, log = start_unbuffered(shard_dir, out)
    maps = Path(f"/proc/{proc.pid}/maps")
    wait_for(lambda: proc.poll() is not None or "libtorch" in maps.read_text(), "torch to start loading")
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


def test_sigint_during_validation_keeps_that_steps_record(shard_dir, tmp_path):
    out = tmp_path / "run"
    # Validation every step over 8 single-clip chunks: most of each step's time goes to validation.
    proc = start(shard_dir, out, **{"train.val_every": 1, "train.batch_size": 1, "data.val_clips": 8})
    wait_for(lambda: len(records(out)) >= 1, "the first step")
    first = time.monotonic()
    wait_for(lambda: len(records(out)) >= 2, "the second step")
    # Aim the signal at the next validation (it ends each step's cycle); where it lands, the promise holds.
    time.sleep(0.6 * (time.monotonic() - first))
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = finish(proc, out)
    assert proc.returncode == 0, stderr
    assert_saved_at_last_record(out)
    assert all(r["val_loss"] is not None for r in records(out)[:-1])  # only the cut one may lack it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("target", ["group", "rank1"])
def test_ddp_ranks_stop_at_the_same_step_and_rank0_saves(shard_dir, tmp_path, target):
    """Two gloo ranks launched the way srun does (no torchrun agent), one process group; the signal goes
    to the group, or to rank 1 alone: every rank must leave at the same step, rank 0 saves, all exit 0."""
    out = tmp_path / "ddp"
    base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    rank0 = start(shard_dir, out, env={**base, "RANK": "0", "LOCAL_RANK": "0"})
    rank1 = start(shard_dir, out, env={**base, "RANK": "1", "LOCAL_RANK": "1", "PGID": str(rank0.pid)})
    wait_for(lambda: len(records(out)) >= 2, "two steps")
    if target == "group":
        os.killpg(rank0.pid, signal.SIGTERM)
    else:
        rank1.send_signal(signal.SIGTERM)
    for rank, proc in enumerate((rank0, rank1)):
        stdout, stderr = finish(proc, out, rank)
        assert proc.returncode == 0, f"rank {rank}: {stderr[-3000:]}"
        assert "Traceback" not in stderr
        assert stdout.count("outputs in") == (1 if rank == 0 else 0)  # one exit message for the run
    assert_saved_at_last_record(out)


def test_a_rank_waiting_for_the_others_stops_at_once(shard_dir, tmp_path):
    """Rank 0 of 2 with no rank 1: it waits in the rendezvous (one C++ call), where no Python handler can
    run; a signal there must end it rather than wait for the rendezvous timeout (30 minutes)."""
    out = tmp_path / "ddp"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "RANK": "0",
           "LOCAL_RANK": "0"}
    proc = start(shard_dir, out, env=env)
    wait_for(lambda: (out / ".lock").exists(), "the out_dir lock, taken just before the rendezvous")
    # A signal in the instant between the lock and the rendezvous only sets the stop flag: send until it ends.
    wait_for(lambda: proc.send_signal(signal.SIGTERM) or proc.poll() is not None, "the process to end", timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert not (out / "last.pt").exists()


# ---- out_dir ----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_out_dir_with_a_checkpoint_needs_resume_or_overwrite(shard_dir, tmp_path):
    from evdm.train import train

    out = tmp_path / "run"
    train(load_tiny(shard_dir, out, **QUICK, **{"train.max_steps": 2, "train.snapshot_every": 2}))
    before = snapshot(out)
    cli = ["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out, **QUICK, **{"train.max_steps": 1}))]

    err = one_error_line(run_cli(cli))
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before

    proc = run_cli([*cli, "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert [r["step"] for r in records(out)] == [1]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    assert not (out / "step_0000002.pt").exists()


def test_resume_into_a_different_model_changes_nothing(shard_dir, tmp_path):
    from evdm.train import train

    out = tmp_path / "run"
    train(load_tiny(shard_dir, out, **QUICK, **{"train.max_steps": 1}))
    before = snapshot(out)
    changed = {"model.base_channels": 16, "diffusion.prediction": '"v"', "train.max_steps": 6}
    err = one_error_line(run_cli(["train.py", "configs/smoke.toml",
                                  *set_args(tiny_overrides(shard_dir, out, **changed)), "--resume"]))
    assert "model.base_channels (checkpoint 8, config 16)" in err
    assert "diffusion.prediction (checkpoint 'x0', config 'v')" in err
    assert snapshot(out) == before


def test_resume_from_weights_that_do_not_fit_is_one_line(shard_dir, tmp_path):
    """Same model keys, but the stored weights lack a tensor (an older code version, a hand-edited file)."""
    from evdm.train import train

    out = tmp_path / "run"
    train(load_tiny(shard_dir, out, **QUICK, **{"train.max_steps": 1}))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    dropped = sorted(ckpt["model"])[0]
    del ckpt["model"][dropped]
    torch.save(ckpt, out / "last.pt")
    before = snapshot(out)
    err = one_error_line(run_cli(["train.py", "configs/smoke.toml", "--resume",
                                  *set_args(tiny_overrides(shard_dir, out, **QUICK, **{"train.max_steps": 2}))]))
    assert "weights do not fit" in err and f"1 missing, 0 unexpected, 0 of another shape (first: {dropped})" in err
    assert snapshot(out) == before


def test_a_second_live_run_on_the_same_out_dir_is_refused(shard_dir, tmp_path):
    out = tmp_path / "run"
    first = start(shard_dir, out)
    wait_for(lambda: len(records(out)) >= 1, "the first run's first step")
    err = one_error_line(run_cli(["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, out)),
                                  "--resume"]))
    assert f"pid {first.pid} on host {socket.gethostname()}" in err and "in use" in err
    os.killpg(first.pid, signal.SIGTERM)
    _, stderr = finish(first, out)
    assert first.returncode == 0, stderr
    assert not (out / ".lock").exists()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(shard_dir, tmp_path):
    from evdm.train import train

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on host gone\n")  # left by a run killed with -9: no flock held
    train(load_tiny(shard_dir, out, **QUICK, **{"train.max_steps": 1}))
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    with lock_out_dir(out):  # the lock is free again after the run
        pass


def test_a_config_path_that_is_a_folder_is_one_line():
    err = one_error_line(run_cli(["train.py", "configs"]))
    assert "configs: is a folder" in err


def test_an_out_dir_that_is_a_file_is_one_line(shard_dir, tmp_path):
    taken = tmp_path / "run"
    taken.write_text("not a folder")
    err = one_error_line(run_cli(["train.py", "configs/smoke.toml", *set_args(tiny_overrides(shard_dir, taken))]))
    assert f"train.out_dir {taken} exists and is not a folder" in err
    assert taken.read_text() == "not a folder"
