"""bench/gpu_check.py --smoke end to end (the GPU check's own code path on a CPU, tiny model), and
bench/report.py rendering results. Structure and real numbers only: never a timing or a ratio of timings.

The smoke run hides the packages a GPU machine lacks (ffmpeg-python, imageio-ffmpeg and with it any
ffmpeg binary, PyAV, DALI, tfrecord, crc32c, lpips): the check must run with torch, numpy, rich,
pillow and the small wheels alone.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

HIDDEN = ("ffmpeg", "imageio_ffmpeg", "av", "nvidia", "tfrecord", "crc32c", "lpips")
BLOCKER = f"""import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HIDDEN!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (hidden by tests/test_bench.py)", name=name)
sys.meta_path.insert(0, _Hide())
"""
SMOKE_ROWS = {  # job -> batches, as bench/gpu_check.py --smoke plans them
    "train bf16+compile": [2, 3], "profile bf16": [2], "train bf16": [2, 3], "sample fp32": [2],
    "sample bf16+compile": [2], "train.py fed": [2], "torchrun fed (gloo)": [2], "train fp32": [2, 3], "sample bf16": [2],
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-check")
    (tmp / "hide").mkdir()
    (tmp / "hide" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(tmp / "hide"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", str(tmp / "gpu_check.json")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads((tmp / "gpu_check.json").read_text()), stdout=proc.stdout, folder=tmp)


def test_gpu_check_smoke_runs_every_row_kind(smoke):
    r = smoke
    assert r["smoke"] and r["command"].startswith("bash bench/gpu_check.sh --smoke") and r["date"].endswith("UTC")
    assert r["machine"]["torch"] and r["machine"]["cpu_count"] > 0 and r["wall_s"] > 0
    assert {job: [row["batch"] for row in r["rows"] if row["job"] == job] for job in SMOKE_ROWS} == SMOKE_ROWS
    assert len(r["rows"]) == sum(map(len, SMOKE_ROWS.values()))
    rows = {(row["job"], row["batch"]): row for row in r["rows"]}
    for (job, _), row in rows.items():
        if job.split()[1].endswith("+compile"):
            assert row["status"] == "skipped (--smoke: no compile; --smoke-compile)"
        else:
            assert row["status"] == "ok", (job, row["status"])
    for job in ("train bf16", "train fp32"):
        for batch in (2, 3):
            row = rows[job, batch]
            assert row["params"] > 0 and row["flops_per_sample"] > 0 and row["tflops"] >= 0
            assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and row["first_step_s"] > 0
            assert row["mfu"] is None and row["peak_mem_gb"] is None  # CPU: no known peak, no GPU memory
    assert rows["train bf16", 2]["flops_per_sample"] == rows["train fp32", 2]["flops_per_sample"]
    profile = rows["profile bf16", 2]
    assert len(profile["top"]) == 15 and all(k["ms_per_step"] > 0 and 0 < k["share"] <= 1 for k in profile["top"])
    assert 0 <= profile["copy_share"] < 1 and profile["eager_copies"]["params"] > 0  # autocast's weight casts
    for job, weights in (("sample fp32", "random"), ("sample bf16", "fed row's checkpoint (step 4)")):
        row = rows[job, 2]  # the fp32 row runs before the fed row has trained its checkpoint
        assert (row["forward_batch"], row["guidance"], row["weights"]) == (4, 1.8, weights)
        assert row["clips_per_s"] > 0 and row["ms_per_model_call"] > 0
    diff = rows["sample bf16", 2]["diff_vs_fp32"]
    assert 0 < diff["mean"] <= diff["q99"] <= diff["max"] < 2  # bf16 differs, and stays within the clip range
    for job in ("train.py fed", "torchrun fed (gloo)"):
        fed = rows[job, 2]
        assert fed["config"] == "configs/smoke.toml" and fed["num_workers"] == 1 and fed["steps"] > 0
        assert fed["samples_per_s"] > 0 and 0 <= fed["data_wait"] <= 1 and fed["tflops"] >= 0 and fed["mfu"] is None
    assert "evdm GPU check on CPU (--smoke)" in r["stdout"] and "|bf16-fp32|" in r["stdout"]
    assert "profile: the top kernels" in r["stdout"]


def test_report_renders_gpu_check_and_marks_missing_results(smoke, tmp_path):
    (tmp_path / "gpu_check.json").write_text((smoke["folder"] / "gpu_check.json").read_text())
    # A train_step result as written before the command and the loader-fed rows were recorded.
    (tmp_path / "train_step.json").write_text(json.dumps({
        "device": "CPU test", "torch": "0.0", "threads": 1, "steps": 2, "warmup": 1,
        "rows": [{"config": "smoke", "variant": v, "batch": 8, "params": 1000, "steps": 2, "first_step_s": 1.0,
                  "step_ms": ms, "step_ms_min": ms, "samples_per_s": 8000 / ms, "status": "ok"}
                 for v, ms in (("eager", 400.0), ("channels_last", 200.0))],
    }))
    text = report.render(tmp_path)
    assert text.count("Not run yet") == 5  # loader, preprocess, sample, reliability, compile time
    assert "| config | variant | batch | params | step ms | samples/s | x eager |" in text
    assert "| smoke | channels_last | 8 | 0.00M | 200.0 | 40 | 2.00x |" in text
    assert "python bench/train_step.py --configs smoke --variants eager,channels_last --steps 2 --warmup 1" in text
    assert "predates the loader-fed rows" in text
    assert smoke["command"] in text and "| row | batch | ms | per s | MFU |" in text
    assert "| train bf16 | 2 |" in text and "| train.py fed | 2 |" in text


def test_reliability_bench_smoke(tmp_path):
    """bench/reliability.py end to end with tiny settings: real fast-forward and verify_shards rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "reliability.json"
    proc = subprocess.run([sys.executable, "bench/reliability.py", "--clips", "200", "--verify-clips", "40",
                           "--shard-size", "10", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["clips"], r["shards"], r["verify_clips"], r["verify_shards"]) == (200, 20, 40, 4)
    assert [(x["workers"], x["start_batch"], x["clip_refs"]) for x in r["fast_forward_rows"]] == [(0, 24, 192), (2, 24, 192)]
    # fast_forward_s is a difference of two timings, rounded to ms: 0.0 on a quiet machine.
    assert all(x["first_batch_s"] > 0 and x["fast_forward_s"] >= 0 and x["refs_per_s"] > 0 for x in r["fast_forward_rows"])
    assert [(x["workers"], x["verify_shards"]) for x in r["verify_rows"]] == [(0, False), (0, True), (2, False), (2, True)]
    assert all(x["clips_per_s"] > 0 and (x["mb_hashed"] > 0) == x["verify_shards"] for x in r["verify_rows"])


def _load_recipes():
    sys.path.insert(0, str(ROOT / "bench"))  # bench scripts import their neighbours (results_io)
    spec = importlib.util.spec_from_file_location("bench_recipes", ROOT / "bench" / "recipes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_grids():
    """One-at-a-time: the base, then every single change from it; full: every combination, once; base:
    the base alone. --set changes name the run folder too."""
    recipes = _load_recipes()
    base = {"prediction": "x0", "residual": "blend", "schedule": "cosine"}
    oat = recipes.recipes("one-at-a-time", base)
    assert oat[0] == base and len(oat) == 1 + 2 + 1 + 1
    assert all(sum(r[a] != base[a] for a in base) == 1 for r in oat[1:])
    assert len({recipes.name_of(r) for r in oat}) == len(oat)
    full = recipes.recipes("full", base)
    assert len(full) == 12 and len({recipes.name_of(r) for r in full}) == 12 and base in full
    assert recipes.recipes("base", base) == [base]
    changes = recipes.parse_changes(['model.direct_input="blend"', "sample.eta=0.5"])
    assert changes == {"model.direct_input": '"blend"', "sample.eta": "0.5"}
    assert recipes.name_of(base, changes) == "x0-blend-cosine-direct_input=blend-eta=0.5"
    assert recipes.split_axes({"diffusion.schedule": '"linear"', **changes}) == ({"schedule": "linear"}, changes)
    with pytest.raises(SystemExit, match="section.key=value"):
        recipes.parse_changes(["eta"])


def test_recipe_table_reads_each_recipe_row_and_guidance():
    """The markdown table of one motion: the best baselines, a header, then one row per recipe whose
    cells are that recipe's numbers (PSNR / SSIM / HF ratio) for each row and guidance, and the margins
    of the summary row and of the sampled row."""
    recipes = _load_recipes()

    def record(recipe, psnr, changes):
        def at(g):
            best = {"best_baseline_psnr": {"method": "linear blend", "psnr": 30.0},
                    "best_baseline_ssim": {"method": "copy nearest context", "ssim": 0.85}}
            return {"summary": {"model": "model ddim-1", **best, "model_minus_best_baseline_db": psnr + g - 30.0,
                                "model_minus_best_baseline_ssim": 0.05,
                                "sampled": {"model": "model ddim-10", "model_minus_best_baseline_db": psnr + g - 31.0,
                                            "model_minus_best_baseline_ssim": 0.04}},
                    "rows": {"linear blend": [30.0, 0.8, 0.6], "model ddim-10": [psnr - 1 + g, 0.89, 0.95],
                             "model ddim-1": [psnr + g, 0.9, 0.7]}}
        return {"recipe": recipe, "changes": changes, "guidance": {"1.0": at(0.0), "1.8": at(0.5)}}

    grid = recipes.recipes("one-at-a-time", {"prediction": "x0", "residual": "blend", "schedule": "cosine"})
    records = [record(r, 31.0 + i, {}) for i, r in enumerate(grid)]
    records.append(record(grid[0], 40.0, {"model.direct_input": '"blend"'}))
    text = recipes.table(records)
    best, _, *lines = text.splitlines()
    assert best == "best baseline: 30.00 dB (linear blend), SSIM 0.8500 (copy nearest context)"
    assert len(lines) == 2 + len(records)
    assert lines[0] == ("| prediction | residual | schedule | changes | linear blend | ddim-10 g1.0 | ddim-1 g1.0 "
                        "| ddim-10 g1.8 | ddim-1 g1.8 | margin (model ddim-1 g1.0) | margin (model ddim-10 g1.0) |")
    i = grid.index({"prediction": "eps", "residual": "blend", "schedule": "cosine"})
    eps_row = next(line for line in lines if line.startswith("| eps | blend | cosine |"))
    cells = [c.strip() for c in eps_row.strip("|").split("|")]
    assert cells[3:] == ["-", "30.00 / 0.8000 / 0.60", f"{30.0 + i:.2f} / 0.8900 / 0.95", f"{31.0 + i:.2f} / 0.9000 / 0.70",
                         f"{30.5 + i:.2f} / 0.8900 / 0.95", f"{31.5 + i:.2f} / 0.9000 / 0.70",
                         f"{1.0 + i:+.2f} dB / +0.0500", f"{i:+.2f} dB / +0.0400"]
    assert lines[-1].startswith('| x0 | blend | cosine | model.direct_input="blend" | 30.00 / 0.8000 / 0.60 | 39.00')
