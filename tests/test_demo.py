"""demo.py end to end at a tiny size: every stage is a library call (no argv strings), and its outputs
and closing line are what the README promises."""

import json
import re
import signal
import subprocess

import numpy as np

import pytest
import torch

import demo
import demo_upsample
from conftest import signal_during_step
from evdm.config import load_config, to_toml
from evdm.ffmpeg import ffmpeg_exe


@pytest.mark.timeout(300)
def test_demo_runs_every_stage_and_reports_both_margins(tmp_path, monkeypatch, capsys):
    # The demo's own config with a tiny budget: the model and recipe stay demo.toml's.
    cfg = load_config(demo.CONFIG, ["data.size=16", "train.max_steps=3", "train.lr_warmup_steps=1",
                                    "train.val_every=3", "train.ckpt_every=3", "train.preview_every=3",
                                    "train.log_every=1", "data.val_clips=4", "train.preview_clips=2",
                                    "train.preview_steps=2", "sample.steps=2", "data.shuffle_buffer=10"])
    config = tmp_path / "demo_tiny.toml"
    config.write_text(to_toml(cfg))
    monkeypatch.setattr(demo, "CONFIG", str(config))
    monkeypatch.setattr(demo, "VIDEOS", 8)
    monkeypatch.setattr(demo, "SIZE", 16)
    monkeypatch.setattr(demo, "EVAL_STEPS", [2])
    monkeypatch.setattr(demo, "SAMPLE_CLIPS", 2)
    out = tmp_path / "demo"

    assert demo.main([str(out), "--motion", "orbit"]) == 0

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["clip_shape"] == [8, 16, 16, 3]
    assert (out / "run" / "last.pt").is_file() and (out / "run" / "previews").is_dir()
    result = json.loads((out / "eval.json").read_text())
    assert result["clips"] == manifest["splits"]["val"]["clips"]  # every val clip
    assert [r["method"] for r in result["rows"]][-2:] == ["model ddim-2", "model ddim-1"]  # main row last
    assert len([p for p in (out / "samples").glob("*.mp4") if not p.stem.endswith("_truth")]) == 2
    last = capsys.readouterr().out.strip().splitlines()
    line = last[next(i for i, x in enumerate(last) if x.startswith("evdm demo (clip, orbit) finished")) + 1]
    s = result["summary"]
    assert f"margin {s['sampled']['model_minus_best_baseline_db']:+.2f} dB" in line
    assert f"margin {s['model_minus_best_baseline_db']:+.2f} dB" in line
    assert re.search(r"=== train: done in \d+ s \(CPU \d+ s\)", "\n".join(last))


def test_a_stop_during_the_training_ends_the_demo_after_the_save(shard_dir, tmp_path, monkeypatch, capsys):
    """SIGTERM during the training: last.pt is saved at the stop step and the demo ends there (exit 0, as
    train.py's), saying how to go on; no evaluation of the cut-short model, no samples."""
    cfg = load_config(demo.CONFIG, ["data.size=16", "data.num_workers=0", "train.max_steps=1000", "train.batch_size=2",
                                    "train.preview_every=1000", "data.val_clips=4"])
    config = tmp_path / "demo_tiny.toml"
    config.write_text(to_toml(cfg))
    monkeypatch.setattr(demo, "CONFIG", str(config))
    monkeypatch.setattr(demo, "make_shards", lambda out, motion, T: shard_dir)
    signal_during_step(monkeypatch, 3, signal.SIGTERM)
    out = tmp_path / "demo"

    assert demo.main([str(out)]) == 0

    assert torch.load(out / "run" / "last.pt", weights_only=True)["step"] == 3
    assert not (out / "eval.json").exists() and not (out / "samples").exists()
    printed = capsys.readouterr().out
    assert "=== evaluate" not in printed and "finished" not in printed
    assert f"python train.py {out / 'run' / 'config.toml'} --resume" in printed
    assert f"python demo.py {out}" in printed and (out / "run" / "config.toml").is_file()


@pytest.mark.timeout(300)
def test_the_upsample_demo_scores_every_method_on_whole_videos(tmp_path, monkeypatch, capsys):
    cfg = load_config(demo.UPSAMPLE_CONFIG, ["data.size=16", "train.max_steps=3", "train.lr_warmup_steps=1",
                                             "train.val_every=3", "train.ckpt_every=3", "train.preview_every=3",
                                             "data.val_clips=4", "train.preview_clips=2", "train.preview_steps=2",
                                             "sample.steps=2", "data.shuffle_buffer=10"])
    config = tmp_path / "upsample_tiny.toml"
    config.write_text(to_toml(cfg))
    for module, name, value in ((demo, "UPSAMPLE_CONFIG", str(config)), (demo, "VIDEOS", 8), (demo, "SIZE", 16),
                                (demo_upsample, "HELD_OUT_VIDEOS", 2), (demo_upsample, "INPUT_FRAMES", 3)):
        monkeypatch.setattr(module, name, value)
    out = tmp_path / "up"

    assert demo.main([str(out), "--task", "upsample"]) == 0

    assert json.loads((out / "shards" / "manifest.json").read_text())["clip_shape"] == [5, 16, 16, 3]
    result = json.loads((out / "upsample.json").read_text())
    assert result["checkpoint"] == str(out / "run" / "best.pt") and result["videos"] == 2
    names = list(result["rows"])
    assert names[:2] == ["linear blend", "ffmpeg minterpolate blend"] and "mci" in names[2]
    assert names[3] == "evdm (2 DDIM steps)" and len(result["minterpolate_grid"]) == 9  # blend + 8 mci at 16 px
    for row in result["rows"].values():
        assert 0 < row["psnr"] <= 100 and 0 < row["ssim"] <= 1 and row["flicker_boundary"] > 0
    grid = result["minterpolate_grid"]
    assert grid[names[2]]["psnr"] == max(r["psnr"] for n, r in grid.items() if "mci" in n)  # the best mci setting
    height, width = demo_upsample.LABEL_PX + 64, 5 * 64  # 5 panels of 16 px x 4
    raw = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(out / "upsample_side_by_side.mp4"), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert len(raw) == 2 * 9 * height * width * 3  # 2 videos of 9 frames
    assert "4x up-conversion of 2 held-out videos" in capsys.readouterr().out


def test_up_conversion_helpers_keep_the_input_frames():
    frames = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    blend, held = demo_upsample.blend_video(frames, 4), demo_upsample.held_video(frames, 4)
    assert blend.shape == held.shape == (9, 4, 4, 3)
    assert np.array_equal(blend[::4], frames) and np.array_equal(held[::4], frames)
    assert np.array_equal(held[1:4], frames[[0, 0, 0]])
    mid = np.rint((frames[0].astype(float) + frames[1]) / 2)  # numpy rounds half to even, as np.rint
    assert np.array_equal(blend[2], mid.astype(np.uint8))
    truth = blend.copy()
    assert demo_upsample.score(blend[None], truth[None], 4)["psnr"] == 100.0  # capped: identical


def test_window_pairs():
    # F = 3, N = 3: output 0 1 2 [3] 4 5 6; input frame 1 (output 3) is shared by the two windows.
    assert [demo_upsample.output_frames(F, 4) for F in (0, 1, 2, 5)] == [0, 1, 5, 17]
    assert demo_upsample.boundary_pairs(3, 3).tolist() == [False, False, True, True, False, False]
    assert demo_upsample.within_pairs(3, 3).tolist() == [False, True, False, False, True, False]
    assert not demo_upsample.within_pairs(4, 2).any()  # N = 2: every pair touches an input frame
