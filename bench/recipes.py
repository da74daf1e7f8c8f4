"""The recipe study behind docs/RECIPES.md: which prediction, residual, schedule and guidance train best
at the demo's CPU budget, on each kind of synthetic motion.

    python bench/recipes.py [--out runs/recipes] [--grid one-at-a-time|full|base] [--motions glide orbit] [--seed 1]
                            [--eval-clips 160] [--max-steps N] [--guidance 1.0 1.8] [--set section.key=value ...]

Each recipe is configs/demo.toml (its model, batch 8, 32x32 and, unless --max-steps, its steps: the
demo's budget) with the diffusion keys changed, trained with demo.py's own stages on 300 synthetic
videos of each motion and evaluated on their first --eval-clips val clips (default 160, of 360) at
each --guidance (default 1.0 and 1.8), with the demo's sampler rows (DDIM at demo.MAIN_STEPS, the
summary, at demo.EVAL_STEPS and at the config's sample.steps).
--grid full trains every prediction x residual x schedule (12 runs a motion); one-at-a-time trains
demo.toml's recipe and each single change from it (5 runs a motion, about 6 min each at 2,000 steps
on an idle 2-core CPU); base trains demo.toml's recipe alone. --set adds a change outside those axes (any config
key, e.g. model.direct_input="blend") to every recipe: measure one change at a time as
`--grid base --set ...`. Every cell is PSNR / SSIM / HF ratio (the middle's high-frequency energy
over the truth's, 1 = as sharp: evdm.metrics.hf_ratio); the margins are those of the summary row and
of the sampled row (sample.steps, what sample.py draws).
The videos use --seed (default 1; the demo renders seed 0), so nothing here is chosen on the demo's
val clips. Resumable: a trained recipe is not trained again, only scored at the guidance scales it
lacks. Writes OUT/recipes.json (every finished run under OUT, earlier --set invocations' too) and
prints the markdown tables of docs/RECIPES.md.
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
GRIDS = ("one-at-a-time", "full", "base")


def recipes(grid: str, base: dict[str, str]) -> list[dict[str, str]]:
    """The recipes to train: every combination of AXES (full), `base` alone, or `base` then each single
    change from it (one-at-a-time)."""
    if grid == "full":
        return [dict(zip(AXES, combo)) for combo in itertools.product(*AXES.values())]
    changed = [{**base, axis: value} for axis, values in AXES.items() for value in values if value != base[axis]]
    return [base] + (changed if grid == "one-at-a-time" else [])


def name_of(recipe: dict[str, str], changes: dict[str, str] | None = None) -> str:
    """The run folder's name: the axes' values, then each --set change as key=value."""
    extra = [f"{key.split('.')[-1]}={value.strip(chr(34))}" for key, value in sorted((changes or {}).items())]
    return "-".join([recipe[axis] for axis in AXES] + extra)


def parse_changes(texts: list[str]) -> dict[str, str]:
    """['model.direct_input="blend"', ...] -> {"model.direct_input": '"blend"'} (values stay TOML text)."""
    pairs = [text.split("=", 1) for text in texts]
    if any(len(pair) != 2 or "." not in pair[0] for pair in pairs):
        raise SystemExit(f"recipes: --set expects section.key=value, got {texts}")
    return {key.strip(): value.strip() for key, value in pairs}


def split_axes(changes: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """--set changes -> (those of an AXES key, as recipe values; the others): a change of the schedule
    is a recipe of the grid, named and tabulated as one."""
    axes = {key.removeprefix("diffusion."): value.strip('"') for key, value in changes.items()
            if key.removeprefix("diffusion.") in AXES and key.startswith("diffusion.")}
    return axes, {key: value for key, value in changes.items() if key.removeprefix("diffusion.") not in axes}


def run_recipe(out: Path, shards: Path, recipe: dict[str, str], eval_clips: int, max_steps: int,
               changes: dict[str, str] | None = None, guidance: tuple[float, ...] = GUIDANCE) -> dict:
    """Train one recipe (with the --set `changes`) unless trained, and evaluate it at each guidance not
    yet scored; returns its record: {"recipe", "changes", "train_s", "guidance": {g: {"summary":
    evaluate's summary, "rows": {method: [psnr, ssim, hf_ratio]}}}}, rewritten after each stage."""
    run = out / name_of(recipe, changes)
    record_path = run / "record.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
    else:
        start = time.perf_counter()
        overrides = {f"diffusion.{k}": f'"{v}"' for k, v in recipe.items()} | {"train.max_steps": str(max_steps)}
        demo.train_model(run / "run", shards, overrides | (changes or {}))
        record = {"recipe": recipe, "changes": changes or {}, "train_s": round(time.perf_counter() - start, 1),
                  "guidance": {}}
        write_result(record_path, record)
    for g in guidance:
        if str(g) in record["guidance"]:
            continue
        result = demo.evaluate_model(run / "run" / "last.pt", shards, run / f"eval_guidance{g}.json", guidance=g,
                                     clips=eval_clips)
        record["guidance"][str(g)] = {"summary": result["summary"], "rows": {
            r["method"]: [r["psnr"], r["ssim"], r["hf_ratio"]] for r in result["rows"]}}
        write_result(record_path, record)
    return record


def margin(s: dict) -> str:
    """A summary's (or its "sampled" part's) margins over the best baselines: '+2.03 dB / +0.0251'."""
    return f"{s['model_minus_best_baseline_db']:+.2f} dB / {s['model_minus_best_baseline_ssim']:+.4f}"


def table(records: list[dict]) -> str:
    """Markdown for one motion: a row per recipe (its axes and --set changes) with PSNR / SSIM / HF ratio
    of every row (baselines, then each DDIM step count at each guidance), and the margins over the best
    baseline at guidance 1.0 of the summary row and of the sampled row; the best baselines first."""
    first = records[0]["guidance"]["1.0"]
    guidance = list(records[0]["guidance"])
    models = [m for m in first["rows"] if m.startswith("model ")]
    cols = [(m, "1.0") for m in first["rows"] if not m.startswith("model ")] + [(m, g) for g in guidance for m in models]
    s = first["summary"]
    head = list(AXES) + ["changes"] + [m.removeprefix("model ") + (f" g{g}" if m in models else "") for m, g in cols]
    head += [f"margin ({s['model']} g1.0)", f"margin ({s['sampled']['model']} g1.0)"]
    align = [":--"] * (len(AXES) + 1) + ["--:"] * (len(head) - len(AXES) - 1)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    best = (f"best baseline: {s['best_baseline_psnr']['psnr']:.2f} dB ({s['best_baseline_psnr']['method']}), "
            f"SSIM {s['best_baseline_ssim']['ssim']:.4f} ({s['best_baseline_ssim']['method']})")
    for rec in records:
        cells = [rec["recipe"][a] for a in AXES] + [", ".join(f"{k}={v}" for k, v in rec["changes"].items()) or "-"]
        cells += ["{:.2f} / {:.4f} / {:.2f}".format(*rec["guidance"][g]["rows"][m]) if g in rec["guidance"] else "-"
                  for m, g in cols]
        s = rec["guidance"]["1.0"]["summary"]
        cells += [margin(s), margin(s["sampled"])]
        lines.append("| " + " | ".join(cells) + " |")
    return best + "\n\n" + "\n".join(lines)


def finished_runs(folder: Path) -> list[dict]:
    """The record of every finished run under `folder`, in the order they finished training (their
    checkpoints' times; a record is rewritten by each later evaluation): this invocation's and earlier
    ones' (other --set changes), so the table holds the whole one-at-a-time study."""
    paths = sorted(folder.glob("*/record.json"), key=lambda p: (p.parent / "run" / "last.pt").stat().st_mtime)
    return [json.loads(p.read_text()) for p in paths]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/recipes.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/recipes"))
    parser.add_argument("--grid", choices=GRIDS, default="one-at-a-time")
    parser.add_argument("--motions", nargs="+", choices=("glide", "orbit"), default=["glide", "orbit"])
    parser.add_argument("--seed", type=int, default=1, help="synthetic video seed (the demo uses 0)")
    parser.add_argument("--eval-clips", type=int, default=160, help="val clips scored per recipe and guidance")
    parser.add_argument("--max-steps", type=int, help="training steps per recipe (default: configs/demo.toml's)")
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCE),
                        help="guidance scales each recipe is scored at (the first must be 1.0: the margins')")
    parser.add_argument("--set", dest="changes", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a change outside the axes, on every recipe (value as TOML)")
    args = parser.parse_args(argv)
    axis_changes, changes = split_axes(parse_changes(args.changes))
    if args.guidance[0] != 1.0:
        parser.error("--guidance: the first scale must be 1.0 (the table's margins are at guidance 1.0)")
    load_before = os.getloadavg()[0]
    cfg = load_config(demo.CONFIG)
    d, max_steps = cfg.diffusion, args.max_steps or cfg.train.max_steps
    todo = recipes(args.grid, {"prediction": d.prediction, "residual": d.residual, "schedule": d.schedule} | axis_changes)
    results = {}
    for motion in args.motions:
        shards = demo.make_shards(args.out / motion, motion, args.seed)
        for recipe in todo:
            run_recipe(args.out / motion, shards, recipe, args.eval_clips, max_steps, changes, tuple(args.guidance))
        results[motion] = finished_runs(args.out / motion)
    md = "\n\n".join(f"### {motion}\n\n{table(records)}" for motion, records in results.items())
    write_result(args.out / "recipes.json", {"grid": args.grid, "changes": changes, "seed": args.seed, "config": demo.CONFIG,
                                              "max_steps": max_steps, "eval_steps": demo.EVAL_STEPS,
                                              "main_steps": demo.MAIN_STEPS, "eval_clips": args.eval_clips,
                                              "machine": machine(load_before), "results": results, "table": md})
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
