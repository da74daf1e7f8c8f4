"""Typed, frozen run configuration loaded from TOML (torch-free): `load_config(path, overrides)` refuses
unknown keys, wrong types, values outside a field's `Range` and broken invariants, naming the key and file."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import tomli

from evdm import legacy


class ConfigError(ValueError):
    """A bad config value; the message names the key and the file."""


class Context(NamedTuple):
    """Observed frames at each end of a clip (TOML: `context = [start, end]`, or `endpoint_context = K`)."""

    start: int
    end: int

    def middle_frames(self, T: int) -> int:
        return T - self.start - self.end

    def split(self, clip: Any, axis: int = 2) -> tuple[Any, Any, Any]:
        """(start frames, middle, end frames): views of a clip (tensor or array) along its time axis (2 for
        [B, C, T, H, W], 1 for [B, T, H, W, C], 0 for [T, H, W, C]). ValueError if no middle is left."""
        T = clip.shape[axis]
        if T <= self.start + self.end:
            raise ValueError(f"clip has T={T} frames, need T > {self.start} + {self.end} observed frames")
        at = lambda a, b: clip[(slice(None),) * axis + (slice(a, b),)]  # noqa: E731
        return at(0, self.start), at(self.start, T - self.end), at(T - self.end, T)


@dataclass(frozen=True)
class Range:
    """The valid values of a number: low <= v (low < v if low_open), v <= high (v < high if high_open)."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below  # NaN fails both

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE, NON_NEGATIVE, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
FRACTION, UNIT = Range(0, 1, high_open=True), Range(0, 1)


def ranged(default: Any, valid: Range) -> Any:
    """A dataclass field with a default and a valid range (checked item by item for tuples)."""
    return field(default=default, metadata={"range": valid})


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_shards: str | list[str] = "shards/train-*.tar"  # glob, brace pattern, list or pipe: URL
    val_shards: str | list[str] = "shards/val-*.tar"
    size: int = ranged(64, AT_LEAST_1)
    T: int = ranged(8, AT_LEAST_1)
    context: Context = ranged(Context(2, 2), AT_LEAST_1)  # observed frames (start, end)
    frame_stride: int = ranged(1, AT_LEAST_1)
    color_mode: Literal["rgb", "gray"] = "rgb"
    loader: Literal["webdataset", "dali"] = "webdataset"
    num_workers: int = ranged(2, NON_NEGATIVE)
    shuffle_buffer: int = ranged(1000, NON_NEGATIVE)
    val_clips: int = ranged(64, AT_LEAST_1)  # fixed val subset size
    hflip: bool = False  # random horizontal flip, applied on the training device
    time_reverse: bool = False  # play half the training clips backwards (the contexts trade places: start == end)
    verify_shards: bool = False  # check each shard's sha256 against manifest.json when a reader first opens it


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    base_channels: int = ranged(96, AT_LEAST_1)
    channel_mults: tuple[int, ...] = ranged((1, 2, 4), AT_LEAST_1)
    res_blocks: int = ranged(2, AT_LEAST_1)
    temporal_attn_levels: tuple[int, ...] = (1, 2)  # indices into channel_mults; bottleneck always
    attn_head_channels: int = ranged(32, AT_LEAST_1)
    dropout: float = ranged(0.0, FRACTION)
    # The endpoints fed to the stem beside the noisy middle (models/unet3d.py); "both": docs/RECIPES.md.
    direct_input: Literal["none", "blend", "context", "both"] = "both"


# The defaults are the recipe docs/RECIPES.md measured best; configs/*.toml spell them out.
@dataclass(frozen=True, kw_only=True)
class DiffusionConfig:
    timesteps: int = ranged(1000, AT_LEAST_1)
    schedule: Literal["linear", "cosine"] = "linear"
    prediction: Literal["eps", "v", "x0"] = "x0"
    residual: Literal["none", "blend"] = "blend"  # blend: diffuse middle - linear blend of the endpoints
    temporal_loss_weight: float = ranged(0.05, NON_NEGATIVE)
    noise_offset: float = ranged(0.0, NON_NEGATIVE)
    cfg_drop_prob: float = ranged(0.08, FRACTION)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out_dir: str = "runs/bair"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = ranged(8, AT_LEAST_1)  # per rank, per micro-step
    grad_accum_steps: int = ranged(1, AT_LEAST_1)
    max_steps: int = ranged(100_000, AT_LEAST_1)
    lr: float = ranged(1e-4, POSITIVE)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    lr_warmup_steps: int = ranged(1000, NON_NEGATIVE)
    lr_min_ratio: float = ranged(0.1, UNIT)
    weight_decay: float = ranged(0.0, NON_NEGATIVE)
    adam_betas: tuple[float, float] = ranged((0.9, 0.999), FRACTION)
    grad_clip: float = ranged(1.0, POSITIVE)
    max_nonfinite_steps: int = ranged(20, AT_LEAST_1)  # non-finite gradient steps in a row that stop the run
    # auto: bf16 autocast on CUDA, fp32 elsewhere; fp16 adds a GradScaler
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"  # auto: torch.compile on CUDA
    ema: bool = True
    ema_decay: float = ranged(0.9999, FRACTION)
    ema_warmup: bool = True  # decay ramps as min(ema_decay, (1 + step) / (10 + step))
    log_every: int = ranged(50, AT_LEAST_1)
    val_every: int = ranged(1000, AT_LEAST_1)
    preview_every: int = ranged(5000, AT_LEAST_1)  # previews (PNG strips, MP4 when ffmpeg works) every N steps
    ckpt_every: int = ranged(1000, AT_LEAST_1)  # out_dir/last.pt
    snapshot_every: int = ranged(10_000, AT_LEAST_1)  # out_dir/step_XXXXXXX.pt
    early_stop_patience: int = ranged(0, NON_NEGATIVE)  # stop after N validations without a new best.pt; 0: never
    preview_clips: int = ranged(4, AT_LEAST_1)
    preview_steps: int = ranged(20, AT_LEAST_1)
    peak_tflops: float = ranged(0.0, NON_NEGATIVE)  # per-GPU bf16 peak for the mfu column; 0: known GPUs by name
    tensorboard: bool = False  # also log metrics and preview strips to out_dir/tensorboard/ (pip install tensorboard)


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    sampler: Literal["ddim", "ddpm"] = "ddim"
    steps: int = ranged(40, AT_LEAST_1)
    eta: float = ranged(0.0, NON_NEGATIVE)
    guidance_scale: float = ranged(1.0, NON_NEGATIVE)  # 0: the unconditional model; (0, 1): weaker conditioning
    # Guide only at t <= guidance_max_t * (timesteps - 1) (Kynkaenniemi et al. 2024); 1.0: every step.
    guidance_max_t: float = ranged(1.0, UNIT)
    dynamic_threshold: float = ranged(0.0, UNIT)  # Imagen's dynamic thresholding at this percentile; 0: off
    residual_floor: float = ranged(0.0, NON_NEGATIVE)  # gray levels (of 255): diffusion.floor_residual; 0: off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: Literal["auto", "on", "off"] = "auto"  # auto: torch.compile on CUDA


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        for section in SECTIONS:
            check_ranges(section, getattr(self, section))
        check_shapes(self)

    @property
    def channels(self) -> int:
        return 1 if self.data.color_mode == "gray" else 3

    @property
    def context(self) -> Context:
        return self.data.context

    @property
    def middle_frames(self) -> int:
        return self.data.context.middle_frames(self.data.T)


SECTIONS = ("data", "model", "diffusion", "train", "sample")
CONTEXT_SPELLINGS = (("data", "context"), ("data", "endpoint_context"))


def check_ranges(section: str, values: Any) -> None:
    """ConfigError naming `section.key` and its range for the first value outside its field's Range."""
    for f in dataclasses.fields(values):
        valid = f.metadata.get("range")
        value = getattr(values, f.name)
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            if valid is not None and v not in valid:
                where = f"{section}.{f.name}" + ("" if i is None else f"[{i}]")
                raise ConfigError(f"{where} must be {valid}, got {v!r}")


def check_shapes(cfg: RunConfig) -> None:
    """The invariants between keys: a middle, attention levels that exist, sizes every level halves, steps."""
    d, m = cfg.data, cfg.model
    if cfg.middle_frames < 1:
        raise ConfigError(f"data.T must be greater than the observed frames at both ends to leave a middle to "
                          f"generate: T={d.T}, context={list(d.context)}")
    if d.time_reverse and d.context.start != d.context.end:
        raise ConfigError(f"data.time_reverse needs as many observed frames at each end (a clip played backwards "
                          f"trades its contexts), got context={list(d.context)}")
    if not m.channel_mults:
        raise ConfigError("model.channel_mults must not be empty")
    if bad_levels := [lv for lv in m.temporal_attn_levels if not 0 <= lv < len(m.channel_mults)]:
        raise ConfigError(f"model.temporal_attn_levels {bad_levels} out of range 0..{len(m.channel_mults) - 1}")
    factor = 2 ** (len(m.channel_mults) - 1)
    if d.size % factor:
        raise ConfigError(f"data.size={d.size} must be divisible by 2**(len(model.channel_mults)-1)={factor}")
    if cfg.sample.steps > cfg.diffusion.timesteps:
        raise ConfigError("sample.steps must be <= diffusion.timesteps")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; lists become tuples (and Contexts) where asked."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
    if origin in (tuple, list) or tp is Context:
        if not isinstance(value, list if origin is list else (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = (int, int) if tp is Context else typing.get_args(tp)
        item_types = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where}: expected {len(item_types)} items, got {value!r}")
        items = [_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
        return items if origin is list else Context(*items) if tp is Context else tuple(items)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    """Build a RunConfig from a nested dict; errors name `section.key` and `source` (old keys: evdm.legacy)."""
    hints = typing.get_type_hints(RunConfig)
    sections = {}
    for name, value in raw.items():
        if name not in hints:
            raise ConfigError(f"{source}: unknown section [{name}] (known: {', '.join(hints)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        try:
            legacy.refuse_old_keys(name, value)
            value = _context_shorthand(value) if name == "data" else value
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        field_types = typing.get_type_hints(hints[name], include_extras=False)
        if unknown := [key for key in value if key not in field_types]:
            raise ConfigError(f"{source}: unknown key {name}.{unknown[0]} (known: {', '.join(field_types)})")
        sections[name] = hints[name](**{key: _coerce(v, field_types[key], f"{source}: {name}.{key}")
                                         for key, v in value.items()})
    try:
        return RunConfig(**sections)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _context_shorthand(values: dict) -> dict:
    """data.context from its shorthand endpoint_context = K ([K, K])."""
    if "endpoint_context" not in values:
        return values
    if "context" in values:
        raise ValueError("data.context and data.endpoint_context (its shorthand) both given; keep one")
    values = dict(values)
    K = values.pop("endpoint_context")
    values["context"] = [K, K] if isinstance(K, int) and not isinstance(K, bool) else K
    return values


def with_sample(cfg: RunConfig, **values: Any) -> RunConfig:
    """cfg with [sample] values replaced where given (None: keep the config's); checked like a load."""
    given = {k: v for k, v in values.items() if v is not None}
    return dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **given)) if given else cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as TOML, bare words as strings."""
    dotted, _, raw = text.partition("=")
    path = dotted.strip().split(".")
    if "=" not in text or len(path) != 2:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomli.loads(f"v = {raw}")["v"]
    except tomli.TOMLDecodeError:
        value = raw  # a bare string such as out_dir=runs/x
    return path, value


def read_toml(path: str | Path) -> dict:
    """The TOML file at `path` as a dict; ConfigError naming the file for every way reading it fails."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            return tomli.load(f)
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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load TOML at `path` (None: defaults), apply `section.key=value` overrides, validate."""
    raw = read_toml(path) if path is not None else {}
    for text in overrides:
        (section, key), value = parse_override(text)
        values = raw.setdefault(section, {})
        if (section, key) in CONTEXT_SPELLINGS:  # an override of either spelling replaces the file's
            for spelling in CONTEXT_SPELLINGS:
                values.pop(spelling[1], None)
        values[key] = value
    return from_dict(raw, str(path) if path is not None else "<defaults>")


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict (tuples as lists), suitable for TOML and checkpoints."""
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (tuple, list)) else v  # noqa: E731
    return {name: {f.name: plain(getattr(getattr(cfg, name), f.name)) for f in dataclasses.fields(getattr(cfg, name))}
            for name in SECTIONS}


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

    return "\n".join(f"[{section}]\n" + "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())
                     for section, values in to_dict(cfg).items())
