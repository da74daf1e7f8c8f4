"""Config: TOML -> dataclass -> dict round trips, overrides, and errors that name the key and file."""

from pathlib import Path

import pytest
import tomli

from evdm.config import ConfigError, RunConfig, from_dict, load_config, to_dict, to_toml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert from_dict(tomli.loads(to_toml(cfg))) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_reference_defaults():
    d = RunConfig()
    assert (d.data.size, d.data.T, d.data.endpoint_context, d.data.frame_stride, d.data.color_mode) == (64, 8, 2, 1, "rgb")
    assert (d.model.base_channels, d.model.channel_mults, d.model.res_blocks) == (96, (1, 2, 4), 2)
    assert d.model.temporal_attn_levels == (1, 2)
    assert (d.diffusion.cfg_drop_prob, d.diffusion.temporal_loss_weight, d.diffusion.noise_offset) == (0.08, 0.05, 0.0)
    assert (d.train.lr, d.sample.steps, d.sample.eta, d.sample.guidance_scale) == (1e-4, 40, 0.0, 1.8)
    assert d.sample.dynamic_threshold is False
    assert load_config(Path(__file__).parent.parent / "configs" / "bair.toml").model == d.model


def test_overrides_are_parsed_as_toml(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.channel_mults=[1, 2]", "model.temporal_attn_levels=[1]",
                             "train.out_dir=runs/x", "data.hflip=true"])
    assert cfg.train.lr == 3e-4 and cfg.model.channel_mults == (1, 2)
    assert cfg.train.out_dir == "runs/x" and cfg.data.hflip is True


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[data]\nT = 4\nendpoint_context = 2\n", "T=4, endpoint_context=2"),
        ("[data]\nfoo = 1\n", "unknown key data.foo"),
        ("[nope]\nx = 1\n", "unknown section [nope]"),
        ('[train]\nlr = "fast"\n', "train.lr: expected float"),
        ("[train]\nbatch_size = 1.5\n", "train.batch_size: expected int"),
        ('[data]\ncolor_mode = "cmyk"\n', "data.color_mode must be one of"),
        ("[data]\nsize = 30\n", "data.size=30 must be divisible"),
        ("[model]\ntemporal_attn_levels = [5]\n", "model.temporal_attn_levels [5] out of range"),
        ("[data\n", "invalid TOML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, toml, needle):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=1"])
