"""Render bench/results/*.json as docs/BENCHMARKS.md: per benchmark what it measures, the machine, the command, a table.

    python bench/report.py [--results bench/results] [--out docs/BENCHMARKS.md]

Ratio columns are computed here from the stored rows. A missing result file is listed as "not run yet".
Results written before the scripts recorded their command line get one rebuilt from the stored parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Shown in this order when present, as "label: value" (the value alone where the label is None).
MACHINE_FACTS = (
    ("device", "device"), ("gpu", "GPU"), ("cpu_count", "CPUs"), ("threads", "torch threads"), ("python", "Python"),
    ("torch", "torch"), ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("ffmpeg", "ffmpeg"), ("dali", None), ("date", "date"),
)


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; columns are right-aligned unless their header ends with '<'."""
    align = [":--" if h.endswith("<") else "--:" for h in headers]
    lines = ["| " + " | ".join(h.rstrip("<") for h in headers) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def fmt(value, spec: str = "", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num is not None and den else ""


def machine_line(result: dict) -> str:
    result = {**result.get("machine", {}), **result}  # bench/gpu_check.py nests its machine facts
    facts = []
    for key, label in MACHINE_FACTS:
        if result.get(key) is not None:
            value = str(result[key]).split(" Copyright")[0]  # ffmpeg -version's first line ends in one
            facts.append(f"{label}: {value}" if label else value)
    load = result.get("loadavg_1min_before_after")
    if load:
        facts.append(f"load average (1 min): {load[0]} before, {load[1]} after")
    return "Machine: " + ("; ".join(facts) or "not recorded") + "."


def unique(values) -> list[str]:
    return [str(v) for v in dict.fromkeys(values)]


# ---- per benchmark: an intro line, the command rebuilt for results that predate "command", the body ----------


def loader_intro(r: dict) -> str:
    return (f"Training loaders: clips/s delivered as uint8 [B, C, T, H, W] batches (B {r['batch']}, T {r['T']}, "
            f"{r['size']}x{r['size']} rgb) from {r['videos']} synthetic videos ({r['clips']} clips in {r['shards']} "
            f"shards), {r['seconds_per_row']:g} s per row. \"x baseline\" compares with the ffmpeg-per-item "
            "baseline of the same parallelism, \"of ceiling\" with reading the shard bytes from page cache.")


def loader_command(r: dict) -> str:
    return f"python bench/loader.py --videos {r['videos']} --seconds {r['seconds_per_row']:g}"


def loader_body(r: dict) -> list[str]:
    rows = [[x["loader"], str(x["workers"]), fmt(x["clips_per_s"], ".1f"), fmt(x["mb_per_s"], ".1f"),
             fmt(x.get("x_baseline"), ".1f", "x"), fmt(100 * x["of_ceiling"], ".1f", "%") if "of_ceiling" in x else "",
             fmt(x.get("cpu_us_per_clip"), ".0f")] for x in r["rows"]]
    lines = md_table(["loader<", "workers", "clips/s", "MB/s", "x baseline", "of ceiling", "CPU µs/clip"], rows)
    g = r.get("goals")
    if g:
        lines += ["", f"Shard loader at 2 workers: {g['x_baseline_at_2_workers']}x baseline (goal "
                      f"{g['x_baseline_goal']}x), {100 * g['of_ceiling_at_2_workers']:.1f}% of ceiling "
                      f"(goal {100 * g['of_ceiling_goal']:.0f}%)."]
    return lines


def preprocess_intro(r: dict) -> str:
    fps = (f" at {r['source_fps']:g} fps" if "source_fps" in r else "")
    resampled = (" \"fps\" is the row's --fps (\"native\": none); \"x native\" compares with the native row of the "
                 f"same decoder and worker count. Each row is the fastest of {r.get('repeats', 1)} runs, native and "
                 "--fps runs alternating, so both saw the same load; \"CPU ms/video\" is the least CPU time (this process, "
                 "its pool workers and ffmpeg) per video of those runs, which other work on the machine disturbs far "
                 "less than the wall clock, and \"CPU x native\" its ratio to the native row's (below 1: cheaper)."
                 if "resampled_fps" in r else "")
    size = f"{r['size']}x{r['size']}"
    return (f"`preprocess.shard` on {r['videos']} synthetic videos ({r['frames']} frames{fps}, {size}): "
            "throughput per decoder and worker count. \"decode share\" is the decoder's wall time over all "
            "processing time; \"x ffmpeg\" compares with the ffmpeg row of the same worker count (and rate)."
            + resampled)


def preprocess_command(r: dict) -> str:
    rows = r["rows"]
    fps = f" --fps {r['resampled_fps']:g} --repeats {r.get('repeats', 1)}" if "resampled_fps" in r else ""
    return (f"python bench/preprocess.py --videos {r['videos']} "
            f"--workers {' '.join(unique(x['workers'] for x in rows))} "
            f"--decoders {' '.join(unique(x['decoder'] for x in rows))}{fps}")


def preprocess_body(r: dict) -> list[str]:
    def row(decoder: str, workers: int, fps) -> dict:
        return next((x for x in r["rows"] if (x["decoder"], x["workers"], x.get("fps")) == (decoder, workers, fps)), {})

    def speed(decoder: str, workers: int, fps) -> float | None:
        return row(decoder, workers, fps).get("videos_per_s")

    def cpu(decoder: str, workers: int) -> float | None:
        return row(decoder, workers, None).get("cpu_ms_per_video")

    rows = [[x["decoder"], str(x["workers"]), fmt(x.get("fps"), "g") or "native", fmt(x["videos_per_s"], ".1f"),
             fmt(x["clips_per_s"], ".1f"), fmt(x["wall_s"], ".2f"), fmt(x["decode_s"], ".2f"),
             fmt(x["python_s"], ".2f"), fmt(100 * x["decode_share"], ".0f", "%"),
             ratio(x["videos_per_s"], speed("ffmpeg", x["workers"], x.get("fps"))),
             ratio(x["videos_per_s"], speed(x["decoder"], x["workers"], None)),
             fmt(x.get("cpu_ms_per_video"), ".1f"), ratio(x.get("cpu_ms_per_video"), cpu(x["decoder"], x["workers"]))]
            for x in r["rows"]]
    lines = md_table(["decoder<", "workers", "fps", "videos/s", "clips/s", "wall s", "decode s", "python s",
                      "decode share", "x ffmpeg", "x native", "CPU ms/video", "CPU x native"], rows)
    notes = []
    if "synth_s" in r:
        notes.append(f"dataset generation {r['synth_s']} s")
    if "identical_shards_across_rows" in r:
        across = "runs, decoders and worker counts (at each rate)" if "resampled_fps" in r else "all rows"
        notes.append(f"identical shards across {across}: {'yes' if r['identical_shards_across_rows'] else 'NO'}")
    return lines + (["", "; ".join(notes).capitalize() + "."] if notes else [])


def train_step_intro(r: dict) -> str:
    return (f"One training step (forward + backward + AdamW) of the denoiser per model config and variant on random "
            f"data: median of {r['steps']} timed steps after {r['warmup']} warm-up. \"x eager\" compares samples/s "
            "with the eager row of the same config.")


def train_step_command(r: dict) -> str:
    rows = r["rows"]
    return (f"python bench/train_step.py --configs {','.join(unique(x['config'] for x in rows))} "
            f"--variants {','.join(unique(x['variant'] for x in rows))} --steps {r['steps']} --warmup {r['warmup']}")


def train_step_body(r: dict) -> list[str]:
    ok = [x for x in r["rows"] if x["status"] == "ok"]
    eager = {x["config"]: x["samples_per_s"] for x in ok if x["variant"] == "eager"}
    rows = [[x["config"], x["variant"], fmt(x.get("batch")), fmt(x.get("params") and x["params"] / 1e6, ".2f", "M"),
             fmt(x.get("step_ms"), ".1f"), fmt(x.get("samples_per_s"), ".3g"),
             ratio(x.get("samples_per_s"), eager.get(x["config"])), fmt(x.get("first_step_s"), ".2f"), x["status"]]
            for x in r["rows"]]
    lines = md_table(["config<", "variant<", "batch", "params", "step ms", "samples/s", "x eager", "first step s",
                      "status<"], rows)
    lines += ["", "**Fed by the real loader.** `evdm.train.train()` on `configs/smoke.toml` with the shard loader at "
                  "0 and 2 workers (synthetic shards); \"data wait\" is the fraction of wall time the loop waited for "
                  "the next batch, over the timed steps (warm-up and the validating last window left out); "
                  "\"of compute-only\" compares with the same variant's row above.", ""]
    fed = r.get("loader_rows")
    if not fed:
        return lines + ["Not in this result file: it predates the loader-fed rows (`--loader-steps`, default 30)."]
    compute = {(x["config"], x["variant"]): x["samples_per_s"] for x in ok}
    rows = [[x["config"], x.get("variant", ""), str(x["num_workers"]), fmt(x.get("batch")), fmt(x.get("steps")),
             fmt(x.get("step_ms"), ".1f"), fmt(x.get("samples_per_s"), ".3g"),
             ratio(x.get("samples_per_s"), compute.get((x["config"], x.get("variant")))),
             fmt(100 * x["data_wait"], ".1f", "%") if "data_wait" in x else "", x["status"]]
            for x in fed]
    return lines + md_table(["config<", "variant<", "workers", "batch", "steps", "step ms", "samples/s",
                             "of compute-only", "data wait", "status<"], rows)


def sample_intro(r: dict) -> str:
    return (f"DDIM sampling throughput with untrained weights, {r['model']}: median of {r['repeats']} calls per row. "
            "Guidance on runs the conditional and null branches in one forward of twice the batch.")


def sample_command(r: dict) -> str:
    rows = r["rows"]
    cmd = (f"python bench/sample.py --config {r['config']} --steps {' '.join(unique(x['steps'] for x in rows))} "
           f"--batch_sizes {' '.join(unique(x['batch'] for x in rows))} "
           f"--guidance {' '.join(unique(x['guidance'] for x in rows))} --repeats {r['repeats']}")
    return cmd + (f" --threads {r['threads']}" if r.get("threads") else "")


def sample_body(r: dict) -> list[str]:
    rows = [[str(x["steps"]), "on" if x["guidance"] != 1.0 else "off", str(x["batch"]), str(x["forward_batch"]),
             fmt(x["seconds_per_call"], ".3f"), fmt(x["ms_per_model_call"], ".1f"), fmt(x["clips_per_s"], ".3g")]
            for x in r["rows"]]
    return md_table(["steps", "guidance", "batch", "forward batch", "s / call", "ms / model call", "clips/s"], rows)


def compile_intro(r: dict) -> str:
    return ("What torch.compile costs before the first training step on this CPU (Inductor's C++ backend): evdm's "
            "own step compiled as a whole model (fullgraph, as evdm did before its regional compile) and regionally (evdm.denoiser), with "
            "an empty Inductor cache and again in a new process on the filled one (what a resumed run pays), and the "
            "first step after a batch change. Each row is a fresh process; CPU seconds say nothing of a GPU's "
            "compile (bench/gpu_check.py measures that), but the ratios show what regional compilation and the "
            "cache change.")


def compile_command(r: dict) -> str:
    return f"python bench/compile_time.py --config {r['config']} --batch {r['batch']} --batch2 {r['batch2']}"


def compile_body(r: dict) -> list[str]:
    rows = [[x["row"], fmt(x.get("first_step_s"), ".1f"), fmt(x.get("step_ms"), ".0f"), fmt(x.get("batch_change_s"), ".1f"),
             x["status"]] for x in r["rows"]]
    ratios = "; ".join(f"{k}: {v:.2f}x" for k, v in r["ratios"].items() if v is not None)
    return md_table(["row<", "first step s", "step ms", f"first step at batch {r['batch2']} s", "status<"], rows) + [
        "", f"Ratios of the first steps: {ratios}."]


def reliability_intro(r: dict) -> str:
    return ("What exact resume and shard verification cost. **Fast-forward**: a resumed run's loader replays "
            "the shard order, shuffle buffer and batching over clip references (tar headers, no pixel reads) up "
            f"to its start batch; here {r['clips']} tiny clips in {r['shards']} shards, resumed at the last batch of "
            "the first pass, seconds to the first batch against a fresh start. **verify_shards**: one first pass "
            f"over {r['verify_clips']} clips (B {r['batch']}, T 8, 64x64 rgb, {r['shard_size']} a shard) with "
            "`data.verify_shards` off and on, start-up included; each reader hashes a shard once, so only the "
            "first pass pays.")


def reliability_command(r: dict) -> str:
    return f"python bench/reliability.py --clips {r['clips']} --verify-clips {r['verify_clips']}"


def reliability_body(r: dict) -> list[str]:
    rows = [[str(x["workers"]), str(x["start_batch"]), str(x["clip_refs"]), fmt(x["first_batch_s"], ".2f"),
             fmt(x["resumed_first_batch_s"], ".2f"), fmt(x["fast_forward_s"], ".2f"), fmt(x["refs_per_s"], ",.0f")]
            for x in r["fast_forward_rows"]]
    lines = md_table(["workers", "start batch", "clip refs", "fresh: first batch s", "resumed: first batch s",
                      "fast-forward s", "refs/s"], rows)
    off = {x["workers"]: x["clips_per_s"] for x in r["verify_rows"] if not x["verify_shards"]}
    rows = [[str(x["workers"]), "on" if x["verify_shards"] else "off", fmt(x["pass_s"], ".2f"),
             fmt(x["clips_per_s"], ".0f"), fmt(x["mb_hashed"], ".0f"), ratio(x["clips_per_s"], off.get(x["workers"]))]
            for x in r["verify_rows"]]
    return lines + [""] + md_table(["workers", "verify_shards", "first pass s", "clips/s", "MB hashed", "x off"], rows)


GPU_CHECK_INTRO = (
    "The GPU issues' figures on one H100/H200 in one command of at most 9 minutes, compiles included. It first "
    "runs `pytest -m gpu` (tests/test_gpu.py, at most 90 s: the compiled bf16 step against eager, fp16 with its "
    "GradScaler, compiled sampling, torchrun over NCCL with a stop request, pinned memory, DALI), reported as the "
    "table's first row; then the measurements: evdm's own "
    "training step of the reference model (64 px, T 8, context 2 + 2, 50.95 M parameters) compiled in bf16 at batch "
    "64 and 128 (ms/step, samples/s, MFU, peak memory, the cold compile), a kernel profile of the compiled step "
    "(top kernels, copies), the warm compile a resumed run pays, the eager bf16 and fp32 baselines, sampling at "
    "batch 64 with guidance 1.8 in fp32 and bf16 + compile (clips/s, |bf16 - fp32|), `train.py` fed by the shard "
    "loader with compile, and the same under `torchrun` over NCCL. Rows run in priority order under a time budget; "
    "`bench/gpu_check.py`'s docstring lists them.")
OLD_GPU_CHECK = ("An earlier check, of the code before the regional compile (main at fb4df0c: SDPA attention, autocast norms, two "
                 "space-time forms `2d` / `3d`, layouts `cl` / `contig`); its raw files, a kernel profile and the "
                 "commands are in `shared/measurements/` of the workplace.")


def gpu_check_intro(r: dict) -> str:
    if r.get("smoke"):
        return GPU_CHECK_INTRO + " **This result is the CPU smoke run (`--smoke`, tiny model): not a GPU figure.**"
    return OLD_GPU_CHECK if any(" 2d " in row["job"] or " 3d " in row["job"] for row in r["rows"]) else GPU_CHECK_INTRO


def gpu_check_command(r: dict) -> str:
    return "bash bench/gpu_check.sh"


def gpu_check_body(r: dict) -> list[str]:
    gpu_check = load_bench("gpu_check")
    headers = [c + ("<" if c in ("row", "note", "status") else "") for c in gpu_check.COLUMNS]
    lines = md_table(headers, gpu_check.table_cells(r)) + ["", gpu_check.LEGEND, ""]
    kernels = gpu_check.profile_cells(r)
    if kernels:
        lines += ["The profile row's top kernels (compiled step, batch 64):", "",
                  *md_table(["kernel<", "ms per step", "share", "calls per step"], kernels), ""]
    return lines + [f"Wall time {r['wall_s']:.0f} s of a {r['budget_s']:.0f} s budget."]


def load_bench(name: str):
    """bench/{name}.py as a module (bench/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name: (title, intro, command rebuilt for old results, body, how to run it)
SECTIONS = {
    "gpu_check": ("GPU check", gpu_check_intro, gpu_check_command, gpu_check_body, "bash bench/gpu_check.sh"),
    "loader": ("Training loaders", loader_intro, loader_command, loader_body, "python bench/loader.py"),
    "preprocess": ("Preprocessing (videos -> shards)", preprocess_intro, preprocess_command, preprocess_body,
                   "python bench/preprocess.py"),
    "train_step": ("Training step", train_step_intro, train_step_command, train_step_body, "python bench/train_step.py"),
    "sample": ("Sampling", sample_intro, sample_command, sample_body, "python bench/sample.py"),
    "compile_time": ("Compile time (CPU)", compile_intro, compile_command, compile_body, "python bench/compile_time.py"),
    "reliability": ("Resume and shard verification", reliability_intro, reliability_command, reliability_body,
                    "python bench/reliability.py"),
}
NOT_MEASURED = {
    "gpu_check": [GPU_CHECK_INTRO, "", "To run it on one H100/H200 (at most 9 minutes; the small wheels it needs, "
                  "webdataset, braceexpand and tomli, are fetched as `bench/wheels/README.md` says):", "", "```",
                  "bash bench/gpu_check.sh   # then: python bench/report.py", "```", "",
                  "**Table: not measured yet on the current code.** No session with a GPU has run this version of "
                  "the check; `python bench/report.py` renders its table here from `bench/results/gpu_check.json`."],
}


def shown_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def render(results_dir: Path) -> str:
    """The whole markdown document for the result files in `results_dir`."""
    lines = ["# Benchmarks", "",
             f"Generated by `python bench/report.py` from `{shown_path(results_dir)}/*.json`; rerun a benchmark, "
             "then this, rather than editing by hand. Each result is one run, often on a shared machine (see the "
             "load average): compare ratios within a table rather than absolute numbers across sections.", ""]
    for name, (title, intro, rebuild, body, run) in SECTIONS.items():
        path = results_dir / f"{name}.json"
        lines += [f"## {title} (`{run.split()[-1]}`)", ""]
        if not path.is_file():
            lines += NOT_MEASURED.get(name, [f"Not run yet: no `{shown_path(path)}`. Run `{run}`."]) + [""]
        for result in [path] * path.is_file() + archived(results_dir, name):
            r = json.loads(result.read_text())
            command = r.get("command") or rebuild(r) + "  # rebuilt from the stored parameters"
            heading = [] if result == path else [f"### Earlier: `{shown_path(result)}`", ""]
            lines += [*heading, intro(r), "", machine_line(r), "", "```", command, "```", "", *body(r), ""]
        lines += log_lines(results_dir, name)
    return "\n".join(lines)


def archived(results_dir: Path, name: str) -> list[Path]:
    """Earlier results kept beside the current one: {name}_{machine}_{date}.json, newest first (GPU checks)."""
    return sorted((p for p in results_dir.glob(f"{name}_*_20*.json")), reverse=True)


def log_lines(results_dir: Path, name: str) -> list[str]:
    """`{name}_*.log` beside the JSON: what an interrupted run left (it writes no JSON), shown verbatim."""
    lines = []
    for log in sorted(results_dir.glob(f"{name}_*.log")):
        lines += [f"From an interrupted run, `{shown_path(log)}` (no JSON):", "", "```", log.read_text().strip(),
                  "```", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench/results", help="folder of the *.json results")
    p.add_argument("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md")
    args = p.parse_args(argv)
    text = render(args.results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
