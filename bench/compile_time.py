"""What torch.compile costs before the first training step: the whole model vs evdm's regional compile, cold vs warm.

    python bench/compile_time.py                      # configs/demo.toml's model, batch 8 then 6, on this machine
    python bench/compile_time.py --config configs/smoke.toml --steps 2 --out ''

Every row runs evdm's own training step (bench/train_step.py prepare: the loss, clipping, AdamW, EMA)
in a fresh process, so "first step s" holds the whole compile:
- eager: no compile (the baseline's first step and steady ms);
- whole, cold: torch.compile(net, fullgraph=True), as evdm compiled before its regional compile, with an empty
  Inductor cache; then a batch change (its first step: the re-trace);
- regional, cold: evdm.denoiser (each block in place, the batch dimension symbolic), empty cache; then
  the batch change;
- regional, warm / whole, warm: a new process on the cache the cold row filled: what a resumed run pays.
Rows of one variant share a cache folder in a temporary directory; the user's TORCHINDUCTOR_CACHE_DIR is
not used. Prints a table and writes JSON (default bench/results/compile_time.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ROWS = (  # (name, mode, cache key: rows sharing one are cold then warm on one cache)
    ("eager", "eager", None),
    ("whole, cold", "whole", "whole"),
    ("regional, cold", "regional", "regional"),
    ("regional, warm", "regional", "regional"),
    ("whole, warm", "whole", "whole"),
)


def worker(args: argparse.Namespace) -> None:
    """One row in this process: the first step at --batch (compile included), steady ms, then --batch2's first."""
    import torch

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from evdm.config import load_config

    cfg = load_config(args.config, ["train.compile=\"off\"", f"train.batch_size={args.batch}"])
    device = torch.device("cpu")
    trainer, step_for = bench.prepare(cfg, device)
    if args.mode == "whole":
        trainer.denoiser.net.compile(fullgraph=True)  # the whole network in one graph
    elif args.mode == "regional":
        trainer.denoiser.compile("on")
    timing = bench.time_steps(step_for(args.batch), steps=args.steps, warmup=1, device=device)
    t0 = time.perf_counter()
    step_for(args.batch2)()
    print(json.dumps(dict(timing, batch_change_s=round(time.perf_counter() - t0, 3))))


def run_row(args: argparse.Namespace, mode: str, cache: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--config", args.config, "--batch", str(args.batch),
           "--batch2", str(args.batch2), "--steps", str(args.steps)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache or Path(tempfile.gettempdir()) / "evdm-unused-cache")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"error rc={proc.returncode}: {tail}"[:200]}
    return dict(json.loads(lines[-1]), status="ok")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo.toml"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch2", type=int, default=6, help="the batch of the batch-change step")
    p.add_argument("--steps", type=int, default=3, help="timed steps after the first (median)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per row")
    p.add_argument("--out", default=str(ROOT / "bench/results/compile_time.json"), help="JSON output ('' for none)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("eager", "whole", "regional"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    command = shlex.join(["python", "bench/compile_time.py", *(sys.argv[1:] if argv is None else argv)])
    from results_io import machine, write_result

    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="evdm-compile-") as tmp:
        for name, mode, cache in ROWS:
            row = dict(row=name, mode=mode, **run_row(args, mode, cache and Path(tmp) / cache))
            rows.append(row)
            print(f"{name}: first step {row.get('first_step_s', '-')} s [{row['status']}]", file=sys.stderr, flush=True)
    by = {r["row"]: r for r in rows if r["status"] == "ok"}
    ratio = lambda a, b: round(by[a]["first_step_s"] / by[b]["first_step_s"], 3) if a in by and b in by else None  # noqa: E731
    ratios = {"regional cold / whole cold": ratio("regional, cold", "whole, cold"),
              "regional warm / regional cold": ratio("regional, warm", "regional, cold"),
              "whole warm / whole cold": ratio("whole, warm", "whole, cold")}
    print_table(rows, ratios, args)
    if args.out:
        import torch

        write_result(Path(args.out), dict(command=command, config=args.config, batch=args.batch, batch2=args.batch2,
                                          torch=torch.__version__, **machine(load_before), rows=rows, ratios=ratios))
    return 0


def print_table(rows: list[dict], ratios: dict, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"compile cost of the training step on CPU ({Path(args.config).name}, batch {args.batch}, "
                        f"then {args.batch2})")
    for col in ("row", "first step s", "step ms", f"first step at batch {args.batch2} s", "status"):
        table.add_column(col, justify="left" if col in ("row", "status") else "right")
    for r in rows:
        table.add_row(r["row"], str(r.get("first_step_s", "")), str(r.get("step_ms", "")), str(r.get("batch_change_s", "")),
                      r["status"])
    console = Console(width=140)
    console.print(table)
    console.print("; ".join(f"{k}: {v}x" for k, v in ratios.items() if v is not None))


if __name__ == "__main__":
    sys.exit(main())
