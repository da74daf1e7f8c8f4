"""out_dir protection: one live run per folder, no fresh run over a checkpoint, resume only into the same model
and only where it can be exact.

Every check reads only; the trainer writes config.toml (and clears an old run's files) after all of them
pass, so a refused command leaves out_dir exactly as it was.

Whether a resume can be exact: what the training stream depends on, recorded in each checkpoint and
compared on --resume.

The loader's stream is a pure function of the train shard list, data.num_workers, data.shuffle_buffer,
train.batch_size, grad_accum_steps and the world size (evdm.data.stream); a resume at step s fast-forwards
it by s x grad_accum_steps batches. What a difference costs decides what happens:
- clips per step (batch_size x grad_accum_steps x world size) differ: refused. The fast-forward would
  count batches of the new size, silently skipping or repeating clips, and max_steps would mean
  another number of epochs. Keeping the product (e.g. more grad_accum_steps on fewer GPUs) resumes.
- the shard list differs (re-sharded, another pattern): one warning; the stream starts over on the new
  list, and the epoch column continues from where it was (passes over the old list, then the new),
  so it never goes backwards.
- the same clips per step split differently, data.num_workers or data.shuffle_buffer: one warning each;
  the stream keeps its position (the epoch count is right) but is not the straight run's any more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from evdm.checkpoint import CheckpointError, config_of, load_checkpoint
from evdm.cli import warn
from evdm.config import ConfigError, RunConfig, to_dict
from evdm.data.shardset import ShardSet
from evdm.lock import lock_folder

# The keys that decide the weights' shapes or what they mean: a resume must not change them.
MODEL_KEYS = (
    "data.T", "data.size", "data.context", "data.color_mode", "model.*",
    "diffusion.prediction", "diffusion.residual", "diffusion.timesteps", "diffusion.schedule",
)
# Written by a run; removed before a fresh run (--overwrite, or an old run that left no checkpoint).
RUN_FILES = ("last.pt", "last.pt.tmp", "step_*.pt", "step_*.pt.tmp", "metrics.jsonl", "loss.png", "config.toml")
RUN_FOLDERS = ("previews", "tensorboard")


def check_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir {out_dir} exists and is not a folder")


def checkpoints_in(out_dir: Path) -> list[Path]:
    return sorted(p for pattern in ("last.pt", "step_*.pt") for p in out_dir.glob(pattern))


def model_key_differences(stored_cfg: RunConfig, cfg: RunConfig) -> list[str]:
    """'section.key (checkpoint A, config B)' for each MODEL_KEYS entry where the checkpoint's config
    (translated by evdm.legacy, defaults filled in for keys newer than it) and `cfg` differ."""
    stored, current = to_dict(stored_cfg), to_dict(cfg)
    keys = []
    for spec in MODEL_KEYS:
        section, key = spec.split(".")
        names = sorted(set(current[section]) | set(stored.get(section, {}))) if key == "*" else [key]
        keys += [(section, name) for name in names]
    return [
        f"{section}.{name} (checkpoint {stored.get(section, {}).get(name)!r}, config {current[section].get(name)!r})"
        for section, name in keys
        if stored.get(section, {}).get(name) != current[section].get(name)
    ]


def check_out_dir(cfg: RunConfig, *, resume: bool, overwrite: bool, loud: bool = True) -> dict | None:
    """Refuse what would lose or mix up a run; returns the checkpoint to resume from (on the CPU) or None.

    Reads only. Raises ConfigError (fresh run over a checkpoint, out_dir not a folder, --resume without
    a checkpoint) or CheckpointError (no intact checkpoint, model keys that differ from the config).
    loud: print the warning line of a fallback from a damaged last.pt (rank 0).
    """
    out_dir = Path(cfg.train.out_dir)
    check_folder(out_dir)
    if not resume:
        found = checkpoints_in(out_dir) if out_dir.is_dir() else []
        if found and not overwrite:
            raise ConfigError(
                f"train.out_dir {out_dir} already holds a run ({', '.join(p.name for p in found)}): pass --resume "
                f"to continue it, --overwrite to start over, or choose another out_dir"
            )
        return None
    ckpt_path = out_dir / "last.pt"
    if not ckpt_path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
    ckpt = intact_checkpoint(ckpt_path, loud=loud)
    differences = model_key_differences(config_of(ckpt, ckpt_path), cfg)
    if differences:
        raise CheckpointError(
            f"{ckpt_path}: --resume with a different model: {'; '.join(differences)}; "
            f"use the checkpoint's values or another out_dir"
        )
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
    """Hold out_dir/.lock while inside (evdm.lock): a second live run on out_dir, or an out_dir that cannot be
    created or written, is a ConfigError naming the holder or the reason."""
    return lock_folder(out_dir, "train.out_dir", ConfigError)


CKPT_KEY = "stream"  # the checkpoint entry holding Stream.as_dict()


@dataclass(frozen=True)
class Stream:
    """What the training stream of a run depends on, and where it started (a new shard list restarts it)."""

    batch_size: int
    grad_accum_steps: int
    num_workers: int
    shuffle_buffer: int
    world_size: int
    shard_list: str  # ShardSet.identity() of data.train_shards
    train_clips: int | None  # per manifest.json; None when unknown
    start_step: int = 0  # the step at which this stream was at its batch 0
    start_epoch: float | None = 0.0  # the epoch column at start_step; None when unknown

    @property
    def clips_per_step(self) -> int:
        return self.batch_size * self.grad_accum_steps * self.world_size

    def start_batch(self, step: int) -> int:
        """The batch of this rank's stream that step `step + 1` trains on first."""
        return (step - self.start_step) * self.grad_accum_steps

    def epoch_at(self, step: int) -> float | None:
        """Passes over the train clips after `step` steps (the metrics' epoch column); None when unknown."""
        if self.train_clips is None or self.start_epoch is None:
            return None
        return self.start_epoch + (step - self.start_step) * self.clips_per_step / self.train_clips

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def split(self) -> str:
        return f"{self.batch_size} x {self.grad_accum_steps} x {self.world_size}"


def current_stream(cfg: RunConfig, train: ShardSet, world_size: int) -> Stream:
    """The stream a fresh run of `cfg` on the `train` shards and `world_size` ranks reads."""
    return Stream(batch_size=cfg.train.batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                  num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, world_size=world_size,
                  shard_list=train.identity(), train_clips=train.clip_count())


def run_stream(ckpt: dict | None, cfg: RunConfig, train: ShardSet, world_size: int, path: Path, *,
               loud: bool = True) -> Stream:
    """The stream this run reads: a fresh run's, or the one a resume from `ckpt` (read from `path`) continues,
    with one warning line (when `loud`) per difference that costs exactness; CheckpointError where the run
    would skip or repeat clips unseen (module docstring)."""
    now = current_stream(cfg, train, world_size)
    if ckpt is None:
        return now
    step = ckpt["step"]
    before, notes = _recorded(ckpt, now, path)
    if before.clips_per_step != now.clips_per_step:
        raise CheckpointError(_refusal(before, now, step, path))
    if before.shard_list != now.shard_list:
        resumed = dataclasses.replace(now, start_step=step, start_epoch=before.epoch_at(step))
        epoch = "unknown" if resumed.start_epoch is None else f"{resumed.start_epoch:.4g}"
        clips = " -> ".join("unknown" if n is None else str(n) for n in (before.train_clips, now.train_clips))
        notes.append(f"data.train_shards: the shard list differs from the one {path} was trained on "
                     f"({clips} clips per manifest.json): the stream starts over on the new list, and the "
                     f"epoch column goes on from {epoch}")
    else:
        resumed = dataclasses.replace(now, start_step=before.start_step, start_epoch=before.start_epoch)
        notes += _order_changes(before, now)
    for note in notes if loud else ():
        warn(f"--resume: {note}")
    return resumed


def _recorded(ckpt: dict, now: Stream, path: Path) -> tuple[Stream, list[str]]:
    """The checkpoint's Stream, and a note when it predates the record (then rebuilt from its config,
    with the world size and shard list taken to be the current ones)."""
    if ckpt.get(CKPT_KEY) is not None:
        return Stream(**ckpt[CKPT_KEY]), []
    stored = config_of(ckpt, path)
    before = dataclasses.replace(now, batch_size=stored.train.batch_size,
                                 grad_accum_steps=stored.train.grad_accum_steps,
                                 num_workers=stored.data.num_workers, shuffle_buffer=stored.data.shuffle_buffer)
    return before, [f"{path} predates the record of world size and shard list: a change of either goes unnoticed"]


def _refusal(before: Stream, now: Stream, step: int, path: Path) -> str:
    fix = "keep the product"
    per_rank_batches = now.batch_size * now.world_size
    if before.clips_per_step % per_rank_batches == 0:
        fix += f" (e.g. --set train.grad_accum_steps={before.clips_per_step // per_rank_batches})"
    return (f"{path}: --resume would train on {now.clips_per_step} clip(s) per step (train.batch_size x "
            f"grad_accum_steps x world size = {now.split()}), the checkpoint on {before.clips_per_step} "
            f"({before.split()}): reaching step {step} the loader would skip or repeat "
            f"{step * abs(now.clips_per_step - before.clips_per_step)} clips, and train.max_steps would mean "
            f"another number of epochs; {fix}, or start over (--overwrite or another out_dir)")


def _order_changes(before: Stream, now: Stream) -> list[str]:
    """Notes on what changes the clip order but not the position in the stream."""
    notes = []
    if before.split() != now.split():
        notes.append(f"train.batch_size x grad_accum_steps x world size {before.split()} -> {now.split()}: "
                     f"still {now.clips_per_step} clips per step, split differently; not bit-identical "
                     f"to a straight run")
    if before.num_workers != now.num_workers:
        notes.append(f"data.num_workers {before.num_workers} -> {now.num_workers}: the shards are dealt to other "
                     f"readers, so the pass in progress goes on in another order (some of its clips come "
                     f"again, others wait for the next pass); not bit-identical to a straight run")
    if before.shuffle_buffer != now.shuffle_buffer:
        notes.append(f"data.shuffle_buffer {before.shuffle_buffer} -> {now.shuffle_buffer}: clips are drawn in "
                     f"another order from here on (near the resume point some come twice, others wait for "
                     f"the next pass); not bit-identical to a straight run")
    return notes
