"""Sampling throughput: clips/s of DDIM per step count, guidance on/off and batch size (untrained weights).

    python bench/sample.py                                   # smoke model, steps 10 20 40, batch 1 16
    python bench/sample.py --config configs/bair.toml --batch_sizes 1 4
    python bench/sample.py --steps 2 --batch_sizes 1 --repeats 1 --out ''     # CI smoke (seconds)

Guidance (scale != 1) runs the conditional and null branches in one forward of twice the batch;
guidance 1.0 runs the conditional branch alone. Each row is the median of --repeats timed
evdm.denoiser.Denoiser.generate calls (fp32) after an untimed 2-step warm-up call at the same shapes. Prints a rich table and writes JSON
(default bench/results/sample.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(cfg, denoiser, *, batch: int, steps: int, guidance: float, repeats: int, device) -> dict:
    """Time Denoiser.generate (DDIM) for one (batch, steps, guidance); returns one result row."""
    import torch

    from evdm.config import SampleConfig

    (Ks, Ke), S, C = cfg.context, cfg.data.size, cfg.channels
    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.rand(batch, C, Ks, S, S, generator=gen, device=device) * 2 - 1
    end = torch.rand(batch, C, Ke, S, S, generator=gen, device=device) * 2 - 1

    def once(n_steps: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        denoiser.generate(start, end, SampleConfig(steps=n_steps, eta=0.0, guidance_scale=guidance), generator=gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    once(2)  # warm-up at these shapes: allocator, oneDNN/cuDNN kernel selection
    seconds = statistics.median(once(steps) for _ in range(repeats))
    forward_batch = batch * (1 if guidance == 1.0 else 2)
    return dict(batch=batch, steps=steps, guidance=guidance, forward_batch=forward_batch,
                seconds_per_call=round(seconds, 4), clips_per_s=round(batch / seconds, 3),
                ms_per_model_call=round(1000 * seconds / steps, 2))


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("steps", "guidance", "batch", "forward batch", "s / call", "ms / model call", "clips/s"):
        table.add_column(col, justify="right")
    for r in rows:
        guided = "on" if r["guidance"] != 1.0 else "off"
        table.add_row(str(r["steps"]), guided, str(r["batch"]), str(r["forward_batch"]), f"{r['seconds_per_call']:.3f}",
                      f"{r['ms_per_model_call']:.1f}", f"[bold]{r['clips_per_s']:.3g}[/]")
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/smoke.toml"), help="model/data config (TOML)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40])
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.8], help="1.0 = no guidance")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench/results/sample.json"), help="JSON output ('' for none)")
    args = p.parse_args(argv)
    command = shlex.join(["python", "bench/sample.py", *(sys.argv[1:] if argv is None else argv)])

    import torch

    from evdm.config import load_config
    from evdm.denoiser import Denoiser
    from evdm.models import count_parameters

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cfg = load_config(args.config)
    torch.manual_seed(0)
    denoiser = Denoiser(cfg, device, precision="fp32").eval()
    label = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads")
    load_before = os.getloadavg()[0]
    rows = []
    for guidance in args.guidance:
        for batch in args.batch_sizes:
            for steps in args.steps:
                row = measure(cfg, denoiser, batch=batch, steps=steps, guidance=guidance, repeats=args.repeats,
                              device=device)
                rows.append(row)
                print(f"steps {steps} guidance {guidance} batch {batch}: {row['clips_per_s']} clips/s",
                      file=sys.stderr, flush=True)
    d, m = cfg.data, cfg.model
    desc = (f"{Path(args.config).name}: {d.size}px T={d.T} context {list(d.context)} {d.color_mode}, base "
            f"{m.base_channels}, mults {list(m.channel_mults)}, res {m.res_blocks}, "
            f"attn {list(m.temporal_attn_levels)}, {count_parameters(denoiser.net) / 1e6:.2f}M params")
    print_table(rows, f"DDIM sampling on {label}\n{desc}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        config = Path(args.config).resolve()
        payload = dict(command=command, config=str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
                       model=desc, device=label, torch=torch.__version__, python=platform.python_version(),
                       threads=torch.get_num_threads(), repeats=args.repeats,
                       loadavg_1min_before_after=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                       cpu_count=os.cpu_count(), rows=rows)
        out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
