"""Training-step benchmark: forward + backward + AdamW step of the denoiser, per config and variant.

    python bench/train_step.py                                  # smoke + reference, all variants
    python bench/train_step.py --configs smoke --variants eager --steps 2 --warmup 1   # CI smoke
    python bench/train_step.py --no-compile                     # skip torch.compile (30-100 s per config on CPU)

Variants: eager (fp32, contiguous), channels_last (channels_last_3d), compile (torch.compile,
fullgraph), bf16 (autocast), all (the three together). On CPU every bf16 row runs in a subprocess
with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (set before torch loads) and a timeout, because oneDNN's
AMX kernels can hang forever in the backward of some bf16 Conv3d shapes. Prints a rich table and
writes JSON (default bench/results/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    # name: (data overrides, model overrides, default batch)
    "smoke": (dict(size=32, T=8, endpoint_context=2),
              dict(base_channels=16, channel_mults=(1, 2), res_blocks=1, temporal_attn_levels=(1,)), 8),
    "reference": (dict(size=64, T=8, endpoint_context=2),
                  dict(base_channels=96, channel_mults=(1, 2, 4), res_blocks=2, temporal_attn_levels=(1, 2)), 2),
}
VARIANTS = {
    "eager": dict(channels_last=False, compile=False, bf16=False),
    "channels_last": dict(channels_last=True, compile=False, bf16=False),
    "compile": dict(channels_last=False, compile=True, bf16=False),
    "bf16": dict(channels_last=False, compile=False, bf16=True),
    "all": dict(channels_last=True, compile=True, bf16=True),
}


def measure(config: str, variant: str, *, batch: int, steps: int, warmup: int, device_name: str) -> dict:
    """Time `steps` training steps after `warmup` untimed ones; returns one result row."""
    import torch

    from evdm.config import DataConfig, ModelConfig, RunConfig
    from evdm.diffusion import diffusion_loss, draw_training_noise, make_schedule
    from evdm.models import build_model, count_parameters

    data_kw, model_kw, _ = CONFIGS[config]
    opts = VARIANTS[variant]
    device = torch.device(device_name)
    cfg = RunConfig(data=DataConfig(**data_kw), model=ModelConfig(**model_kw))
    model = build_model(cfg).to(device)
    params = count_parameters(model)
    K, T, S = cfg.data.endpoint_context, cfg.data.T, cfg.data.size
    clip = torch.rand(batch, cfg.channels, T, S, S, device=device) * 2 - 1
    if opts["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
        clip = clip.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model, fullgraph=True) if opts["compile"] else model
    sched = make_schedule("linear", 1000).to(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        t, noise, drop = draw_training_noise((batch, cfg.channels, T - 2 * K, S, S), timesteps=1000,
                                             cfg_drop_prob=0.08, noise_offset=0.0, generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts["bf16"]):
            loss, _ = diffusion_loss(fwd, sched, clip, t, noise, drop, K=K)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    step_s = statistics.median(timed)
    return dict(config=config, variant=variant, device=device_label(device_name), batch=batch, params=params,
                steps=steps, first_step_s=round(times[0], 3), step_ms=round(1000 * step_s, 2),
                step_ms_min=round(1000 * min(timed), 2), samples_per_s=round(batch / step_s, 3), status="ok")


def device_label(device_name: str) -> str:
    import torch

    if device_name.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device_name))
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def run_isolated(args: argparse.Namespace, config: str, variant: str, batch: int, timeout_s: float) -> dict:
    """measure() in a subprocess with oneDNN capped below AMX, killed after `timeout_s`."""
    cmd = [sys.executable, __file__, "--worker", "--configs", config, "--variants", variant, "--batch", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
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
    p.add_argument("--out", default=str(ROOT / "bench/results/train_step.json"), help="JSON output ('' for none)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

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
            if VARIANTS[variant]["bf16"] and args.device == "cpu":
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
    device = device_label(args.device)
    print_table(rows, device)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                       steps=args.steps, warmup=args.warmup, rows=rows)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
