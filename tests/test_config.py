"""Config: TOML -> dataclass -> dict round trips, overrides, and errors that name the key and file."""

import re
from pathlib import Path

import pytest
import tomli

from evdm.config import ConfigError, Context, RunConfig, from_dict, load_config, to_dict, to_toml, with_sample

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert from_dict(tomli.loads(to_toml(cfg))) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_reference_defaults():
    d = RunConfig()
    assert (d.data.size, d.data.T, d.data.context, d.data.frame_stride, d.data.color_mode) == (64, 8, (2, 2), 1, "rgb")
    assert (d.model.base_channels, d.model.channel_mults, d.model.res_blocks) == (96, (1, 2, 4), 2)
    assert d.model.temporal_attn_levels == (1, 2)
    assert (d.diffusion.cfg_drop_prob, d.diffusion.temporal_loss_weight, d.diffusion.noise_offset) == (0.08, 0.05, 0.0)
    assert (d.train.lr, d.sample.steps, d.sample.eta) == (1e-4, 40, 0.0)
    assert d.sample.dynamic_threshold == 0.0
    assert load_config(Path(__file__).parent.parent / "configs" / "bair.toml").model == d.model


def test_defaults_are_the_shipped_recipe():
    """A minimal config trains the recipe docs/RECIPES.md measured best, as every shipped config does."""
    d = RunConfig()
    recipe = (d.diffusion.prediction, d.diffusion.residual, d.diffusion.schedule, d.model.direct_input,
              d.sample.guidance_scale)
    assert recipe == ("x0", "blend", "linear", "both", 1.0)
    for path in CONFIGS:
        cfg = load_config(path)
        shipped = (cfg.diffusion.prediction, cfg.diffusion.residual, cfg.diffusion.schedule, cfg.model.direct_input)
        assert shipped == recipe[:4], path.name


def test_context_is_one_key_with_one_shorthand(tmp_path):
    assert from_dict({"data": {"context": [1, 2]}}).data.context == Context(1, 2)
    assert from_dict({"data": {"endpoint_context": 3, "T": 8}}).data.context == Context(3, 3)
    assert RunConfig().middle_frames == 4 and from_dict({"data": {"context": [1, 2]}}).middle_frames == 5
    with pytest.raises(ConfigError, match="data.context and data.endpoint_context"):
        from_dict({"data": {"context": [1, 2], "endpoint_context": 2}})
    with pytest.raises(ConfigError, match=re.escape("data.context_start is gone; use data.context = [start, end]")):
        from_dict({"data": {"context_start": 1, "context_end": 2}})
    smoke = Path(__file__).parent.parent / "configs" / "smoke.toml"  # it says context = [2, 2]
    assert load_config(smoke, ["data.endpoint_context=1"]).data.context == Context(1, 1)  # the override wins
    assert load_config(smoke, ["data.context=[1, 3]"]).data.context == Context(1, 3)


def test_layout_keys_are_retired(tmp_path):
    for section, key, value in (("model", "spacetime", '"3d"'), ("train", "channels_last", "true")):
        path = tmp_path / "old.toml"
        path.write_text(f"[{section}]\n{key} = {value}\n")
        with pytest.raises(ConfigError, match=f"{section}.{key} is gone; remove it"):
            load_config(path)


def test_with_sample_overrides_what_is_given_and_checks_it():
    cfg = with_sample(RunConfig(), steps=10, eta=None)
    assert cfg.sample.steps == 10 and cfg.sample.eta == RunConfig().sample.eta
    with pytest.raises(ConfigError, match="sample.steps must be <= diffusion.timesteps"):
        with_sample(cfg, steps=2000)


def test_overrides_are_parsed_as_toml(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "model.channel_mults=[1, 2]", "model.temporal_attn_levels=[1]",
                             "train.out_dir=runs/x", "data.hflip=true"])
    assert cfg.train.lr == 3e-4 and cfg.model.channel_mults == (1, 2)
    assert cfg.train.out_dir == "runs/x" and cfg.data.hflip is True


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[data]\nT = 4\nendpoint_context = 2\n", "T=4, context=[2, 2]"),
        ("[data]\nT = 5\ncontext = [1, 4]\n", "T=5, context=[1, 4]"),
        ("[data]\ncontext = [0, 2]\n", "data.context[0] must be >= 1"),
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


# One bad value per family of ranges: (override, the key named, the range named).
OUT_OF_RANGE = [
    # > 0
    ("train.lr=-1e-3", "train.lr", "> 0"), ("train.lr=0.0", "train.lr", "> 0"),
    ("train.grad_clip=0.0", "train.grad_clip", "> 0"),
    # [0, 1): decays, probabilities, betas, dropout
    ("train.ema_decay=2.0", "train.ema_decay", "[0, 1)"), ("train.ema_decay=1.0", "train.ema_decay", "[0, 1)"),
    ("train.ema_decay=-0.1", "train.ema_decay", "[0, 1)"),
    ("diffusion.cfg_drop_prob=1.0", "diffusion.cfg_drop_prob", "[0, 1)"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas[1]", "[0, 1)"),
    ("train.adam_betas=[-0.1, 0.99]", "train.adam_betas[0]", "[0, 1)"),
    ("model.dropout=1.0", "model.dropout", "[0, 1)"),
    # [0, 1]
    ("train.lr_min_ratio=1.5", "train.lr_min_ratio", "[0, 1]"),
    ("sample.dynamic_threshold=-0.5", "sample.dynamic_threshold", "[0, 1]"),
    ("sample.dynamic_threshold=1.01", "sample.dynamic_threshold", "[0, 1]"),
    # >= 0
    ("train.weight_decay=-1e-4", "train.weight_decay", ">= 0"),
    ("diffusion.noise_offset=-0.1", "diffusion.noise_offset", ">= 0"),
    ("diffusion.noise_offset=nan", "diffusion.noise_offset", ">= 0"),
    ("diffusion.temporal_loss_weight=-1.0", "diffusion.temporal_loss_weight", ">= 0"),
    ("sample.eta=-0.5", "sample.eta", ">= 0"), ("sample.guidance_scale=-1.0", "sample.guidance_scale", ">= 0"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"), ("data.shuffle_buffer=-1", "data.shuffle_buffer", ">= 0"),
    ("train.lr_warmup_steps=-1", "train.lr_warmup_steps", ">= 0"),
    # >= 1: counts and cadences
    ("train.log_every=0", "train.log_every", ">= 1"), ("train.val_every=0", "train.val_every", ">= 1"),
    ("train.ckpt_every=0", "train.ckpt_every", ">= 1"), ("train.snapshot_every=0", "train.snapshot_every", ">= 1"),
    ("train.preview_every=0", "train.preview_every", ">= 1"), ("train.preview_clips=0", "train.preview_clips", ">= 1"),
    ("train.preview_steps=0", "train.preview_steps", ">= 1"), ("data.val_clips=0", "data.val_clips", ">= 1"),
    ("model.attn_head_channels=0", "model.attn_head_channels", ">= 1"),
    ("model.channel_mults=[1, 0]", "model.channel_mults[1]", ">= 1"),
    ("diffusion.timesteps=0", "diffusion.timesteps", ">= 1"), ("train.batch_size=0", "train.batch_size", ">= 1"),
]


@pytest.mark.parametrize("override, key, allowed", OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_values_name_key_range_and_file(tmp_path, override, key, allowed):
    path = tmp_path / "run.toml"
    path.write_text((Path(__file__).parent.parent / "configs" / "smoke.toml").read_text())
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    message = str(info.value)
    assert message.startswith(f"{path}: {key} must") and allowed in message and "\n" not in message


@pytest.mark.parametrize("override", [
    "train.ema_decay=0.0", "train.lr_min_ratio=1.0", "train.lr_min_ratio=0.0", "sample.guidance_scale=0.0",
    "sample.dynamic_threshold=1.0", "data.num_workers=0", "train.adam_betas=[0.0, 0.999]",
])
def test_range_edges_that_are_allowed(override):
    load_config(Path(__file__).parent.parent / "configs" / "smoke.toml", [override])


def test_a_config_path_that_is_not_a_readable_toml_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a TOML config file"):
        load_config(tmp_path)
    binary = tmp_path / "weights.toml"
    binary.write_bytes(b"\x80\x02\xff\xfe")
    with pytest.raises(ConfigError, match=f"{binary}: not a text"):
        load_config(binary)


@pytest.mark.parametrize("key, value, replacement", [
    ("amp", "true", "train.precision"), ("amp_dtype", '"fp16"', "train.precision"),
    ("amp_on_cpu", "true", 'train.precision = "bf16"'), ("compile_on_cpu", "true", 'train.compile = "on"'),
    ("vis_every", "5", "train.preview_every"),
])
def test_retired_train_keys_name_their_replacement(tmp_path, key, value, replacement):
    path = tmp_path / "old.toml"
    path.write_text(f"[train]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"old.toml: train.{key} is gone; use {replacement}")):
        load_config(path)


def test_a_bool_compile_is_refused_in_a_file(tmp_path):
    """train.compile was a bool ("compile on CUDA"); stored configs of that time: tests/test_legacy.py."""
    path = tmp_path / "old.toml"
    path.write_text("[train]\ncompile = true\n")
    with pytest.raises(ConfigError, match=re.escape('train.compile is now one of "auto" | "on" | "off", not a bool; True was \'auto\'')):
        load_config(path)
    assert load_config(None, ["train.precision=fp16", "train.compile=off"]).train.precision == "fp16"


def test_dynamic_threshold_is_one_typed_key():
    """One float (the percentile, 0 = off); an old bool is refused in a file, the old percentile key names
    its replacement (stored configs: tests/test_legacy.py)."""
    assert from_dict({"sample": {"dynamic_threshold": 0.99}}).sample.dynamic_threshold == 0.99
    with pytest.raises(ConfigError, match="sample.dynamic_threshold is now one of a percentile"):
        from_dict({"sample": {"dynamic_threshold": True}})
    with pytest.raises(ConfigError, match="dynamic_threshold_percentile is gone; use sample.dynamic_threshold"):
        from_dict({"sample": {"dynamic_threshold_percentile": 0.99}})


def test_guidance_max_t_is_a_fraction_of_the_timesteps():
    assert from_dict({"sample": {"guidance_max_t": 0.7}}).sample.guidance_max_t == 0.7
    assert RunConfig().sample.guidance_max_t == 1.0  # every step, as guidance always was
    with pytest.raises(ConfigError, match=r"sample.guidance_max_t must be in \[0, 1\], got 1.5"):
        from_dict({"sample": {"guidance_max_t": 1.5}})
