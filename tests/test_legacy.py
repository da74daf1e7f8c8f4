"""Files written by earlier evdm versions, read by today's code through evdm.legacy (the one gate).

The files are real: tests/fixtures/old/COMMIT/ holds what the code of COMMIT wrote (its README gives
the commands), one folder per era of formats.
"""

import filecmp
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli, set_args
from evdm import legacy, sample_io
from evdm.checkpoint import config_of, load_checkpoint
from evdm.config import ConfigError, Context, load_config
from evdm.denoiser import Denoiser

OLD = ROOT / "tests" / "fixtures" / "old"
SHARDS = OLD / "fb4df0c" / "shards"  # both checkpoints were trained and sampled on these


@pytest.mark.parametrize("commit", ["fb4df0c", "25c5f3f"])
def test_an_old_checkpoint_samples_what_its_own_code_sampled(commit, tmp_path):
    """The Conv3d space-time weights load into today's per-frame form, the stored config is upgraded,
    and sample.py's clips are those the old sample.py wrote, byte for byte."""
    den = Denoiser.load(OLD / commit / "run" / "last.pt", torch.device("cpu"))
    jobs = sample_io.shard_jobs(str(SHARDS / "val-*.tar"), den.cfg, 2)
    written = sample_io.sample_to_files(jobs, 2, den, den.cfg, tmp_path, seed=0, batch_size=2)
    expected = sorted((OLD / commit / "samples").glob("*.npy"))
    assert len(written) == len(expected) == 2
    for path in expected:
        assert np.array_equal(np.load(tmp_path / path.name), np.load(path)), path.name


def test_stored_configs_of_each_era_are_upgraded():
    raw = {commit: torch.load(OLD / commit / "run" / "last.pt", weights_only=True) for commit in ("25c5f3f", "fb4df0c")}
    # What the files really hold: the old keys and the Conv3d kernels.
    assert {"amp", "amp_dtype", "compile_on_cpu", "vis_every", "channels_last"} <= set(raw["25c5f3f"]["config"]["train"])
    assert raw["25c5f3f"]["config"]["train"]["compile"] is True
    assert "dynamic_threshold_percentile" in raw["25c5f3f"]["config"]["sample"]
    assert raw["fb4df0c"]["config"]["model"]["spacetime"] == "3d" and "direct_input" not in raw["fb4df0c"]["config"]["model"]
    assert raw["fb4df0c"]["config"]["data"]["context_start"] == 1 and "stream" not in raw["fb4df0c"]
    assert raw["25c5f3f"]["model"]["encoder.stem.weight"].ndim == 5
    era1, era2 = (load_checkpoint(OLD / commit / "run" / "last.pt") for commit in ("25c5f3f", "fb4df0c"))
    for ckpt in (era1, era2):
        assert config_of(ckpt).model.direct_input == "none"  # legacy.ADDED: the model it was, not today's default
        assert ckpt["stream"]["world_size"] is None and ckpt["stream"]["batch_size"] == 2  # before the record
    cfg1, cfg2 = config_of(era1), config_of(era2)
    assert cfg1.train.compile == "auto" and cfg1.train.precision == "auto" and cfg1.sample.dynamic_threshold == 0.0
    assert cfg1.context == Context(1, 1) and cfg2.context == Context(1, 2)
    # The values a rule maps that these files do not hold.
    assert legacy.upgrade_config({"train": {"compile": False}, "sample": {"dynamic_threshold": True}}) == {
        "train": {"compile": "off"}, "sample": {"dynamic_threshold": 0.995}}


@pytest.mark.parametrize("commit, first_old_key", [("25c5f3f", "train.amp is gone; use train.precision"),
                                                     ("fb4df0c", "data.context_start is gone; use data.context")])
def test_an_old_config_file_is_refused_naming_the_replacement(commit, first_old_key):
    with pytest.raises(ConfigError, match=re.escape(first_old_key)):
        load_config(OLD / commit / "run" / "config.toml")


def test_a_run_of_an_earlier_version_resumes(tmp_path):
    """fb4df0c's run (no stream record, Conv3d weights and AdamW state) goes on from its step 4 under
    today's train.py, with one warning line for what the old record cannot tell."""
    shutil.copytree(OLD / "fb4df0c" / "run", tmp_path / "run")
    config = tmp_path / "today.toml"
    config.write_text((ROOT / "configs" / "smoke.toml").read_text())
    overrides = [f"data.train_shards={SHARDS}/train-*.tar", f"data.val_shards={SHARDS}/val-*.tar", "data.size=16",
                 "data.T=6", "data.context=[1, 2]", "data.shuffle_buffer=8", "data.val_clips=2", "model.base_channels=4",
                 "model.attn_head_channels=4", 'model.direct_input="none"', "diffusion.timesteps=100",
                 'diffusion.prediction="eps"', 'diffusion.residual="none"', 'diffusion.schedule="linear"',
                 f"train.out_dir={tmp_path / 'run'}", "train.batch_size=2", "train.max_steps=6", "train.log_every=2",
                 "train.val_every=2", "train.ckpt_every=2", "train.preview_every=100", "sample.steps=4"]
    proc = run_cli(["train.py", str(config), "--resume", *set_args(overrides)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "predates the record of world size and shard list" in proc.stderr
    resumed = load_checkpoint(tmp_path / "run" / "last.pt")
    assert resumed["step"] == 6 and resumed["stream"]["world_size"] == 1
    assert all(p.ndim == 4 for k, p in resumed["model"].items() if k.endswith("temporal.weight"))


def test_a_shard_folder_of_an_earlier_version_resumes(tmp_path):
    """fb4df0c's preprocess wrote progress.json before --fps, --ext, split lists and the limits existed:
    the same command today resumes it, keeping every shard byte for byte."""
    shutil.copytree(OLD / "fb4df0c" / "videos", tmp_path / "videos")
    shutil.copytree(SHARDS, tmp_path / "shards")
    proc = run_cli(["-m", "preprocess.shard", str(tmp_path / "videos"), str(tmp_path / "shards"), "--size", "16",
                    "--T", "6", "--shard-size", "4", "--workers", "1"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == sorted(p.name for p in SHARDS.glob("*.tar"))
    for shard in SHARDS.glob("*.tar"):
        assert filecmp.cmp(shard, tmp_path / "shards" / shard.name, shallow=False), shard.name
