"""One-file, atomic checkpoints of tensors and primitives only (`torch.load(weights_only=True)` reads them).
Layout: {"format": 1, "step", "config" (plain dict), "model", "ema", "optimizer", "scaler", "rng", "stream", "best"}
("stream": what the data stream depended on, evdm.data.resume; "best": the trainer's lowest validation loss
yet, evdm.train.loop.Best; both None outside the trainer)."""

import zipfile
from pathlib import Path

import torch

from evdm import legacy
from evdm.atomic import atomic_write
from evdm.config import ConfigError, RunConfig, from_dict, to_dict

FORMAT = 1


class CheckpointError(RuntimeError):
    """A missing, corrupt or incompatible checkpoint; the message names the file."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write `payload` to `path` atomically (temporary name, fsync, rename): a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)

    atomic_write(path, write, fsync=True)


def make_payload(*, step: int, cfg: RunConfig, model: torch.nn.Module, ema: torch.nn.Module | None,
                 optimizer: torch.optim.Optimizer | None = None, scaler: torch.amp.GradScaler | None = None,
                 stream: dict | None = None, best: dict | None = None) -> dict:
    """Everything needed to resume; `model`/`ema` must be the unwrapped (uncompiled, non-DDP) modules."""
    state = lambda obj: None if obj is None else obj.state_dict()  # noqa: E731
    return {"step": step, "config": to_dict(cfg), "model": model.state_dict(), "ema": state(ema),
            "optimizer": state(optimizer), "scaler": state(scaler), "rng": rng_state(), "stream": stream, "best": best}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read and sanity-check a checkpoint, upgraded to today's form (evdm.legacy); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if problem := _zip_problem(path):
        raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/foreign files
        raise CheckpointError(_unreadable(path, err)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an evdm checkpoint (format {FORMAT} expected)")
    for key in ("step", "config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return legacy.upgrade_checkpoint(ckpt)


def _zip_problem(path: Path) -> str | None:
    """What is wrong with the zip archive torch.save wrote, by each member's CRC-32 (torch.load checks
    none: a flipped bit would load as a wrong weight); None when intact or not a zip."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"unreadable zip archive: {err}"
    return None if bad is None else f"CRC mismatch in {bad}: bit rot or an incomplete copy"


def _unreadable(path: Path, err: Exception) -> str:
    """One line on why torch.load failed: a foreign file (by its first bytes), or a damaged checkpoint."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..); the legacy format is a pickle (protocol 2+: 0x80).
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        return f"{path}: not a PyTorch/evdm checkpoint file (neither a zip archive nor a pickle; it starts {head!r})"
    first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{path}: damaged or unreadable PyTorch checkpoint ({type(err).__name__}: {first})"


def load_weights(module: torch.nn.Module, state: dict, path: str | Path) -> None:
    """module.load_state_dict(state) (upgraded by evdm.legacy), or one CheckpointError line when names or
    shapes differ (torch's own message lists every differing tensor: hundreds of lines for one width)."""
    expected = module.state_dict()
    state = legacy.upgrade_weights(state, expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        first = (missing or unexpected or reshaped)[0]
        raise CheckpointError(f"{path}: weights do not fit the model built from the config: {len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(reshaped)} of another shape (first: {first})")
    module.load_state_dict(state)


def config_of(ckpt: dict, path: str | Path = "<checkpoint>") -> RunConfig:
    try:
        return from_dict(ckpt["config"], f"{path} (stored config)")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
