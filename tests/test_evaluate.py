"""evaluate(): every row on tiny shards, the JSON, the CLI, and the best-of-N selection."""

import dataclasses
import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import K, SIZE, T, frame_at, make_checkpoint, write_shards, write_square_shards
from evdm import evaluate as ev
from evdm import visualize
from evdm.config import Context

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    shards = write_square_shards(d / "shards", T=T, size=SIZE, train_shards=0, val_shards=2, per_shard=3, seed=1,
                                 manifest=False)
    return make_checkpoint(d / "last.pt", train_steps=2), shards


def test_evaluate_end_to_end_writes_every_row(setup, tmp_path):
    ckpt, shards = setup
    out = tmp_path / "eval.json"
    rc = ev.main(["--ckpt", str(ckpt), "--shards", shards, "--num", "5", "--batch_size", "3", "--steps", "2", "3",
                  "--best_of", "2", "--device", "cpu", "--json", str(out), "--examples", str(tmp_path / "ex.png")])
    assert rc == 0
    result = json.loads(out.read_text())
    names = [r["method"] for r in result["rows"]]
    assert names == ["copy nearest context", "linear blend", "model ddim-2", "model ddim-3", "model ddim-3 best-of-2"]
    assert result["clips"] == 5 and result["M"] == T - 2 * K
    assert result["lpips"].startswith("skipped") or result["lpips"] == "alex"
    for r in result["rows"]:
        assert len(r["psnr_per_position"]) == T - 2 * K and len(r["ssim_per_position"]) == T - 2 * K
        assert 0 < r["psnr"] <= 100 and -1 <= r["ssim"] <= 1
        assert r["psnr"] == pytest.approx(np.mean(r["psnr_per_position"]), abs=1e-3)
        assert len(r["hf_ratio_per_position"]) == T - 2 * K and r["hf_ratio"] > 0
    rows = {r["method"]: r for r in result["rows"]}
    # candidate 0 of best-of-N is the single-sample row's own draw, so it can only be better
    assert rows["model ddim-3 best-of-2"]["psnr"] >= rows["model ddim-3"]["psnr"]
    s = result["summary"]
    assert s["model"] == "model ddim-3" and s["linear_blend_psnr"] == rows["linear blend"]["psnr"]
    assert s["sampled"]["model"] == "model ddim-3" and s["sampled"]["psnr"] == s["model_psnr"]
    assert s["model_minus_linear_blend_db"] == pytest.approx(s["model_psnr"] - s["linear_blend_psnr"], abs=1e-3)
    # The margin that counts is over the stronger baseline on each metric, whichever that is.
    for metric, key in (("psnr", "model_minus_best_baseline_db"), ("ssim", "model_minus_best_baseline_ssim")):
        best = max(rows["copy nearest context"][metric], rows["linear blend"][metric])
        assert s[f"best_baseline_{metric}"][metric] == best
        assert rows[s[f"best_baseline_{metric}"]["method"]][metric] == best
        assert s[key] == pytest.approx(rows["model ddim-3"][metric] - best, abs=1e-3)
    # The protocol is stated, and the comparable row is the best-of-N row in a published row's shape.
    p = result["protocol"]
    assert p["samples_per_clip"] == 2 and "best of 2" in p["selection"] and "generated frames only" in p["scored_frames"]
    assert f"{K} observed + {T - 2 * K} generated + {K} observed" in p["frames"] and "5 clips" in p["aggregation"]
    row = result["comparable_row"]
    assert row["context"] == [K, T - 2 * K, K] and row["samples_per_clip"] == 2 and row["clips"] == 5
    assert row["psnr"] == rows["model ddim-3 best-of-2"]["psnr"] and row["ssim"] == rows["model ddim-3 best-of-2"]["ssim"]


def test_residual_floor_is_applied_and_recorded(setup, tmp_path):
    """--residual_floor 255 leaves the blend everywhere: the model's rows score as the blend's; the JSON says so."""
    ckpt, shards = setup
    out = tmp_path / "eval.json"
    assert ev.main(["--ckpt", str(ckpt), "--shards", shards, "--num", "3", "--steps", "1", "--device", "cpu",
                    "--residual_floor", "255", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    for metric in ("psnr", "ssim"):
        assert rows["model ddim-1"][metric] == rows["linear blend"][metric]
    assert result["sample"]["residual_floor"] == 255
    assert "residual floor 255 gray levels" in result["protocol"]["sampler"]


def test_floors_rows_come_from_the_main_rows_samples(setup, tmp_path):
    """--floors 0 3 255 on a floor-0 checkpoint: floor 0 is the main row itself, 255 the blend, 3 between; the
    floor-3 row equals a whole evaluation at --residual_floor 3 (same seeds), so no row drew other samples."""
    ckpt, shards = setup
    common = dict(num=4, batch_size=2, steps_list=[1, 2], device="cpu", progress=False)
    result = ev.evaluate(ckpt, shards, floors=(0.0, 3.0, 255.0), **common)
    rows = {r["method"]: r for r in result["rows"]}
    assert [r["method"] for r in result["rows"]][-3:] == ["model ddim-2 floor 0", "model ddim-2 floor 3",
                                                          "model ddim-2 floor 255"]
    assert "model ddim-1 floor 0" not in rows  # only the main step count gets floor rows
    metrics = ("psnr", "ssim", "hf_ratio", "flicker")
    assert {m: rows["model ddim-2 floor 0"][m] for m in metrics} == {m: rows["model ddim-2"][m] for m in metrics}
    for m in metrics:  # the blend in [-1, 1], then to [0, 1]: the baseline's to float rounding
        assert rows["model ddim-2 floor 255"][m] == pytest.approx(rows["linear blend"][m], abs=2e-4)
    assert rows["model ddim-2 floor 3"]["psnr"] != rows["model ddim-2"]["psnr"]
    floored = {r["method"]: r for r in ev.evaluate(ckpt, shards, residual_floor=3.0, **common)["rows"]}
    assert {m: rows["model ddim-2 floor 3"][m] for m in metrics} == {m: floored["model ddim-2"][m] for m in metrics}
    # What the rows rely on: Denoiser.generate's floor is its last step, so applying it afterwards is the same.
    from evdm.denoiser import Denoiser
    from evdm.diffusion import floor_residual, linear_blend

    denoiser = Denoiser.load(ckpt, torch.device("cpu"))
    start, end = torch.rand(2, 2, 3, K, SIZE, SIZE).mul(2).sub(1).unbind(0)
    clip = lambda floor: denoiser.generate(  # noqa: E731
        start, end, dataclasses.replace(denoiser.cfg.sample, steps=2, residual_floor=floor),
        generator=torch.Generator().manual_seed(0))[:, :, K:-K]
    after = floor_residual(clip(0.0), linear_blend(start, end, T - 2 * K), 3.0)
    assert torch.equal(clip(3.0), after) and not torch.equal(clip(0.0), after)


def test_floors_must_not_be_negative(setup, capsys):
    ckpt, shards = setup
    with pytest.raises(SystemExit) as exc:
        ev.main(["--ckpt", str(ckpt), "--shards", shards, "--floors", "4", "-1"])
    assert exc.value.code == 2 and "--floors must be >= 0" in capsys.readouterr().err


def test_examples_show_the_worst_and_best_clip(setup, tmp_path):
    """The examples PNG holds six rows, worst (truth, model, blend) then best, and its truth rows are
    real shard clips; the tracker keeps the lowest and highest PSNR over batches."""
    from evdm import visualize
    from evdm.data.tar import iter_clips

    ckpt, shards = setup
    extremes = ev.Extremes()
    ev.evaluate(ckpt, shards, num=6, batch_size=3, steps_list=[2], device="cpu", progress=False, extremes=extremes)
    ev.write_examples(extremes, Context(K, K), tmp_path / "ex.png")
    img = np.asarray(Image.open(tmp_path / "ex.png"))
    scale = visualize.strip_scale(SIZE)
    truths = [np.array(c) for url in sorted(glob.glob(shards)) for _, c in iter_clips(url)]
    shown = [np.stack([frame_at(img, row, t, SIZE, SIZE, scale=scale) for t in range(T)]) for row in (0, 3)]
    assert all(any(np.array_equal(clip, truth) for truth in truths) for clip in shown)
    assert not np.array_equal(shown[0], shown[1])

    tracker = ev.Extremes()
    u8 = np.zeros((2, T, SIZE, SIZE, 3), np.uint8)
    unit = torch.zeros(2, 3, T, SIZE, SIZE)
    for psnr in ([20.0, 30.0], [25.0, 10.0], [40.0, 35.0]):
        tracker.update(torch.tensor(psnr), u8, unit, unit)
    assert (tracker.worst[0], tracker.best[0]) == (10.0, 40.0)


def test_main_steps_picks_the_summary_row(setup):
    """--main_steps makes a smaller step count the main row: scored last, it heads the summary, the
    best-of-N row and the comparable row; its numbers are the same row's as without it."""
    ckpt, shards = setup
    kw = dict(num=4, batch_size=2, device="cpu", seed=0, progress=False)
    plain = ev.evaluate(ckpt, shards, steps_list=[1, 3], **kw)
    main1 = ev.evaluate(ckpt, shards, steps_list=[3], main_steps=1, best_of=2, **kw)
    names = [r["method"] for r in main1["rows"]]
    assert names == ["copy nearest context", "linear blend", "model ddim-3", "model ddim-1", "model ddim-1 best-of-2"]
    assert plain["summary"]["model"] == "model ddim-3" and main1["summary"]["model"] == "model ddim-1"
    assert main1["main_steps"] == 1 and main1["comparable_row"]["method"] == "evdm model ddim-1 best-of-2"
    row = {r["method"]: r for r in plain["rows"]}["model ddim-1"]
    assert main1["summary"]["model_psnr"] == row["psnr"] and main1["summary"]["model_ssim"] == row["ssim"]
    # Beside it, the summary gives the row users see: sample.steps (3 in the tiny config), scored even
    # when not asked for, with its own margins over the same best baselines.
    rows = {r["method"]: r for r in main1["rows"]}
    sampled, s = main1["summary"]["sampled"], main1["summary"]
    assert sampled["model"] == "model ddim-3" and sampled["psnr"] == rows["model ddim-3"]["psnr"]
    assert sampled["hf_ratio"] == rows["model ddim-3"]["hf_ratio"] and s["model_hf_ratio"] == rows["model ddim-1"]["hf_ratio"]
    assert sampled["model_minus_best_baseline_db"] == pytest.approx(
        sampled["psnr"] - s["best_baseline_psnr"]["psnr"], abs=1e-3)
    only1 = ev.evaluate(ckpt, shards, steps_list=[1], **kw)
    assert [r["method"] for r in only1["rows"]][2:] == ["model ddim-3", "model ddim-1"]
    assert "model ddim-1" in ev.margins_line(s) and "model ddim-3" in ev.margins_line(s)
    assert "DDIM 1 steps" in main1["protocol"]["sampler"]


def test_linear_middle_makes_the_blend_baseline_win(tmp_path, setup):
    """Shards whose middles are exact linear blends of the inner context frames: blend PSNR is near perfect."""
    ckpt, _ = setup
    rng = np.random.default_rng(3)
    w = np.array([(j - (K - 1)) / ((T - K) - (K - 1)) for j in range(K, T - K)])
    clips = []
    for i in range(3):
        clip = rng.integers(0, 256, (T, SIZE, SIZE, 3)).astype(np.float64)
        clip[K : T - K] = (1 - w)[:, None, None, None] * clip[K - 1] + w[:, None, None, None] * clip[T - K]
        clips.append(np.round(clip).astype(np.uint8))
    write_shards(tmp_path / "s", {"val": [clips]}, manifest=False)
    result = ev.evaluate(ckpt, str(tmp_path / "s" / "val-*.tar"), num=3, batch_size=2, steps_list=[2],
                         guidance_scale=1.0, device="cpu", seed=0, best_of=1, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["linear blend"]["psnr"] > 50  # only uint8 rounding separates it from the truth
    assert rows["linear blend"]["ssim"] > 0.999
    assert rows["copy nearest context"]["psnr"] < 30
    assert rows["model ddim-2"]["psnr"] < rows["linear blend"]["psnr"]  # a barely trained model adds noise to it


def test_best_of_picks_the_highest_psnr_per_clip():
    a = {"psnr": torch.tensor([[10.0, 10.0], [30.0, 30.0]]), "ssim": torch.tensor([[0.1, 0.1], [0.9, 0.9]])}
    b = {"psnr": torch.tensor([[20.0, 20.0], [5.0, 5.0]]), "ssim": torch.tensor([[0.2, 0.2], [0.5, 0.5]])}
    best = ev._best_of([a, b])
    assert best["psnr"].tolist() == [[20.0, 20.0], [30.0, 30.0]]
    assert torch.allclose(best["ssim"], torch.tensor([[0.2, 0.2], [0.9, 0.9]]))


def test_lpips_is_never_downloaded():
    fn, status = ev.load_lpips(torch.device("cpu"))
    assert (fn is None) == status.startswith("skipped")


def test_cli_errors_are_one_line(setup, tmp_path):
    _, shards = setup
    proc = subprocess.run([sys.executable, "-m", "evdm.evaluate", "--ckpt", str(tmp_path / "nope.pt"),
                           "--shards", shards, "--num", "2", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope.pt: checkpoint not found" in proc.stderr


def test_step_counts_below_one_are_refused(setup, capsys):
    """--steps and --main_steps of 0 are usage errors (exit 2, naming the flags), before any work."""
    ckpt, shards = setup
    for flags in (["--steps", "0"], ["--steps", "2", "--main_steps", "0"]):
        with pytest.raises(SystemExit) as exc:
            ev.main(["--ckpt", str(ckpt), "--shards", shards, "--device", "cpu", *flags])
        assert exc.value.code == 2 and "--main_steps must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--examples"])
@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_output_paths_are_checked_before_the_evaluation(setup, tmp_path, capsys, flag, where):
    """A path that cannot be written is one line and exit 2 before any clip is scored (no table, no
    progress): not a traceback after hours of --best_of 100."""
    ckpt, shards = setup
    (tmp_path / "a_file").write_text("taken")
    path = tmp_path if where == "a folder" else tmp_path / "a_file" / "out.x"
    rc = ev.main(["--ckpt", str(ckpt), "--shards", shards, "--num", "2", "--steps", "1", "--device", "cpu",
                  flag, str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith(f"error: {flag} {path} ")
    assert ("is a folder" if where == "a folder" else f"{tmp_path / 'a_file'} is not a folder") in err
    assert (tmp_path / "a_file").read_text() == "taken"


def test_a_full_disk_on_the_examples_keeps_the_scores(setup, tmp_path, monkeypatch, capsys):
    """The JSON is written before the examples PNG: a disk that fills up on the picture leaves the scores."""
    from evdm.atomic import DiskFullError

    def full(img, path):
        raise DiskFullError(Path(path), 0)

    monkeypatch.setattr(visualize, "save_png", full)
    ckpt, shards = setup
    out, png = tmp_path / "eval.json", tmp_path / "examples.png"
    rc = ev.main(["--ckpt", str(ckpt), "--shards", shards, "--num", "2", "--steps", "1", "--device", "cpu",
                  "--json", str(out), "--examples", str(png)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"{png}: no space left" in err, err
    assert json.loads(out.read_text())["clips"] == 2 and not png.exists()
