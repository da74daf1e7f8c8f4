"""Training-step benchmark: evdm's own training step (evdm.train.step.train_step), per config and variant.

    python bench/train_step.py                                  # smoke + reference, all variants
    python bench/train_step.py --configs smoke --variants eager --steps 2 --warmup 1 --loader-steps 4   # CI smoke
    python bench/train_step.py --no-compile                     # skip torch.compile (30-100 s per config on CPU)
    python bench/train_step.py --configs smoke --variants eager --loader-steps 60   # the loader-fed rows

What is timed is the step the trainer runs: the configured loss (the config's prediction, residual,
schedule and temporal term), gradient clipping, AdamW under the LR schedule and the EMA update, on a
fixed uint8 batch (compute only; the loader-fed rows below add the data). Variants: eager (fp32),
bf16 (autocast), compile (evdm.denoiser: the blocks compiled regionally), all (bf16 + compile). The
layout is always channels_last_3d (evdm.models.blocks). On CPU every bf16 row runs in a subprocess with
ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (set before torch loads) and a timeout, because oneDNN's AMX
kernels can hang forever in the backward of some bf16 convolution shapes.

Loader-fed rows (smoke only; --loader-steps 0 skips them): evdm.train.train() on configs/smoke.toml,
fed by the real shard loader with data.num_workers 0 and 2 from synthetic shards in a temporary
folder. samples/s and "data wait" (the fraction of wall time the loop spent in next(loader)) come
from its metrics.jsonl, over --loader-steps steps between a warm-up window and the final window
(which validates); both of those are left out. The variant is whatever smoke.toml trains with on
this device (without compile under --no-compile); "of compute-only" compares with that variant's
row above when it ran. Prints rich tables and writes JSON (default bench/results/train_step.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # name: (data overrides, model overrides, default batch)
    "smoke": (dict(size=32, T=8), dict(base_channels=16, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,)), 8),
    "tiny": (dict(size=16, T=6),  # bench/gpu_check.py --smoke: seconds per row on a CPU
             dict(base_channels=8, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,)), 2),
    "reference": (dict(size=64, T=8),
                  dict(base_channels=96, channel_mults=(1, 2, 4), res_blocks=2, temporal_attn_levels=(1, 2)), 2),
}
# Set before torch loads, in the environment of any process that runs bf16 on a CPU (see the module doc).
ONEDNN_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
VARIANTS = {
    "eager": dict(precision="fp32", compile=False),
    "bf16": dict(precision="bf16", compile=False),
    "compile": dict(precision="fp32", compile=True),
    "all": dict(precision="bf16", compile=True),
}


def run_config(config: str, *, precision: str = "fp32", compile: bool = False, batch: int | None = None):
    """The RunConfig of CONFIGS[config] (context 2 + 2, the default diffusion recipe) for one variant."""
    from evdm.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    data_kw, model_kw, default_batch = CONFIGS[config]
    train = TrainConfig(precision=precision, compile="on" if compile else "off", batch_size=batch or default_batch)
    return RunConfig(data=DataConfig(**data_kw), model=ModelConfig(**model_kw), train=train)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock timers see it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(cfg, device):
    """The trainer evdm.train builds for cfg (fresh weights, EMA, AdamW; compiled when train.compile is
    "on"), and step_for(batch) -> a function running one real training step on a fixed uint8 batch."""
    import itertools

    import torch

    from evdm.train import make_trainer, train_step

    trainer = make_trainer(cfg, device)
    trainer.denoiser.compile(cfg.train.compile)
    counter = itertools.count()

    def step_for(batch: int):
        gen = torch.Generator().manual_seed(batch)
        u8 = torch.randint(0, 256, (batch, cfg.channels, cfg.data.T, cfg.data.size, cfg.data.size),
                           dtype=torch.uint8, generator=gen)
        batches = itertools.repeat(u8)
        return lambda: train_step(trainer, batches, next(counter))

    return trainer, step_for


def time_steps(step, *, steps: int, warmup: int, device) -> dict:
    """Run `warmup` untimed then `steps` timed calls of step(); first call's seconds and median/min ms."""
    times = []
    for _ in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    return dict(first_step_s=round(times[0], 3), step_ms=round(1000 * statistics.median(timed), 2),
                step_ms_min=round(1000 * min(timed), 2))


def measure(config: str, variant: str, *, batch: int, steps: int, warmup: int, device_name: str) -> dict:
    """Time `steps` training steps after `warmup` untimed ones; returns one result row."""
    import torch

    from evdm.models import count_parameters

    device = torch.device(device_name)
    trainer, step_for = prepare(run_config(config, **VARIANTS[variant], batch=batch), device)
    timing = time_steps(step_for(batch), steps=steps, warmup=warmup, device=device)
    return dict(config=config, variant=variant, device=device_label(device_name), batch=batch,
                params=count_parameters(trainer.denoiser.net), steps=steps, **timing,
                samples_per_s=round(1000 * batch / timing["step_ms"], 3), status="ok")


def make_fed_shards(shard_dir: Path, *, T: int, size: int, val_clips: int, train_shards: int = 8,
                    clips_per_shard: int = 16) -> None:
    """Synthetic clips (preprocess.synth.render_video) straight into shards + manifest.json: no MP4 round trip."""
    from evdm.data.schema import encode_sample, make_key
    from preprocess.synth import render_video, video_seed
    from preprocess.writer import split_entries, write_manifest, write_shard

    records = []
    for split, n_shards, per_shard in (("train", train_shards, clips_per_shard), ("val", 1, val_clips)):
        for i in range(n_shards):
            samples = [encode_sample(make_key(f"{split}/v{i * per_shard + j}", 0),
                                     render_video(video_seed(0, split, i * per_shard + j), T, size), {"split": split})
                       for j in range(per_shard)]
            count, sha = write_shard(shard_dir / f"{split}-{i:06d}.tar", samples)
            records.append({"name": f"{split}-{i:06d}.tar", "split": split, "videos": count, "clips": count, "sha256": sha})
    write_manifest(shard_dir, options={}, clip_shape=(T, size, size, 3), splits=split_entries(records), skipped=[])


def trainer_variant(cfg, device_name: str) -> str:
    """The VARIANTS name of what train() applies for `cfg` on this device."""
    import torch

    from evdm.denoiser import autocast_dtype, wants_compile

    tc, device = cfg.train, torch.device(device_name)
    dtype = autocast_dtype(tc.precision, device)
    opts = dict(precision={torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype],
                compile=wants_compile(tc.compile, device))
    named = [name for name, v in VARIANTS.items() if v == opts]
    return named[0] if named else f"{opts['precision']}{'+compile' if opts['compile'] else ''}"


def measure_fed(workers: int, *, batch: int, steps: int, device_name: str, work: Path, allow_compile: bool,
                config: Path = ROOT / "configs/smoke.toml", val_clips: int | None = None,
                extra: dict | None = None, runner=None, out_name: str | None = None) -> dict:
    """train() on `config` (plus `extra` overrides, TOML values) fed by the shard loader from work/shards; one
    row from its metrics.jsonl, see the module doc. tflops and mfu: wall-time-weighted means of the records'.

    runner(config, ["section.key=value", ...]): run the training another way (bench/gpu_check_jobs.py: under
    torchrun) instead of calling train() here. out_name: the run's folder under `work`."""
    from evdm.config import load_config
    from evdm.train import train

    log_every = max(1, steps // 10)
    max_steps = steps + 2 * log_every  # + a warm-up window and the final (validating) window, both left out
    out_dir = work / (out_name or f"run-{workers}-workers")
    never = 10**9  # no preview, checkpoint or snapshot inside the loop
    overrides = {
        "data.train_shards": f'"{work}/shards/train-*.tar"', "data.val_shards": f'"{work}/shards/val-*.tar"',
        "data.num_workers": workers, "train.out_dir": f'"{out_dir}"', "train.device": f'"{device_name}"',
        "data.val_clips": val_clips or batch, "train.batch_size": batch, "train.max_steps": max_steps,
        "train.log_every": log_every, "train.val_every": max_steps, "train.preview_every": never,
        "train.ckpt_every": never, "train.snapshot_every": never, "train.compile": '"auto"' if allow_compile else '"off"',
        **(extra or {}),
    }
    settings = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(config, settings)
    if runner is not None:
        runner(config, settings)
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # the dashboard's per-log lines
            train(cfg)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    # Each record covers the steps since the one before; weight by its wall time, not equally.
    windows = [(r["step"] - prev["step"], r) for prev, r in zip(records, records[1:-1])]
    seconds = [n * batch / r["samples_per_s"] for n, r in windows]
    timed_steps, total_s = sum(n for n, _ in windows), sum(seconds)

    def mean(key: str) -> float | None:
        if any(r.get(key) is None for _, r in windows):
            return None
        return sum(s * r[key] for s, (_, r) in zip(seconds, windows)) / total_s

    tflops, mfu = mean("tflops"), mean("mfu")
    return dict(config=Path(config).stem, variant=trainer_variant(cfg, device_name), device=device_label(device_name),
                num_workers=workers, batch=batch, steps=timed_steps, step_ms=round(1000 * total_s / timed_steps, 2),
                samples_per_s=round(timed_steps * batch / total_s, 3), data_wait=round(mean("data_wait"), 4),
                tflops=tflops and round(tflops, 2), mfu=mfu and round(mfu, 4),
                gpu_mem_gb=records[-1].get("gpu_mem_gb"), status="ok")


def run_fed(args: argparse.Namespace, batch: int) -> list[dict]:
    """Loader-fed rows at 0 and 2 workers over one set of synthetic shards in a temporary folder."""
    from evdm.config import load_config

    smoke = load_config(ROOT / "configs/smoke.toml").data
    rows = []
    with tempfile.TemporaryDirectory(prefix="evdm-bench-train-") as tmp:
        work = Path(tmp)
        (work / "shards").mkdir()
        # One val batch: the final validation is outside the timed steps, so keep it short.
        make_fed_shards(work / "shards", T=smoke.T, size=smoke.size, val_clips=batch)
        for workers in (0, 2):
            try:
                row = measure_fed(workers, batch=batch, steps=args.loader_steps, device_name=args.device, work=work,
                                  allow_compile=not args.no_compile)
            except Exception as err:  # keep the other row; the table shows what failed
                row = dict(config="smoke", num_workers=workers, batch=batch, status=f"error: {err!r}"[:200])
            rows.append(row)
            print(f"smoke/train() fed by {workers} workers: {row.get('samples_per_s', '-')} samples/s, data wait "
                  f"{row.get('data_wait', '-')} [{row['status']}]", file=sys.stderr, flush=True)
    return rows


def device_label(device_name: str) -> str:
    import torch

    if device_name.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device_name))
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_isolated(args: argparse.Namespace, config: str, variant: str, batch: int, timeout_s: float) -> dict:
    """measure() in a subprocess with oneDNN capped below AMX, killed after `timeout_s`."""
    cmd = [sys.executable, __file__, "--worker", "--configs", config, "--variants", variant, "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    env = {**os.environ, **ONEDNN_CAP}
    base = dict(config=config, variant=variant, device=f"CPU ({args.device}, subprocess)", batch=batch)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**base, "status": f"timeout after {timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {**base, "status": f"error rc={proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(lines[-1])


def print_table(rows: list[dict], device: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evdm train step (fwd+bwd+AdamW) on {device}")
    for col in ("config", "variant", "batch", "params", "step ms", "samples/s", "first step s", "status"):
        table.add_column(col, justify="left" if col in ("config", "variant", "status") else "right")
    for r in rows:
        table.add_row(r["config"], r["variant"], str(r.get("batch", "")), f"{r['params'] / 1e6:.2f}M" if "params" in r else "",
                      str(r.get("step_ms", "")), str(r.get("samples_per_s", "")), str(r.get("first_step_s", "")),
                      r["status"])
    Console(width=160).print(table)


def print_fed_table(rows: list[dict], compute_rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    compute = {(r["config"], r["variant"]): r["samples_per_s"] for r in compute_rows if r["status"] == "ok"}
    table = Table(title="fed by the real loader: evdm.train.train(configs/smoke.toml) on synthetic shards")
    for col in ("config", "variant", "workers", "batch", "steps", "step ms", "samples/s", "of compute-only",
                "data wait", "status"):
        table.add_column(col, justify="left" if col in ("config", "variant", "status") else "right")
    for r in rows:
        alone = compute.get((r["config"], r.get("variant")))
        table.add_row(r["config"], r.get("variant", ""), str(r["num_workers"]), str(r["batch"]),
                      str(r.get("steps", "")), str(r.get("step_ms", "")), str(r.get("samples_per_s", "")),
                      f"{r['samples_per_s'] / alone:.2f}x" if alone and "samples_per_s" in r else "",
                      f"{100 * r['data_wait']:.1f}%" if "data_wait" in r else "", r["status"])
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="smoke,reference", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile happens here)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8 smoke, 2 reference)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-compile", action="store_true", help="skip the compile and all variants")
    p.add_argument("--bf16-timeout", type=float, default=900.0, help="seconds per bf16 row on CPU")
    p.add_argument("--loader-steps", type=int, default=30,
                   help="timed train() steps per loader-fed row (smoke only; 0: none)")
    p.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"), help="JSON output ('' for none)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/train_step.py", *(sys.argv[1:] if argv is None else argv)])
    load_before = os.getloadavg()[0]  # the machine may be shared: record how busy it was

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = [c for c in args.configs.split(",") if c]
    variants = [v for v in args.variants.split(",") if v]
    for name in configs + variants:
        if name not in CONFIGS and name not in VARIANTS:
            p.error(f"unknown config or variant {name!r}")
    if args.no_compile:
        variants = [v for v in variants if not VARIANTS[v]["compile"]]

    rows = []
    for config in configs:
        batch = args.batch or CONFIGS[config][2]
        for variant in variants:
            if args.worker:
                print(json.dumps(measure(config, variant, batch=batch, steps=args.steps, warmup=args.warmup,
                                         device_name=args.device)))
                continue
            if VARIANTS[variant]["precision"] == "bf16" and args.device == "cpu":
                row = run_isolated(args, config, variant, batch, args.bf16_timeout)
            else:
                try:
                    row = measure(config, variant, batch=batch, steps=args.steps, warmup=args.warmup,
                                  device_name=args.device)
                except Exception as err:  # keep the other rows; the table shows what failed
                    row = dict(config=config, variant=variant, batch=batch, status=f"error: {err!r}"[:200])
            rows.append(row)
            print(f"{config}/{variant}: {row.get('step_ms', '-')} ms/step, {row.get('samples_per_s', '-')} samples/s "
                  f"[{row['status']}]", file=sys.stderr, flush=True)
    if args.worker:
        return 0
    fed_rows = run_fed(args, args.batch or CONFIGS["smoke"][2]) if "smoke" in configs and args.loader_steps > 0 else []
    device = device_label(args.device)
    print_table(rows, device)
    if fed_rows:
        print_fed_table(fed_rows, rows)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(command=command, device=device, torch=torch.__version__, python=platform.python_version(),
                       threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                       loadavg_1min_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                       steps=args.steps, warmup=args.warmup, loader_steps=args.loader_steps, rows=rows,
                       loader_rows=fed_rows)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
