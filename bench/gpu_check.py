"""GPU check: one command, one table, every figure the GPU issues ask of one H100/H200, in about 9 minutes.

    bash bench/gpu_check.sh                 # the check; JSON in bench/results/gpu_check.json
    bash bench/gpu_check.sh --resume        # then: only the rows the last run did not reach, merged in
    bash bench/gpu_check.sh --list          # the rows in priority order (--only NAME,... runs some)
    bash bench/gpu_check.sh --ckpt RUN/last.pt   # sample rows on trained weights
    python bench/gpu_check.py --smoke       # the same code on a CPU, tiny model (tests/test_bench.py)

First, `pytest -m gpu tests/test_gpu.py` (the GPU paths' tests: the compiled bf16 step against eager, fp16
with its GradScaler, compiled sampling, torchrun over NCCL with a stop request, pinned memory, DALI), at most
90 s: its counts, failures and skip reasons are the table's first row ("pytest -m gpu").

Rows, in priority order (reference model: 64 px, T 8, context 2 + 2, base 96, mults 1 2 4, 2 res blocks,
attention at levels 1 2; the default recipe: x0 prediction, blend residual, cosine schedule):
1. train bf16+compile, batch 64 then 128: evdm's own training step (evdm.train.step.train_step: the
   loss, clipping, AdamW, EMA) on a fixed uint8 batch, the blocks compiled regionally (evdm.denoiser):
   ms/step (median of 3 after 1 warm-up), samples/s, MFU, peak memory, and "first s", the first step:
   the cold compile at 64, what a batch change costs at 128.
2. profile bf16+compile, batch 64: the top 15 kernels by CUDA time over 3 compiled steps, the share
   and count of copy kernels among them, and the copies one eager step dispatches (bench/copies.py).
3. train bf16+compile (warm): the same step in a new process with the Inductor cache row 1 filled:
   "first s" is what a resumed run's compile costs.
4. train bf16 (eager), batch 64: the baseline the compile is measured against.
5. sample fp32 and 6. sample bf16+compile: Denoiser.generate at batch 64, guidance 1.8 (forward batch
   128), 10 DDIM steps: clips/s, ms per network call, and the mean, 99th percentile and max of
   |bf16 - fp32| over the clips (same weights, endpoints and seed). The weights: --ckpt, else the
   checkpoint the fed row trained (for the sample rows after it), else the fresh model with its
   zero-initialised tensors redrawn N(0, 0.02^2); the note names them.
7. train.py fed: evdm.train.train() on configs/bair.toml at batch 64 (compile on, as a user runs
   it), fed by the shard loader from synthetic shards: samples/s, data wait, MFU from metrics.jsonl.
8. torchrun fed (NCCL): the same under `torchrun --standalone --nproc_per_node 1`: the process group
   and DistributedDataParallel over NCCL, as any larger run.
9.-12. train fp32 (eager), sample bf16 (eager), sample bf16+cudagraphs (the whole network compiled
   with mode="reduce-overhead": does a CUDA graph pay?), train bf16+compile at batch 32.
13. upconvert bf16: 4x up-conversion (evdm.upconvert's windows, bench/upconvert.py) with the reference
   model at context (1, 1), T 5: output frames/s over two batches of 64 windows, 10 DDIM steps, guidance
   1.8 (not in --smoke; `bench/gpu_check_jobs.py --smoke --job` runs it on a CPU).

How it fits: each job runs in its own subprocess (bench/gpu_check_jobs.py) and process group, with its
own timeout: an OOM, hang or crash costs that job's rows, not the run. Rows stream back per batch; the
JSON is rewritten after every job, so an outer timeout leaves every finished row on disk. All jobs share
one Inductor cache folder in the run's scratch folder: row 1 compiles cold, later compiled rows of the
same graphs warm. A global budget (--budget, 540 s: a 10-minute command with room to start) ends the run:
jobs not started say "skipped (time budget)", one running is stopped. The estimate for an H200: a cold
regional compile is unmeasured (the whole-model compile took 124-198 s there; regional compilation
compiles each kind of block once, for every size), so row 1 is given up to 300 s.

--smoke runs each kind of row on the CPU: bench/train_step.py's "tiny" model at batch 2 and 3, the
profile of the eager step, sampling at batch 2 with 2 steps, train() and torchrun on configs/smoke.toml
resized to the tiny model. Compile rows say "skipped" (a cold CPU compile takes minutes) unless
--smoke-compile. Every subprocess gets oneDNN capped below AMX (ONEDNN_CAP), whose bf16 backward can hang.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOBS_SCRIPT = ROOT / "bench" / "gpu_check_jobs.py"  # one job per process; constants and row code there
_spec = importlib.util.spec_from_file_location("bench_gpu_check_jobs", JOBS_SCRIPT)
jobs_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs_mod)

WHEELS_HINT = "see bench/wheels/README.md (bash bench/gpu_check.sh installs bench/wheels/*.whl itself)"


def job(kind: str, precision: str, compile: bool, batches: tuple[int, ...], *, name: str | None = None, **extra) -> dict:
    label = {"train": "train", "profile": "profile", "sample": "sample", "fed": "train.py fed",
             "torchrun": "torchrun fed", "upconvert": "upconvert"}[kind]
    if kind in ("train", "profile", "sample", "upconvert"):
        label += f" {precision}" + ("+compile" if compile else "")
    return dict(name=name or label, kind=kind, precision=precision, compile=compile, batches=list(batches), **extra)


def plan(smoke: bool) -> list[dict]:
    """Every job in priority order (see the module doc); --smoke: CPU batches, an eager profile."""
    if smoke:
        return [job("train", "bf16", True, (2, 3)), job("profile", "bf16", False, (2,)), job("train", "bf16", False, (2, 3)),
                job("sample", "fp32", False, (2,)), job("sample", "bf16", True, (2,)), job("fed", "fp32", False, (2,)),
                job("torchrun", "fp32", False, (2,), name="torchrun fed (gloo)"), job("train", "fp32", False, (2, 3)),
                job("sample", "bf16", False, (2,))]
    return [
        job("train", "bf16", True, (64, 128)), job("profile", "bf16", True, (64,)),
        job("train", "bf16", True, (64,), name="train bf16+compile (warm)"), job("train", "bf16", False, (64,)),
        job("sample", "fp32", False, (64,)), job("sample", "bf16", True, (64,)), job("fed", "bf16", True, (64,)),
        job("torchrun", "bf16", True, (64,), name="torchrun fed (NCCL)"), job("train", "fp32", False, (64,)),
        job("sample", "bf16", False, (64,)),
        job("sample", "bf16", True, (64,), name="sample bf16+cudagraphs", cudagraphs=True),
        job("train", "bf16", True, (32,), name="train bf16+compile (batch 32)"), job("upconvert", "bf16", False, (64,)),
    ]


def job_cap_s(job: dict, smoke: bool) -> float:
    """Seconds one job may run before it is killed (the budget may cut it shorter)."""
    if smoke:
        return 240.0 if job["compile"] else 120.0
    if job["name"] == "train bf16+compile":
        return 300.0  # the cold compile
    return 240.0 if job["compile"] or job["kind"] in ("fed", "torchrun") else 120.0


# ---- the parent side: plan, budget, subprocesses, the table and the JSON ---------------------------------


def expected_rows(job: dict) -> list[dict]:
    fields = {k: v for k, v in job.items() if k not in ("name", "batches")}
    return [dict(job=job["name"], **fields, batch=b) for b in job["batches"]]


def run_job(job: dict, args: argparse.Namespace, work: Path, deadline: float, t0: float) -> list[dict]:
    """One job in a subprocess (its own process group) with a timeout; every expected row comes back with a status."""
    rows = expected_rows(job)
    left = deadline - time.time()
    if args.smoke and job["compile"] and not args.smoke_compile:
        return [dict(r, status="skipped (--smoke: no compile; --smoke-compile)") for r in rows]
    if left < (5 if args.smoke else 15):
        return [dict(r, status=jobs_mod.SKIP_BUDGET) for r in rows]
    timeout = min(job_cap_s(job, args.smoke), left)
    cmd = [sys.executable, str(JOBS_SCRIPT), "--job", json.dumps(job), "--deadline", f"{deadline:.1f}",
           "--work", str(work)] + (["--smoke"] if args.smoke else []) + (["--ckpt", args.ckpt] if args.ckpt else [])
    # One Inductor cache for the run: row 1 compiles cold, later rows of the same graphs warm (the user's own
    # TORCHINDUCTOR_CACHE_DIR is not used: a warm cache would hide the cold compile).
    env = {**os.environ, **(jobs_mod.bench.ONEDNN_CAP if args.smoke else {}), "PYTHONUNBUFFERED": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    reported: dict[int, dict] = {}
    err_path = work / f"{job['name'].replace(' ', '_').replace('.', '')}.stderr"

    def collect(stream) -> None:
        for line in stream:
            if line.startswith("ROW "):
                row = json.loads(line[4:])
                reported[row["batch"]] = row
                print(f"[{time.time() - t0:5.0f} s] {job['name']} batch {row['batch']}: {summary(row)}",
                      file=sys.stderr, flush=True)

    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        reader = threading.Thread(target=collect, args=(proc.stdout,))
        reader.start()
        rc, missing_status = wait_or_kill(proc, timeout), None
        if rc is None:
            missing_status = "stopped at the time budget" if timeout >= left else f"timeout after {timeout:.0f} s"
        reader.join()
    tail = [ln.rstrip() for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()][-15:]
    if missing_status is None:
        last = f"killed by signal {-rc}" if rc < 0 else tail[-1].strip() if tail else "no output"
        missing_status = f"error rc={rc}: {last}"[:160]
    lost = {"status": missing_status, "stderr_tail": tail}  # the JSON keeps the traceback's end
    return [dict(r, **reported.get(r["batch"], lost)) for r in rows]


def wait_or_kill(proc: subprocess.Popen, timeout: float) -> int | None:
    """proc's exit status, None when it ran past `timeout`; then its whole process group is killed (a job's
    compile workers, torchrun's children)."""
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return rc


PYTEST_ROW = "pytest -m gpu"
PYTEST_CAP_S = 90.0


def run_pytest(args: argparse.Namespace, work: Path, deadline: float) -> dict:
    """`pytest -m gpu tests/test_gpu.py` in its own process group, at most PYTEST_CAP_S: {"status", "wall_s",
    "passed", "failed": [test names], "skipped": {test name: reason}, "seconds": {test name: s}} from its JUnit
    XML, and "log_tail" (-v: on a timeout, the last test named is the one that was running)."""
    left = deadline - time.time()
    if importlib.util.find_spec("pytest") is None:
        return dict(status="skipped (pytest is not importable)")
    if left < 15:
        return dict(status=jobs_mod.SKIP_BUDGET)
    timeout, junit, log = min(PYTEST_CAP_S, left), work / "pytest-gpu.xml", work / "pytest-gpu.log"
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests/test_gpu.py"]
    # Its own Inductor cache: the tests' tiny model must not warm row 1's cold compile.
    env = {**os.environ, **(jobs_mod.bench.ONEDNN_CAP if args.smoke else {}), "COLUMNS": "200",  # unclipped summary
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-pytest")}
    start = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        rc = wait_or_kill(proc, timeout)
    result = dict(wall_s=round(time.time() - start, 1), passed=0, failed=[], skipped={}, seconds={})
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            name, skip = case.get("name"), case.find("skipped")
            result["seconds"][name] = round(float(case.get("time", 0)), 1)
            if case.find("failure") is not None or case.find("error") is not None:
                result["failed"].append(name)
            elif skip is not None:
                result["skipped"][name] = skip.get("message", "")
            else:
                result["passed"] += 1
    tail = [ln.strip(" =") for ln in log.read_text(errors="replace").splitlines() if ln.strip(" =")][-15:]
    if rc is None:
        status = "stopped at the time budget" if timeout >= left else f"timeout after {timeout:.0f} s"
    elif rc in (0, 1):  # 1: some test failed
        status = "ok" if rc == 0 else "failed"
    else:  # pytest's own error (collection, usage) or a signal
        status = f"error rc={rc}: {tail[-1] if tail else 'no output'}"[:160]
    return dict(result, status=status, log_tail=tail)


def pytest_note(r: dict) -> str:
    """The pytest row's note: the counts, the failed tests, the distinct skip reasons."""
    if "passed" not in r:
        return ""
    note = f"{r['passed']} passed, {len(r['failed'])} failed, {len(r['skipped'])} skipped in {r['wall_s']:.0f} s"
    if r["failed"]:
        note += "; failed: " + ", ".join(r["failed"])
    reasons = sorted(set(r["skipped"].values()))
    return note + ("; skipped: " + "; ".join(reasons) if reasons else "")


def summary(row: dict) -> str:
    rate = row.get("samples_per_s") or row.get("clips_per_s") or row.get("frames_per_s")
    unit = "clips/s" if "clips_per_s" in row else "frames/s" if "frames_per_s" in row else "samples/s"
    return (f"{rate} {unit}, " if rate else "") + f"[{row['status']}]"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def num(x, spec: str) -> str:
    return "" if x is None else f"{x:{spec}}"


COLUMNS = ("row", "batch", "ms", "per s", "MFU", "peak GB", "first s", "note", "status")
LEGEND = ("ms: per training step (train rows), per network call of forward batch 2 x batch (sample rows). per s: "
          "samples/s (train), clips/s (sample), output frames/s (upconvert). MFU: model FLOP/s over the card's bf16 "
          "dense peak. first s: the first step or call (compile; recompile at a new batch). |bf16-fp32|: mean / 99th "
          "percentile / max over the clips, in [-1, 1] units.")
PROFILE_COLUMNS = ("kernel", "ms per step", "share", "calls per step")


def note_of(r: dict) -> str:
    """The note column: what a row's numbers mean beyond ms and rate (older results' fields included)."""
    if r["kind"] == "sample":
        diff = r.get("diff_vs_fp32")
        text = f"{r.get('steps', '')} DDIM steps"
        if diff:
            text += f"; |bf16-fp32| {diff['mean']} / {diff['q99']} / {diff['max']}; weights {r.get('weights')}"
        elif r.get("max_abs_diff_vs_fp32") is not None:  # results of 2026-11-30 and before
            text += f"; max abs bf16-fp32 {r['max_abs_diff_vs_fp32']}"
        return text
    if r["kind"] == "upconvert":
        return f"{r['factor']}x, {r['steps']} DDIM steps, {r['windows']} windows"
    if r["kind"] == "profile":
        copies = r["eager_copies"]
        return (f"copy kernels {pct(r['copy_share'])} of the time ({r['copy_calls_per_step']} copy ops a step); "
                f"eager step: {copies['layout']} layout + {copies['dtype']} dtype copies of activations")
    if "data_wait" in r:
        return f"{r['num_workers']} workers, {r['variant']}, data wait {pct(r['data_wait'])}"
    return ""


def table_cells(result: dict) -> list[list[str]]:
    """The table's cells, one list per row (the rich table here, the markdown one in bench/report.py)."""
    cells = []
    if "pytest" in result:  # checks run before it existed have none
        cells.append([PYTEST_ROW, "", "", "", "", "", "", pytest_note(result["pytest"]), result["pytest"]["status"]])
    for r in result["rows"]:
        sample = r["kind"] in ("sample", "upconvert")
        ms = r.get("ms_per_model_call") if sample else r.get("step_ms")
        rate = r.get("clips_per_s", r.get("frames_per_s")) if sample else r.get("samples_per_s")
        cells.append([r["job"], str(r["batch"]), num(ms, ".1f"), num(rate, ".1f"), pct(r.get("mfu")),
                      num(r.get("peak_mem_gb"), ".1f"), num(r.get("first_step_s"), ".1f"),
                      note_of(r) if r["status"] == "ok" else "", r["status"]])
    return cells


def profile_cells(result: dict) -> list[list[str]]:
    """The top kernels of the profile row (none before it existed)."""
    rows = [r for r in result["rows"] if r["kind"] == "profile" and r["status"] == "ok"]
    return [[k["name"], f"{k['ms_per_step']:.2f}", pct(k["share"]), f"{k['calls_per_step']:g}"]
            for r in rows for k in r["top"]]


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    title = (f"evdm GPU check on {m.get('gpu') or 'CPU (--smoke)'}: torch {m.get('torch')}, CUDA {m.get('cuda')}, "
             f"{result['date']}, {result['wall_s']:.0f} s of {result['budget_s']:.0f} s budget")
    table = Table(title=title, title_justify="left", caption=LEGEND, caption_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("row", "note", "status") else "right")
    for row in table_cells(result):
        table.add_row(*row)
    console = Console(width=200)
    console.print(table)
    kernels = profile_cells(result)
    if kernels:
        top = Table(title="profile: the top kernels of the compiled step", title_justify="left")
        for col in PROFILE_COLUMNS:
            top.add_column(col, justify="left" if col == "kernel" else "right")
        for row in kernels:
            top.add_row(*row)
        console.print(top)


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def probe() -> dict:
    proc = subprocess.run([sys.executable, str(JOBS_SCRIPT), "--probe"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return dict(missing=[f"a working probe ({tail[0]})"])
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (rows after it: skipped)")
    p.add_argument("--only", default="", help="comma list of row names (see --list); default: all, in order")
    p.add_argument("--list", action="store_true", help="print the rows in priority order and exit")
    p.add_argument("--resume", action="store_true", help="rerun only the rows of --out that did not finish")
    p.add_argument("--ckpt", help="weights for the sample rows (default: the checkpoint the fed row trains)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and batches: the same code path in ~40 s")
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke: run the compile rows too")
    p.add_argument("--out", default=None, help="JSON (default bench/results/gpu_check.json, _smoke.json with --smoke)")
    args = p.parse_args(argv)
    scale = "smoke" if args.smoke else "gpu"
    jobs = plan(args.smoke)
    if args.list:
        print("\n".join([PYTEST_ROW] + [j["name"] for j in jobs]))
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - {j["name"] for j in jobs} - {PYTEST_ROW})
    if unknown:
        p.error(f"unknown row name(s) {unknown}; see --list")
    jobs = [j for j in jobs if not only or j["name"] in only]
    out = Path(args.out or ROOT / f"bench/results/gpu_check{'_smoke' if args.smoke else ''}.json")

    t0 = time.time()
    facts = probe()
    machine = {k: v for k, v in facts.items() if k != "missing"}
    if facts["missing"] or not (args.smoke or facts.get("cuda_available")):
        what = facts["missing"] + ([] if args.smoke or facts["missing"] else ["a CUDA device (--smoke runs on a CPU)"])
        hint = f"; {WHEELS_HINT}" if {"webdataset", "braceexpand", "tomli"} & set(facts["missing"]) else ""
        print(f"gpu_check: cannot run: missing {', '.join(what)}{hint}", file=sys.stderr)
        return 2
    print(f"gpu_check: {machine.get('gpu', 'CPU (--smoke)')}, torch {machine['torch']}, CUDA {machine['cuda']}, "
          f"Python {machine['python']}, {machine['cpu_count']} CPUs; budget {args.budget:.0f} s, {len(jobs)} jobs",
          file=sys.stderr, flush=True)

    done: dict[str, list[dict]] = {}
    before = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    if before:
        for r in before["rows"]:
            done.setdefault(r["job"], []).append(r)
        done = {name: rows for name, rows in done.items()
                if all(r["status"] == "ok" or r["status"] == "OOM" or r["status"].startswith("error") for r in rows)}
    deadline = t0 + args.budget
    result = dict(command=shlex.join(["bash", "bench/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)]),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine,
                  smoke=args.smoke, budget_s=args.budget, steps=jobs_mod.STEPS[scale], warmup=jobs_mod.WARMUP, rows=[], wall_s=0.0)
    with tempfile.TemporaryDirectory(prefix="evdm-gpu-check-") as tmp:
        if not only or PYTEST_ROW in only:
            ok = before.get("pytest", {}).get("status") == "ok"
            result["pytest"] = before["pytest"] if ok else run_pytest(args, Path(tmp), deadline)
            tail = [] if result["pytest"]["status"] == "ok" else result["pytest"].get("log_tail", [])
            print("\n".join([f"[{time.time() - t0:5.0f} s] {PYTEST_ROW}: {pytest_note(result['pytest'])} "
                             f"[{result['pytest']['status']}]", *tail]), file=sys.stderr, flush=True)
            result["wall_s"] = round(time.time() - t0, 1)
            write_json(out, result)
        for job in jobs:
            rows = done.get(job["name"]) or run_job(job, args, Path(tmp), deadline, t0)
            result["rows"] += sorted(rows, key=lambda r: r["batch"])
            result["wall_s"] = round(time.time() - t0, 1)
            write_json(out, result)
    print_table(result)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
