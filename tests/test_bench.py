"""The five bench scripts run end to end with tiny settings (JSON to tmp paths), and bench/report.py renders results.

Structure and positivity only: never a timing or a ratio between timings.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def run_bench(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the machine may be busy: one thread avoids oversubscription
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


@pytest.fixture(scope="module")
def loader_result(results_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("bench-loader")
    run_bench("loader.py", "--videos", "8", "--seconds", "0.2", "--shard-size", "4", "--work", str(work),
              "--out", str(results_dir / "loader.json"))
    return json.loads((results_dir / "loader.json").read_text())


@pytest.fixture(scope="module")
def preprocess_result(results_dir) -> dict:
    run_bench("preprocess.py", "--videos", "4", "--workers", "1", "--out", str(results_dir / "preprocess.json"))
    return json.loads((results_dir / "preprocess.json").read_text())


@pytest.fixture(scope="module")
def train_step_result(results_dir) -> dict:
    run_bench("train_step.py", "--configs", "smoke", "--variants", "eager", "--steps", "1", "--warmup", "0",
              "--batch", "2", "--loader-steps", "2", "--device", "cpu", "--out", str(results_dir / "train_step.json"))
    return json.loads((results_dir / "train_step.json").read_text())


@pytest.fixture(scope="module")
def sample_result(results_dir) -> dict:
    run_bench("sample.py", "--steps", "2", "--batch_sizes", "1", "--guidance", "1.0", "--repeats", "1",
              "--device", "cpu", "--out", str(results_dir / "sample.json"))
    return json.loads((results_dir / "sample.json").read_text())


@pytest.fixture(scope="module")
def reliability_result(results_dir) -> dict:
    run_bench("reliability.py", "--clips", "200", "--verify-clips", "40", "--shard-size", "10",
              "--out", str(results_dir / "reliability.json"))
    return json.loads((results_dir / "reliability.json").read_text())


def test_reliability_bench(reliability_result):
    r = reliability_result
    assert (r["clips"], r["shards"], r["verify_clips"], r["verify_shards"]) == (200, 20, 40, 4)
    assert [(x["workers"], x["start_batch"], x["clip_refs"]) for x in r["fast_forward_rows"]] == [(0, 24, 192), (2, 24, 192)]
    assert all(x["first_batch_s"] > 0 and x["fast_forward_s"] > 0 and x["refs_per_s"] > 0 for x in r["fast_forward_rows"])
    assert [(x["workers"], x["verify_shards"]) for x in r["verify_rows"]] == [(0, False), (0, True), (2, False), (2, True)]
    assert all(x["clips_per_s"] > 0 and (x["mb_hashed"] > 0) == x["verify_shards"] for x in r["verify_rows"])


def test_loader_bench(loader_result):
    r = loader_result
    assert r["videos"] == 8 and r["clips"] > 0 and r["shards"] > 1 and r["command"].startswith("python bench/loader.py")
    by_kind = {}
    for row in r["rows"]:
        by_kind.setdefault(row["loader"].split(" ")[0], []).append(row["workers"])
        assert row["clips"] > 0 and row["clips_per_s"] > 0 and row["mb_per_s"] > 0 and row["cpu_us_per_clip"] > 0
        assert row["x_baseline"] > 0 and row["of_ceiling"] >= 0  # rounded: the baseline can show 0.0
    assert by_kind["baseline"] == ["0", "2"] and by_kind["evdm"] == ["0", "2"] and by_kind["ceiling"] == ["-"]
    assert {"x_baseline_at_2_workers", "of_ceiling_at_2_workers"} <= set(r["goals"])


def test_preprocess_bench(preprocess_result):
    r = preprocess_result
    assert r["videos"] == 4 and r["identical_shards_across_rows"] and r["cpu_count"] > 0
    assert "ffmpeg" in [row["decoder"] for row in r["rows"]]
    for row in r["rows"]:
        assert row["workers"] == 1 and row["videos"] == 4 and row["clips"] > 0
        assert row["videos_per_s"] > 0 and row["clips_per_s"] > 0 and row["wall_s"] > 0 and 0 < row["decode_share"] <= 1


def test_train_step_bench_with_loader_rows(train_step_result):
    r = train_step_result
    assert r["loader_steps"] == 2 and r["cpu_count"] > 0
    [row] = r["rows"]
    assert (row["config"], row["variant"], row["batch"], row["status"]) == ("smoke", "eager", 2, "ok")
    assert row["params"] > 0 and row["step_ms"] > 0 and row["samples_per_s"] > 0
    assert [row["num_workers"] for row in r["loader_rows"]] == [0, 2]
    for row in r["loader_rows"]:
        assert row["status"] == "ok", row["status"]
        assert row["config"] == "smoke" and row["batch"] == 2 and row["steps"] == 2
        assert row["variant"] == "channels_last"  # smoke.toml on CPU: channels_last, no compile, no autocast
        assert row["step_ms"] > 0 and row["samples_per_s"] > 0 and 0 <= row["data_wait"] <= 1


def test_sample_bench(sample_result):
    r = sample_result
    assert r["config"] == "configs/smoke.toml" and r["repeats"] == 1
    [row] = r["rows"]
    assert (row["steps"], row["batch"], row["guidance"], row["forward_batch"]) == (2, 1, 1.0, 1)
    assert row["seconds_per_call"] > 0 and row["clips_per_s"] > 0 and row["ms_per_model_call"] > 0


def test_report_renders_the_bench_outputs(results_dir, loader_result, preprocess_result, train_step_result,
                                          sample_result, reliability_result, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    assert report.main(["--results", str(results_dir), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Not run yet" not in text and "rebuilt from the stored parameters" not in text
    for header in ("| loader | workers | clips/s |", "| decoder | workers | videos/s |",
                   "| config | variant | batch | params |", "| config | variant | workers |",
                   "| steps | guidance | batch |", "| workers | start batch | clip refs |",
                   "| workers | verify_shards | first pass s |"):
        assert header in text
    for result in (loader_result, preprocess_result, train_step_result, sample_result, reliability_result):
        assert result["command"] in text


def test_report_marks_missing_results_and_rebuilds_old_commands(tmp_path):
    # A train_step result as written before the command and the loader-fed rows were recorded.
    (tmp_path / "train_step.json").write_text(json.dumps({
        "device": "CPU test", "torch": "0.0", "threads": 1, "steps": 2, "warmup": 1,
        "rows": [{"config": "smoke", "variant": v, "batch": 8, "params": 1000, "steps": 2, "first_step_s": 1.0,
                  "step_ms": ms, "step_ms_min": ms, "samples_per_s": 8000 / ms, "status": "ok"}
                 for v, ms in (("eager", 400.0), ("channels_last", 200.0))],
    }))
    text = report.render(tmp_path)
    assert text.count("Not run yet") == 4
    assert "| config | variant | batch | params | step ms | samples/s | x eager |" in text
    assert "| smoke | channels_last | 8 | 0.00M | 200.0 | 40 | 2.00x |" in text
    assert "python bench/train_step.py --configs smoke --variants eager,channels_last --steps 2 --warmup 1" in text
    assert "predates the loader-fed rows" in text
