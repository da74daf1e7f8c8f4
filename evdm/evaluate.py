"""Evaluate a checkpoint against simple baselines on shard clips: PSNR, SSIM (and LPIPS if available offline).

    python -m evdm.evaluate --ckpt runs/bair/last.pt --shards 'shards/bair/val-*.tar' --num 256 \
        [--steps 10 40] [--best_of 4] [--json eval.json]

Rows, all on the same clips: copy the nearest context frame; linear blend of the last start and
first end frame; the model with DDIM at each --steps; optionally the best of N model samples per
clip (chosen by mean PSNR over the middle; its SSIM/LPIPS are those of that sample). Metrics are
computed on the generated middle frames in [0, 1] (float, before rounding to uint8), per middle
position and averaged over clips and positions (the mean of per-frame PSNRs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from evdm.metrics import BASELINES, middle_frames_metric, psnr, ssim, to_unit, u8_to_unit
from evdm.config import add_speed_flags
from evdm.sampling import batched, iter_shard_clips, load_model, progress_bar, resolve_device, sample_float
from evdm.seeds import mix_seed

LINEAR_BLEND = "linear blend"


def load_lpips(device: torch.device) -> tuple[Callable | None, str]:
    """LPIPS (AlexNet) as f(x, y) on [N, 3, H, W] in [0, 1] -> [N], only when `import lpips` works and
    both its linear heads and torchvision's AlexNet weights are already on disk; never downloads."""
    try:
        import lpips
    except ImportError:
        return None, "skipped (lpips not installed)"
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    backbone = list((Path(torch.hub.get_dir()) / "checkpoints").glob("alexnet-owt-*.pth"))
    if not heads.is_file() or not backbone:
        return None, "skipped (weights not available offline)"
    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def metric(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        *lead, C, H, W = x.shape
        x, y = (v.reshape(-1, C, H, W).expand(-1, 3, H, W) * 2 - 1 for v in (x, y))
        with torch.no_grad():
            return net(x, y).flatten().view(*lead)

    return metric, "alex"


def _record(acc: dict, name: str, per_frame: dict[str, torch.Tensor]) -> None:
    for metric, values in per_frame.items():
        acc.setdefault(name, {}).setdefault(metric, []).append(values.cpu())


def _frame_metrics(pred: torch.Tensor, truth: torch.Tensor, lpips_fn) -> dict[str, torch.Tensor]:
    """pred, truth: [B, C, M, H, W] in [0, 1] -> {metric: [B, M]}."""
    out = {"psnr": middle_frames_metric(psnr, pred, truth), "ssim": middle_frames_metric(ssim, pred, truth)}
    if lpips_fn is not None:
        out["lpips"] = middle_frames_metric(lpips_fn, pred, truth)
    return out


def _best_of(candidates: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per clip, the metrics of the candidate with the highest mean PSNR over its middle."""
    best = torch.stack([c["psnr"].mean(dim=1) for c in candidates]).argmax(dim=0)  # [B]
    rows = torch.arange(best.shape[0])
    return {m: torch.stack([c[m] for c in candidates])[best, rows] for m in candidates[0]}


def summarize(acc: dict) -> list[dict]:
    """{method: {metric: [[B, M] ...]}} -> table rows with means and per-position means."""
    rows = []
    for name, metrics in acc.items():
        row = {"method": name}
        for metric, chunks in metrics.items():
            values = torch.cat(chunks)  # [N, M]
            row[metric] = round(values.mean().item(), 4)
            row[f"{metric}_per_position"] = [round(v, 4) for v in values.mean(dim=0).tolist()]
        rows.append(row)
    return rows


def evaluate(
    ckpt_path: str | Path, shards: str | list[str], *, num: int = 256, batch_size: int = 16,
    steps_list: tuple[int, ...] | list[int] = (10, 40), guidance_scale: float | None = None,
    device: str | None = None, seed: int = 0, best_of: int = 1, use_ema: bool = True, progress: bool = True,
    precision: str | None = None, compile: str | None = None,
) -> dict:
    """Metrics of the baselines and the model (DDIM at each of steps_list) on the first `num` shard clips.

    guidance_scale None: the checkpoint's sample.guidance_scale. best_of > 1 adds a best-of-N row at
    max(steps_list). precision / compile: None for the checkpoint's sample.precision / sample.compile.
    Returns a JSON-ready dict; result["summary"] compares the model at max(steps_list) with the linear blend.
    """
    dev = resolve_device(device)
    model, cfg, schedule = load_model(ckpt_path, dev, use_ema=use_ema, compile=compile)
    precision = precision or cfg.sample.precision
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, sampler="ddim"))
    guidance = cfg.sample.guidance_scale if guidance_scale is None else guidance_scale
    K, T = cfg.data.endpoint_context, cfg.data.T
    lpips_fn, lpips_status = load_lpips(dev)
    steps_list = sorted(set(steps_list))
    main_row = f"model ddim-{steps_list[-1]}"
    acc: dict = {}
    clips_seen = 0

    def model_middle(clips: np.ndarray, steps: int, gen_seed: int) -> torch.Tensor:
        x = sample_float(model, schedule, cfg, clips, steps=steps, eta=cfg.sample.eta, guidance_scale=guidance,
                         generator=torch.Generator(device=dev).manual_seed(gen_seed), precision=precision,
                         pad_to=batch_size)
        return to_unit(x[:, :, K : T - K])

    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=-(-num // batch_size), clips=0, visible=progress)
        for index, batch in enumerate(batched(iter_shard_clips(shards, cfg, num), batch_size)):
            clips = np.stack([np.asarray(c) for _, c in batch])
            unit = u8_to_unit(torch.from_numpy(clips).permute(0, 4, 1, 2, 3).to(dev))
            truth = unit[:, :, K : T - K]
            for name, baseline in BASELINES.items():
                _record(acc, name, _frame_metrics(baseline(unit, K), truth, lpips_fn))
            batch_seed = mix_seed(seed, index)
            for steps in steps_list:
                single = _frame_metrics(model_middle(clips, steps, batch_seed), truth, lpips_fn)
                _record(acc, f"model ddim-{steps}", single)
            if best_of > 1:  # the single-sample row's draw is candidate 0, so best-of-N >= it per clip
                candidates = [single] + [_frame_metrics(model_middle(clips, steps_list[-1], batch_seed * 131 + n),
                                                        truth, lpips_fn) for n in range(1, best_of)]
                _record(acc, f"{main_row} best-of-{best_of}", _best_of(candidates))
            clips_seen += len(batch)
            bar.update(task, advance=1, clips=clips_seen)

    rows = summarize(acc)
    by_name = {r["method"]: r for r in rows}
    return {
        "checkpoint": str(ckpt_path), "shards": shards, "clips": clips_seen, "T": T, "K": K, "M": T - 2 * K,
        "size": cfg.data.size, "color_mode": cfg.data.color_mode, "sampler": "ddim", "steps_list": steps_list,
        "eta": cfg.sample.eta, "guidance_scale": guidance, "seed": seed, "best_of": best_of, "ema": use_ema,
        "precision": precision,
        "metric_range": "[0, 1] float, PSNR capped at 100 dB", "lpips": lpips_status, "rows": rows,
        "summary": {
            "model": main_row, "model_psnr": by_name[main_row]["psnr"],
            "linear_blend_psnr": by_name[LINEAR_BLEND]["psnr"],
            "model_minus_linear_blend_db": round(by_name[main_row]["psnr"] - by_name[LINEAR_BLEND]["psnr"], 4),
        },
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['checkpoint']}: {result['clips']} clips, middle frames {result['M']}, "
                        f"guidance {result['guidance_scale']}; LPIPS {result['lpips']}")
    for col in ("method", "PSNR dB", "SSIM", "LPIPS", "PSNR per position", "SSIM per position"):
        table.add_column(col, justify="left" if col == "method" or "position" in col else "right")
    best_psnr = max(r["psnr"] for r in result["rows"])
    for r in result["rows"]:
        mark = "bold green" if r["psnr"] == best_psnr else ""
        table.add_row(r["method"], f"[{mark}]{r['psnr']:.2f}[/]" if mark else f"{r['psnr']:.2f}", f"{r['ssim']:.4f}",
                      f"{r['lpips']:.4f}" if "lpips" in r else "-",
                      " ".join(f"{v:.2f}" for v in r["psnr_per_position"]),
                      " ".join(f"{v:.3f}" for v in r["ssim_per_position"]))
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    from evdm.checkpoint import CheckpointError
    from evdm.config import ConfigError
    from evdm.sampling import SamplingError, one_line

    p = argparse.ArgumentParser(prog="python -m evdm.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--shards", required=True, help="shard glob / brace pattern, e.g. 'shards/val-*.tar'")
    p.add_argument("--num", type=int, default=256, help="clips to evaluate (streamed, first in sorted order)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 40], help="DDIM step counts, one row each")
    p.add_argument("--guidance_scale", type=float, help="default: the checkpoint's sample.guidance_scale")
    p.add_argument("--best_of", type=int, default=1, help="N > 1 adds a best-of-N row at the largest --steps")
    p.add_argument("--device", help="cuda | cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--json", help="write the results here")
    add_speed_flags(p)
    args = p.parse_args(argv)
    if min(args.num, args.batch_size, args.best_of, *args.steps) < 1:
        p.error("--num, --batch_size, --best_of and --steps must be >= 1")
    try:
        result = evaluate(args.ckpt, args.shards, num=args.num, batch_size=args.batch_size, steps_list=args.steps,
                          guidance_scale=args.guidance_scale, device=args.device, seed=args.seed,
                          best_of=args.best_of, use_ema=not args.no_ema, precision=args.precision,
                          compile=args.compile)
    except (SamplingError, CheckpointError, ConfigError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
