"""demo.py end to end at a tiny size: every stage is a library call (no argv strings), and its outputs
and closing line are what the README promises."""

import json
import re
import signal

import pytest
import torch

import demo
from conftest import signal_during_step
from evdm.config import load_config, to_toml


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
    line = next(x for x in last if x.startswith("evdm demo (orbit) finished"))
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
    monkeypatch.setattr(demo, "make_shards", lambda out, motion: shard_dir)
    signal_during_step(monkeypatch, 3, signal.SIGTERM)
    out = tmp_path / "demo"

    assert demo.main([str(out)]) == 0

    assert torch.load(out / "run" / "last.pt", weights_only=True)["step"] == 3
    assert not (out / "eval.json").exists() and not (out / "samples").exists()
    printed = capsys.readouterr().out
    assert "=== evaluate" not in printed and "finished" not in printed
    assert f"python train.py {out / 'run' / 'config.toml'} --resume" in printed
    assert f"python demo.py {out}" in printed and (out / "run" / "config.toml").is_file()
