"""Typed, frozen run configuration loaded from TOML.

`load_config(path, overrides)` reads a TOML file, applies `--set section.key=value` overrides
(values parsed as TOML), rejects unknown keys and wrong types naming the key and the file, and
checks invariants (T > 2K, ...) once, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli


class ConfigError(ValueError):
    """A bad config value; the message names the key and the file."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_shards: str | list[str] = "shards/train-*.tar"  # glob, brace pattern, list or pipe: URL
    val_shards: str | list[str] = "shards/val-*.tar"
    size: int = 64
    T: int = 8
    endpoint_context: int = 2  # K: observed frames at each end (shorthand for both counts below)
    context_start: int = 0  # observed frames before the middle; 0: endpoint_context
    context_end: int = 0  # observed frames after the middle; 0: endpoint_context
    frame_stride: int = 1
    color_mode: str = "rgb"  # rgb | gray
    loader: str = "webdataset"  # webdataset | dali
    num_workers: int = 2
    shuffle_buffer: int = 1000
    val_clips: int = 64  # fixed val subset size
    hflip: bool = False  # random horizontal flip, applied on the training device
    verify_shards: bool = False  # check each shard's sha256 against manifest.json when a reader first opens it


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    base_channels: int = 96
    channel_mults: tuple[int, ...] = (1, 2, 4)
    res_blocks: int = 2
    temporal_attn_levels: tuple[int, ...] = (1, 2)  # indices into channel_mults; bottleneck always
    attn_head_channels: int = 32
    dropout: float = 0.0
    # How the (1,3,3) / (3,1,1) convolutions run: "2d" per-frame Conv2d over channels-last views
    # (cuDNN's fast bf16 path), or "3d" Conv3d (the original form). Same weights and maths.
    spacetime: str = "2d"
    # The endpoints fed to the stem as extra channels beside the noisy middle (models/unet3d.py):
    # none | blend | context | both ("both" won docs/RECIPES.md's issue-20 study). A checkpoint stored
    # without the key was a "none" model and is rebuilt as one (STORED_DEFAULTS).
    direct_input: str = "both"


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    prediction: str = "eps"  # eps | v | x0
    residual: str = "none"  # none | blend: diffuse middle - linear blend of the endpoints (diffusion/residual.py)
    temporal_loss_weight: float = 0.05
    noise_offset: float = 0.0
    cfg_drop_prob: float = 0.08


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out_dir: str = "runs/bair"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 8  # per rank, per micro-step
    grad_accum_steps: int = 1
    max_steps: int = 100_000
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | constant
    lr_warmup_steps: int = 1000
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp16 (with a GradScaler) | fp32
    compile: str = "auto"  # auto (torch.compile on CUDA) | on | off
    channels_last: bool = True
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay ramps as min(ema_decay, (1 + step) / (10 + step))
    log_every: int = 50
    val_every: int = 1000
    preview_every: int = 5000  # previews (PNG strips, MP4 when ffmpeg works) every N steps
    ckpt_every: int = 1000  # out_dir/last.pt
    snapshot_every: int = 10_000  # out_dir/step_XXXXXXX.pt
    preview_clips: int = 4
    preview_steps: int = 20
    peak_tflops: float = 0.0  # per-GPU bf16 dense peak for the mfu column; 0: known GPUs by name (train/mfu.py)
    tensorboard: bool = False  # also log metrics and preview strips to out_dir/tensorboard/ (pip install tensorboard)


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 40
    eta: float = 0.0
    guidance_scale: float = 1.8
    dynamic_threshold: float = 0.0  # Imagen's dynamic thresholding at this percentile (e.g. 0.995); 0: off
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32
    compile: str = "auto"  # auto (torch.compile on CUDA) | on | off


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def channels(self) -> int:
        return 1 if self.data.color_mode == "gray" else 3

    @property
    def context(self) -> tuple[int, int]:
        """(K_start, K_end): observed frames before and after the middle."""
        d = self.data
        return (d.context_start or d.endpoint_context, d.context_end or d.endpoint_context)

    @property
    def middle_frames(self) -> int:
        return self.data.T - sum(self.context)


_CHOICES = {
    ("data", "color_mode"): ("rgb", "gray"),
    ("data", "loader"): ("webdataset", "dali"),
    ("model", "spacetime"): ("2d", "3d"),
    ("model", "direct_input"): ("none", "blend", "context", "both"),
    ("diffusion", "schedule"): ("linear", "cosine"),
    ("diffusion", "prediction"): ("eps", "v", "x0"),
    ("diffusion", "residual"): ("none", "blend"),
    ("train", "lr_schedule"): ("cosine", "constant"),
    ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
    ("train", "compile"): ("auto", "on", "off"),
    ("sample", "sampler"): ("ddim", "ddpm"),
    ("sample", "precision"): ("auto", "bf16", "fp32"),
    ("sample", "compile"): ("auto", "on", "off"),
}

# Keys of earlier versions: refused in a config file with the replacement named, dropped from the
# configs stored in old checkpoints (they changed no weights).
RETIRED_KEYS = {
    ("train", "vis_every"): "train.preview_every (a step count)",
    ("train", "amp"): 'train.precision = "auto" | "bf16" | "fp16" | "fp32"',
    ("train", "amp_dtype"): 'train.precision = "auto" | "bf16" | "fp16" | "fp32"',
    ("train", "amp_on_cpu"): 'train.precision = "bf16" (auto is fp32 on CPU)',
    ("train", "compile_on_cpu"): 'train.compile = "on" (auto compiles on CUDA only)',
    ("sample", "dynamic_threshold_percentile"): "sample.dynamic_threshold (the percentile itself; 0 = off)",
}
# Keys that kept their name but changed type: an old value (a checkpoint's stored config) maps to the
# new one; in a config file it is refused naming the new values. train.compile was a bool meaning
# "compile on CUDA", which is "auto" now.
RETYPED_KEYS = {
    ("train", "compile"): ({True: "auto", False: "off"}, '"auto" | "on" | "off"'),
    ("sample", "dynamic_threshold"): ({True: 0.995, False: 0.0}, "a percentile in (0, 1], or 0 for off"),
}

# Keys added after checkpoints were written, with the value that rebuilds those checkpoints' models.
# A stored config (a checkpoint's) without the key gets this value, not the dataclass default: the
# default is what new runs should use, this is what old runs did.
STORED_DEFAULTS = {("model", "direct_input"): "none"}


def with_stored_defaults(raw: dict) -> dict:
    """A checkpoint's stored config dict with every missing STORED_DEFAULTS key filled in (a copy)."""
    out = {name: dict(section) if isinstance(section, dict) else section for name, section in raw.items()}
    for (section, key), value in STORED_DEFAULTS.items():
        if isinstance(out.setdefault(section, {}), dict):
            out[section].setdefault(key, value)
    return out


# Valid ranges, checked at load time: "> 0", ">= 1", "[0, 1)" (interval notation) ... Tuples are checked
# item by item. guidance_scale may be 0 (the unconditional model) or between 0 and 1 (weaker
# conditioning): w * cond + (1 - w) * null is defined for every w >= 0.
_RANGES = {
    "data.size": ">= 1", "data.T": ">= 1", "data.frame_stride": ">= 1", "data.num_workers": ">= 0",
    "data.context_start": ">= 0", "data.context_end": ">= 0",
    "data.shuffle_buffer": ">= 0", "data.val_clips": ">= 1",
    "model.base_channels": ">= 1", "model.channel_mults": ">= 1", "model.res_blocks": ">= 1",
    "model.attn_head_channels": ">= 1", "model.dropout": "[0, 1)",
    "diffusion.timesteps": ">= 1", "diffusion.temporal_loss_weight": ">= 0", "diffusion.noise_offset": ">= 0",
    "diffusion.cfg_drop_prob": "[0, 1)",
    "train.batch_size": ">= 1", "train.grad_accum_steps": ">= 1", "train.max_steps": ">= 1", "train.lr": "> 0",
    "train.lr_warmup_steps": ">= 0", "train.lr_min_ratio": "[0, 1]", "train.weight_decay": ">= 0",
    "train.adam_betas": "[0, 1)", "train.grad_clip": "> 0", "train.ema_decay": "[0, 1)", "train.log_every": ">= 1",
    "train.val_every": ">= 1", "train.preview_every": ">= 1", "train.ckpt_every": ">= 1",
    "train.snapshot_every": ">= 1", "train.preview_clips": ">= 1", "train.preview_steps": ">= 1", "train.peak_tflops": ">= 0",
    "sample.steps": ">= 1", "sample.eta": ">= 0", "sample.guidance_scale": ">= 0",
    "sample.dynamic_threshold": "[0, 1]",
}


def in_range(value: float, spec: str) -> bool:
    """`value` against a _RANGES spec: "> a", ">= a", or an interval "[a, b)" with [ ] closed, ( ) open."""
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    low, high = (float(x) for x in spec[1:-1].split(","))
    above = value >= low if spec[0] == "[" else value > low
    below = value <= high if spec[-1] == "]" else value < high
    return above and below  # NaN fails both


def check_ranges(cfg: RunConfig, source: str) -> None:
    """Raise ConfigError naming the key, the allowed range and `source` for the first value outside _RANGES."""
    for dotted, spec in _RANGES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        items = enumerate(value) if isinstance(value, tuple) else [(None, value)]
        for i, v in items:
            if not in_range(v, spec):
                where = dotted if i is None else f"{dotted}[{i}]"
                wanted = f"be {spec}" if spec[0] in "<>" else f"be in {spec}"
                raise ConfigError(f"{source}: {where} must {wanted}, got {v!r}")


def as_context(K: int | tuple[int, int]) -> tuple[int, int]:
    """(K_start, K_end) from one count for both ends or a pair."""
    return (K, K) if isinstance(K, int) else (int(K[0]), int(K[1]))


def check_context(T: int, K: int | tuple[int, int]) -> None:
    """Raise unless each context count is >= 1 and T > K_start + K_end: the middle holds a frame."""
    Ks, Ke = as_context(K)
    if min(Ks, Ke) < 1:
        raise ValueError(f"context counts must be >= 1, got start {Ks}, end {Ke}")
    if T <= Ks + Ke:
        detail = (f"T={T}, endpoint_context={Ks} (2K={2 * Ks})" if Ks == Ke
                  else f"T={T}, context_start={Ks}, context_end={Ke}")
        raise ValueError(f"T must be greater than the observed frames at both ends to leave a middle to "
                         f"generate: {detail}")


def check_model_shape(*, T: int, K: int | tuple[int, int], channel_mults: tuple[int, ...],
                      temporal_attn_levels: tuple[int, ...], size: int | None = None) -> None:
    """The one check that a U-Net can be built for these shapes (config load, build_model and the
    model's constructor all call it): a middle frame to generate (`check_context`), at least one
    level, attention levels that exist, and (when given) a frame size that every level halves evenly.
    Raises ValueError naming the keys and numbers."""
    try:
        check_context(T, K)
    except ValueError as err:
        raise ValueError(f"data.T / data.endpoint_context (context_start, context_end): {err}") from None
    if not channel_mults:
        raise ValueError("model.channel_mults must not be empty")
    bad_levels = [lv for lv in temporal_attn_levels if not 0 <= lv < len(channel_mults)]
    if bad_levels:
        raise ValueError(f"model.temporal_attn_levels {list(bad_levels)} out of range 0..{len(channel_mults) - 1}")
    factor = 2 ** (len(channel_mults) - 1)
    if size is not None and size % factor:
        raise ValueError(f"data.size={size} must be divisible by 2**(len(model.channel_mults)-1)={factor}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples where asked."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_types = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} items, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(raw: dict, source: str = "<dict>", *, drop_retired: bool = False) -> RunConfig:
    """Build a RunConfig from a nested dict; errors name `section.key` and `source`.

    drop_retired: ignore RETIRED_KEYS (a checkpoint's stored config) instead of refusing them.
    """
    sections = {}
    hints = typing.get_type_hints(RunConfig)
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(hints)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        cls = hints[name]
        field_types = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            if (name, key) in RETIRED_KEYS:
                if drop_retired:
                    continue
                raise ConfigError(f"{source}: {name}.{key} is gone; use {RETIRED_KEYS[name, key]}")
            if (name, key) in RETYPED_KEYS and isinstance(v, bool):
                old_to_new, values = RETYPED_KEYS[name, key]
                if not drop_retired:
                    raise ConfigError(f"{source}: {name}.{key} is now one of {values}, not a bool; "
                                      f"{v!r} was {old_to_new[v]!r}")
                v = old_to_new[v]
            if key not in field_types:
                raise ConfigError(
                    f"{source}: unknown key {name}.{key} (known: {', '.join(field_types)})"
                )
            kwargs[key] = _coerce(v, field_types[key], f"{source}: {name}.{key}")
        sections[name] = cls(**kwargs)
    cfg = RunConfig(**sections)
    validate(cfg, source)
    return cfg


def validate(cfg: RunConfig, source: str = "<config>") -> None:
    """Check value ranges and cross-field invariants once, at load time."""
    for (section, key), allowed in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {section}.{key} must be one of {allowed}, got {value!r}")
    d, m = cfg.data, cfg.model
    check_ranges(cfg, source)
    try:
        check_model_shape(T=d.T, K=cfg.context, channel_mults=m.channel_mults,
                          temporal_attn_levels=m.temporal_attn_levels, size=d.size)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    if cfg.sample.steps > cfg.diffusion.timesteps:
        raise ConfigError(f"{source}: sample.steps must be <= diffusion.timesteps")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as TOML, bare words as strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if len(path) != 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomli.loads(f"v = {raw}")["v"]
    except tomli.TOMLDecodeError:
        value = raw  # a bare string such as out_dir=runs/x
    return path, value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load TOML at `path` (None: defaults), apply `section.key=value` overrides, validate."""
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomli.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a folder, not a TOML config file") from None
        except OSError as err:
            raise ConfigError(f"{source}: cannot read the config file ({err.strerror or err})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not a text (TOML) file") from None
        except tomli.TOMLDecodeError as err:
            raise ConfigError(f"{source}: invalid TOML: {err}") from None
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})[key] = value
    return from_dict(raw, source)


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists), suitable for TOML and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()}
        for name in ("data", "model", "diffusion", "train", "sample")
    }


def to_toml(cfg: RunConfig) -> str:
    """Serialize to TOML text (flat sections of strings, numbers, bools and lists)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def add_speed_flags(parser) -> None:
    """--precision and --compile for sample.py and evdm.evaluate: per-run overrides of the
    checkpoint's sample.precision and sample.compile (torch-free, so --help stays instant)."""
    parser.add_argument("--precision", choices=_CHOICES["sample", "precision"],
                        help="model forward precision (default: the checkpoint's sample.precision; auto = bf16 on CUDA)")
    parser.add_argument("--compile", choices=_CHOICES["sample", "compile"],
                        help="torch.compile the model (default: the checkpoint's sample.compile; auto = on CUDA)")
