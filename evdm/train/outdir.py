"""out_dir protection: one live run per folder, no fresh run over a checkpoint, resume only into the same
model from an intact checkpoint. Every check reads only, so a refused command leaves out_dir as it was."""

import contextlib
import shutil
from pathlib import Path

from evdm.checkpoint import CheckpointError, config_of, load_checkpoint
from evdm.cli import warn
from evdm.config import ConfigError, RunConfig, to_dict
from evdm.lock import lock_folder

# The keys that decide the weights' shapes or what they mean: a resume must not change them.
MODEL_KEYS = ("data.T", "data.size", "data.context", "data.color_mode", "model.*",
              "diffusion.prediction", "diffusion.residual", "diffusion.timesteps", "diffusion.schedule")
# Written by a run; removed before a fresh run (--overwrite, or an old run that left no checkpoint).
RUN_FILES = (*(f"{name}{tmp}" for name in ("last.pt", "best.pt", "step_*.pt") for tmp in ("", ".tmp")), "metrics.jsonl",
             "loss.png", "config.toml")
RUN_FOLDERS = ("previews", "tensorboard")


def model_key_differences(stored_cfg: RunConfig, cfg: RunConfig) -> list[str]:
    """'section.key (checkpoint A, config B)' for each MODEL_KEYS entry where the stored config and `cfg` differ."""
    stored, current = to_dict(stored_cfg), to_dict(cfg)
    differences = []
    for spec in MODEL_KEYS:
        section, key = spec.split(".")
        old, new = stored.get(section, {}), current[section]
        for name in sorted(set(new) | set(old)) if key == "*" else [key]:
            if old.get(name) != new.get(name):
                differences.append(f"{section}.{name} (checkpoint {old.get(name)!r}, config {new.get(name)!r})")
    return differences


def check_out_dir(cfg: RunConfig, *, resume: bool, overwrite: bool, loud: bool = True) -> dict | None:
    """Refuse what would lose or mix up a run; returns the checkpoint to resume from (on the CPU) or None.
    ConfigError: a fresh run over a checkpoint, out_dir not a folder, --resume without a checkpoint;
    CheckpointError: no intact checkpoint, model keys that differ. loud: warn of a fallback from last.pt."""
    out_dir = Path(cfg.train.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir {out_dir} exists and is not a folder")
    if not resume:
        found = sorted(p for pattern in ("last.pt", "step_*.pt") for p in out_dir.glob(pattern))
        if found and not overwrite:
            raise ConfigError(f"train.out_dir {out_dir} already holds a run ({', '.join(p.name for p in found)}): "
                              f"pass --resume to continue it, --overwrite to start over, or choose another out_dir")
        return None
    ckpt_path = out_dir / "last.pt"
    if not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = intact_checkpoint(ckpt_path, loud=loud)
    if differences := model_key_differences(config_of(ckpt, ckpt_path), cfg):
        raise CheckpointError(f"{ckpt_path}: --resume with a different model: {'; '.join(differences)}; "
                              f"use the checkpoint's values or another out_dir")
    return ckpt


def intact_checkpoint(last: Path, *, loud: bool = True) -> dict:
    """`last` (out_dir/last.pt) loaded on the CPU; when it is damaged (bit rot, a copy cut short), the newest
    intact step_*.pt beside it, with one warning line naming both. CheckpointError when none is intact."""
    try:
        return load_checkpoint(last, map_location="cpu")
    except CheckpointError as damage:
        for snapshot in sorted(last.parent.glob("step_*.pt"), reverse=True):  # zero-padded: newest first
            with contextlib.suppress(CheckpointError):
                ckpt = load_checkpoint(snapshot, map_location="cpu")
                if loud:
                    warn(f"{damage}; resuming from {snapshot} (step {ckpt['step']}) instead")
                return ckpt
        raise CheckpointError(f"{damage}; no intact step_*.pt beside it to resume from either") from None


def clear_run(out_dir: Path) -> None:
    """Remove a previous run's checkpoints, metrics, previews and TensorBoard logs (other files in out_dir stay)."""
    for pattern in RUN_FILES:
        for path in out_dir.glob(pattern):
            path.unlink()
    for folder in RUN_FOLDERS:
        shutil.rmtree(out_dir / folder, ignore_errors=True)


def lock_out_dir(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Hold out_dir/.lock while inside (evdm.lock): a live run there or an unwritable out_dir is a ConfigError."""
    return lock_folder(out_dir, "train.out_dir", ConfigError)
