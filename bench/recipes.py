"""The recipe study behind docs/RECIPES.md: which prediction, residual, schedule and guidance train best
at the demo's CPU budget, on each kind of synthetic motion.

    python bench/recipes.py [--out runs/recipes] [--grid one-at-a-time|full] [--motions glide orbit] [--seed 1]
                            [--eval-clips 160] [--max-steps N]

Each recipe is configs/demo.toml (its model, batch 8, 32x32 and, unless --max-steps, its steps: the
demo's budget) with the diffusion keys changed, trained with demo.py's own stages on 300 synthetic
videos of each motion and evaluated on their first --eval-clips val clips (default 160, of 360) at
guidance 1.0 and 1.8, with the demo's sampler rows (DDIM at demo.MAIN_STEPS, the summary, and at
demo.EVAL_STEPS).
--grid full trains every prediction x residual x schedule (12 runs a motion); one-at-a-time trains
demo.toml's recipe and each single change from it (5 runs a motion, about 7 min each at 960 steps on 2 cores).
The videos use --seed (default 1; the demo renders seed 0), so nothing here is chosen on the demo's val
clips. Resumable: a recipe whose evaluations exist is not trained again. Writes OUT/recipes.json and
prints the markdown table of docs/RECIPES.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import demo  # noqa: E402
from evdm.config import load_config  # noqa: E402
from results_io import machine, write_result  # noqa: E402

AXES = {"prediction": ("eps", "v", "x0"), "residual": ("none", "blend"), "schedule": ("linear", "cosine")}
GUIDANCE = (1.0, 1.8)


def recipes(grid: str, base: dict[str, str]) -> list[dict[str, str]]:
    """The recipes to train: every combination of AXES (full), or `base` then each single change from it."""
    if grid == "full":
        return [dict(zip(AXES, combo)) for combo in itertools.product(*AXES.values())]
    changed = [{**base, axis: value} for axis, values in AXES.items() for value in values if value != base[axis]]
    return [base] + changed


def name_of(recipe: dict[str, str]) -> str:
    return "-".join(recipe[axis] for axis in AXES)


def run_recipe(out: Path, shards: Path, recipe: dict[str, str], eval_clips: int, max_steps: int) -> dict:
    """Train one recipe (unless done) and evaluate it at each guidance; returns its record:
    {"recipe", "train_s", "guidance": {g: {"summary": evaluate's summary, "rows": {method: [psnr, ssim]}}}}."""
    run = out / name_of(recipe)
    evals = {g: run / f"eval_guidance{g}.json" for g in GUIDANCE}
    record_path = run / "record.json"
    if record_path.is_file() and all(p.is_file() for p in evals.values()):
        return json.loads(record_path.read_text())
    start = time.perf_counter()
    overrides = {f"diffusion.{k}": f'"{v}"' for k, v in recipe.items()} | {"train.max_steps": str(max_steps)}
    ckpt = demo.train_model(run / "run", shards, overrides)
    record = {"recipe": recipe, "train_s": round(time.perf_counter() - start, 1), "guidance": {}}
    for g, path in evals.items():
        result = demo.evaluate_model(ckpt, shards, path, guidance=g, clips=eval_clips)
        record["guidance"][str(g)] = {"summary": result["summary"],
                                      "rows": {r["method"]: [r["psnr"], r["ssim"]] for r in result["rows"]}}
    write_result(record_path, record)
    return record


def table(records: list[dict]) -> str:
    """Markdown for one motion: a row per recipe with PSNR / SSIM of every model row (DDIM step count)
    at each guidance, and the main row's margin over the best baseline at guidance 1.0; the best
    baselines first."""
    first = records[0]["guidance"]["1.0"]
    models = [m for m in first["rows"] if m.startswith("model ")]
    cols = [(m, g) for g in map(str, GUIDANCE) for m in models]
    head = list(AXES) + [f"{m.removeprefix('model ')} g{g}" for m, g in cols]
    head.append(f"margin ({first['summary']['model']} g1.0)")
    align = [":--"] * len(AXES) + ["--:"] * (len(head) - len(AXES))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    s = first["summary"]
    best = (f"best baseline: {s['best_baseline_psnr']['psnr']:.2f} dB ({s['best_baseline_psnr']['method']}), "
            f"SSIM {s['best_baseline_ssim']['ssim']:.4f} ({s['best_baseline_ssim']['method']})")
    for rec in records:
        cells = [rec["recipe"][a] for a in AXES]
        cells += ["{:.2f} / {:.4f}".format(*rec["guidance"][g]["rows"][m]) for m, g in cols]
        s = rec["guidance"]["1.0"]["summary"]
        cells.append(f"{s['model_minus_best_baseline_db']:+.2f} dB / {s['model_minus_best_baseline_ssim']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return best + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/recipes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--grid", choices=("one-at-a-time", "full"), default="one-at-a-time")
    parser.add_argument("--motions", nargs="+", choices=("glide", "orbit"), default=["glide", "orbit"])
    parser.add_argument("--seed", type=int, default=1, help="synthetic video seed (the demo uses 0)")
    parser.add_argument("--eval-clips", type=int, default=160, help="val clips scored per recipe and guidance")
    parser.add_argument("--max-steps", type=int, help="training steps per recipe (default: configs/demo.toml's)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    cfg = load_config(demo.CONFIG)
    d, max_steps = cfg.diffusion, args.max_steps or cfg.train.max_steps
    todo = recipes(args.grid, {"prediction": d.prediction, "residual": d.residual, "schedule": d.schedule})
    results = {}
    for motion in args.motions:
        shards = demo.make_shards(args.out / motion, motion, args.seed)
        results[motion] = [run_recipe(args.out / motion, shards, r, args.eval_clips, max_steps) for r in todo]
    md = "\n\n".join(f"### {motion}\n\n{table(records)}" for motion, records in results.items())
    write_result(args.out / "recipes.json", {"grid": args.grid, "seed": args.seed, "config": demo.CONFIG,
                                              "max_steps": max_steps, "eval_steps": demo.EVAL_STEPS,
                                              "main_steps": demo.MAIN_STEPS, "eval_clips": args.eval_clips,
                                              "machine": machine(load_before), "results": results, "table": md})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
