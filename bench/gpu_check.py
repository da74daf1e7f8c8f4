"""GPU check: one command, one table, every figure issue 11 asks of one H100/H200, in about 6 minutes.

    bash bench/gpu_check.sh                 # the check; JSON in bench/results/gpu_check.json
    bash bench/gpu_check.sh --resume        # then: only the rows the last run did not reach, merged in
    bash bench/gpu_check.sh --list          # the rows in priority order (--only NAME,... runs some)
    bash bench/gpu_check.sh --budget 1000   # the whole grid (4 cold compiles: ~15 min, estimate below)
    python bench/gpu_check.py --smoke       # the same code on a CPU, tiny model: ~30 s quiet (tests/test_bench.py)

Rows (reference model: 64 px, T 8, K 2, base 96, mults 1 2 4, 2 res blocks, attention at levels 1 2):
- train: fwd + bwd + AdamW on a fixed random clip (bench/train_step.py prepare / time_steps) per
  space-time form ("2d" per-frame Conv2d, the default; "3d" the old Conv3d) x layout (channels_last_3d
  or contiguous) x {eager fp32, eager bf16 autocast, compile + bf16}, at batch 64, 128, 32: ms/step
  (median of 3 after 1 warm-up), samples/s, MFU (evdm.train.mfu), peak GPU memory, the first step's
  seconds (compile), status (ok, OOM, the error in one line, skipped or stopped at the time budget).
- train.py fed: evdm.train.train() on configs/bair.toml at batch 64, fed by the shard loader from
  synthetic shards in a temporary folder: samples/s, data wait and MFU from its metrics.jsonl. Eager
  bf16 by default, since a compile there is one more cold compile; --fed-compile compiles.
- sample: evdm.pipeline.fill_middle at batch 64, guidance 1.8 (forward batch 128), 10 DDIM steps, as
  evdm.sampling runs it on CUDA (channels_last), fp32 / bf16 / bf16 + compile_for_inference: clips/s,
  ms per model call, and the max abs difference of the bf16 clips from the fp32 ones (same weights,
  inputs and seed). The model is untrained: its zero-initialised tensors get N(0, 0.02^2) weights so
  that it does not output zeros.

How it fits (a cold compile of the reference model took 124 s on the H200):
- Each variant runs in its own subprocess (bench/gpu_check_jobs.py) and process group, with its own
  timeout: an OOM, hang or crash costs that variant's rows, not the run. Rows stream back per batch;
  the JSON is rewritten after every variant, so an outer timeout leaves every finished row on disk.
- One compiled model serves a variant's three batch sizes: the batch dimension of the model's inputs is
  marked dynamic (torch._dynamo.maybe_mark_dynamic), so Inductor's kernels are batch-generic and
  compiled once. Dynamo still re-traces once per batch, because the chunked temporal attention splits
  B*H*W rows into 1, 2 and 3 SDPA calls at batch 32, 64 and 128; "first s" shows what each batch cost.
- Priority order (--list): the default path (2d, channels_last, bf16 + compile), its eager bf16 and
  fp32 baselines, the old 3d form (eager bf16), fp32 and bf16 sampling, the fed train.py, contiguous
  2d, bf16 + compile sampling, the old form compiled, then the rest. A global budget (--budget, 330 s)
  ends the run: variants not started say "skipped (time budget)", one running is stopped.
- Estimate on an H200, from its 2026-11-25 measurements (old block; step time ~ batch): probe 5 s;
  default path 8 s start + 124 s compile + 2 re-traces x ~40 s + 4 steps x (0.19 + 0.37 + 0.74) s =
  ~220 s; eager bf16 8 + 4 x (0.27 + 0.54 + 1.07) = ~16 s; eager fp32 8 + 4 x (0.44 + 0.88 + 1.77) =
  ~21 s; 3d eager bf16 ~16 s; sample fp32 8 + 1.2 + 6 = ~16 s; sample bf16 ~12 s: ~305 s. The fed row
  (~30 s) fits if the compile is quicker. What is left: --resume (or --only) in a later run, or one
  longer run (--budget 540 fits a 10-minute command).

--smoke runs one variant of each kind (SMOKE_ROWS) on the CPU: bench/train_step.py's "tiny" model at
batch 2 and 3, sampling at batch 2 with 2 steps, train() on configs/smoke.toml resized to the tiny
model at batch 2. Compile rows say "skipped" (a cold CPU compile takes minutes) unless --smoke-compile.
Every subprocess gets oneDNN capped below AMX (ONEDNN_CAP), whose bf16 Conv3d backward can hang.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOBS_SCRIPT = ROOT / "bench" / "gpu_check_jobs.py"  # one variant per process; constants and row code there
_spec = importlib.util.spec_from_file_location("bench_gpu_check_jobs", JOBS_SCRIPT)
jobs_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jobs_mod)

# --smoke: each code path once (both forms and layouts, both precisions, every kind of row, the compile skip).
SMOKE_ROWS = ("train 2d cl bf16+compile", "train 2d cl bf16", "train 2d contig fp32", "sample fp32", "sample bf16",
              "sample bf16+compile", "train.py fed")
WHEELS_HINT = "see bench/wheels/README.md (bash bench/gpu_check.sh installs bench/wheels/*.whl itself)"

def train_job(spacetime: str, channels_last: bool, precision: str, compile: bool) -> dict:
    layout = "cl" if channels_last else "contig"
    return dict(name=f"train {spacetime} {layout} {precision}{'+compile' if compile else ''}", kind="train",
                spacetime=spacetime, channels_last=channels_last, precision=precision, compile=compile)


def sample_job(precision: str, compile: bool) -> dict:
    return dict(name=f"sample {precision}{'+compile' if compile else ''}", kind="sample", precision=precision,
                compile=compile)


def plan(fed_compile: bool) -> list[dict]:
    """Every job in priority order (see the module doc)."""
    return [
        train_job("2d", True, "bf16", True), train_job("2d", True, "bf16", False), train_job("2d", True, "fp32", False),
        sample_job("fp32", False), sample_job("bf16", False),
        dict(name="train.py fed", kind="fed", compile=fed_compile), train_job("2d", False, "bf16", False),
        sample_job("bf16", True), train_job("2d", False, "fp32", False), train_job("2d", False, "bf16", True),
    ]


def job_cap_s(job: dict, smoke: bool) -> float:
    """Seconds one job may run before it is killed (the budget may cut it shorter)."""
    if smoke:
        return 240.0 if job["compile"] else 90.0
    return {"train": 240.0, "sample": 180.0, "fed": 240.0}[job["kind"]] if job["compile"] else 120.0


# ---- the parent side: plan, budget, subprocesses, the table and the JSON ---------------------------------


def expected_rows(job: dict, scale: str) -> list[dict]:
    fields = {k: v for k, v in job.items() if k != "name"}
    return [dict(job=job["name"], **fields, batch=b) for b in jobs_mod.job_batches(job, scale)]


def run_job(job: dict, args: argparse.Namespace, work: Path, deadline: float, t0: float) -> list[dict]:
    """One job in a subprocess (its own process group) with a timeout; every expected row comes back with a status."""
    scale = "smoke" if args.smoke else "gpu"
    rows = expected_rows(job, scale)
    left = deadline - time.time()
    if args.smoke and job["compile"] and not args.smoke_compile:
        return [dict(r, status="skipped (--smoke: no compile; --smoke-compile)") for r in rows]
    if left < (5 if args.smoke else 15):
        return [dict(r, status=jobs_mod.SKIP_BUDGET) for r in rows]
    timeout = min(job_cap_s(job, args.smoke), left)
    cmd = [sys.executable, str(JOBS_SCRIPT), "--job", json.dumps(job), "--deadline", f"{deadline:.1f}",
           "--work", str(work)] + (["--smoke"] if args.smoke else [])
    env = {**os.environ, **(jobs_mod.bench.ONEDNN_CAP if args.smoke else {}), "PYTHONUNBUFFERED": "1"}
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
        try:
            rc, missing_status = proc.wait(timeout=timeout), None
        except subprocess.TimeoutExpired:
            rc = None
            missing_status = "stopped at the time budget" if timeout >= left else f"timeout after {timeout:.0f} s"
        with contextlib.suppress(ProcessLookupError):  # the job's leftovers too (compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join()
    tail = [ln.rstrip() for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()][-15:]
    if missing_status is None:
        last = f"killed by signal {-rc}" if rc < 0 else tail[-1].strip() if tail else "no output"
        missing_status = f"error rc={rc}: {last}"[:160]
    lost = {"status": missing_status, "stderr_tail": tail}  # the JSON keeps the traceback's end
    return [dict(r, **reported.get(r["batch"], lost)) for r in rows]


def summary(row: dict) -> str:
    rate = row.get("samples_per_s") or row.get("clips_per_s")
    unit = "clips/s" if "clips_per_s" in row else "samples/s"
    return (f"{rate} {unit}, " if rate else "") + f"[{row['status']}]"


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def num(x, spec: str) -> str:
    return "" if x is None else f"{x:{spec}}"


COLUMNS = ("row", "batch", "ms", "per s", "MFU", "peak GB", "first s", "note", "status")
LEGEND = ("ms: per training step (train rows), per model call of forward batch 2 x batch (sample rows). per s: "
          "samples/s (train), clips/s (sample). MFU: model FLOP/s over the card's bf16 dense peak. first s: the first "
          "step or call (compile; recompile at a new batch).")


def table_cells(result: dict) -> list[list[str]]:
    """The table's cells, one list per row (the rich table here, the markdown one in bench/report.py)."""
    cells = []
    for r in result["rows"]:
        if r["kind"] == "sample":
            ms, rate = r.get("ms_per_model_call"), r.get("clips_per_s")
            diff = r.get("max_abs_diff_vs_fp32")
            note = f"{r.get('steps', '')} DDIM steps" + (f"; max abs bf16-fp32 {diff}" if diff is not None else "")
        else:
            ms, rate = r.get("step_ms"), r.get("samples_per_s")
            fed = "data_wait" in r
            note = f"{r['num_workers']} workers, {r['variant']}, data wait {pct(r['data_wait'])}" if fed else ""
        cells.append([r["job"], str(r["batch"]), num(ms, ".1f"), num(rate, ".1f"), pct(r.get("mfu")),
                      num(r.get("peak_mem_gb"), ".1f"), num(r.get("first_step_s"), ".1f"),
                      note if r["status"] == "ok" else "", r["status"]])
    return cells


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
    Console(width=200).print(table)


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
    p.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (rows after it: skipped)")
    p.add_argument("--only", default="", help="comma list of row names (see --list); default: all, in order")
    p.add_argument("--list", action="store_true", help="print the rows in priority order and exit")
    p.add_argument("--resume", action="store_true", help="rerun only the rows of --out that did not finish")
    p.add_argument("--fed-compile", action="store_true", help="train.py fed row with compile (another cold compile)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and batches: the same code path in ~40 s")
    p.add_argument("--smoke-compile", action="store_true", help="with --smoke: run the compile rows too")
    p.add_argument("--out", default=None, help="JSON (default bench/results/gpu_check.json, _smoke.json with --smoke)")
    args = p.parse_args(argv)
    scale = "smoke" if args.smoke else "gpu"
    jobs = plan(args.fed_compile)
    if args.smoke:
        jobs = [j for j in jobs if j["name"] in SMOKE_ROWS]
    if args.list:
        print("\n".join(j["name"] for j in jobs))
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(only) - {j["name"] for j in jobs})
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
          f"Python {machine['python']}, {machine['cpu_count']} CPUs; budget {args.budget:.0f} s, {len(jobs)} variants",
          file=sys.stderr, flush=True)

    done: dict[str, list[dict]] = {}
    if args.resume and out.is_file():
        for r in json.loads(out.read_text())["rows"]:
            done.setdefault(r["job"], []).append(r)
        done = {name: rows for name, rows in done.items()
                if all(r["status"] == "ok" or r["status"] == "OOM" or r["status"].startswith("error") for r in rows)}
    deadline = t0 + args.budget
    result = dict(command=shlex.join(["bash", "bench/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)]),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=machine,
                  smoke=args.smoke, budget_s=args.budget, steps=jobs_mod.STEPS[scale], warmup=jobs_mod.WARMUP, rows=[], wall_s=0.0)
    with tempfile.TemporaryDirectory(prefix="evdm-gpu-check-") as tmp:
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
