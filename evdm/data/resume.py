"""Whether a resume can be exact: what the training stream depends on (`Stream`, stored in every checkpoint under
"stream"), compared on --resume. Other clips per step (batch_size x grad_accum_steps x world size) are refused:
the fast-forward would skip or repeat clips. Another shard list, split, data.num_workers or data.shuffle_buffer:
one warning each, the position (and the epoch column) kept (docs/RELIABILITY.md, "Resume and damaged data")."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from evdm.cli import warn
from evdm.config import ConfigError, RunConfig
from evdm.data.shardset import ShardSet


@dataclass(frozen=True)
class Stream:
    """What the training stream of a run depends on, and where it started (a new shard list restarts it)."""

    batch_size: int
    grad_accum_steps: int
    num_workers: int
    shuffle_buffer: int
    world_size: int | None  # None: unknown (a checkpoint written before the record: evdm.legacy)
    shard_list: str | None  # ShardSet.identity() of data.train_shards; None: unknown
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


def run_stream(ckpt: dict | None, cfg: RunConfig, train: ShardSet, world_size: int, path: Path, *,
               loud: bool = True) -> Stream:
    """The stream this run reads: a fresh run's, or the one a resume from `ckpt` (read from `path`) continues,
    with one warning line (when `loud`) per difference that costs exactness; ConfigError where the run
    would skip or repeat clips unseen."""
    now = Stream(batch_size=cfg.train.batch_size, grad_accum_steps=cfg.train.grad_accum_steps,
                 num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer, world_size=world_size,
                 shard_list=train.identity(), train_clips=train.clip_count())
    if ckpt is None:
        return now
    step = ckpt["step"]
    before, notes = _recorded(ckpt, now, path)
    if before.clips_per_step != now.clips_per_step:
        raise ConfigError(_refusal(before, now, step, path))
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
    """The checkpoint's Stream, with the world size and shard list taken as the current ones (and a note) if unknown."""
    before = Stream(**ckpt["stream"])
    if before.world_size is not None and before.shard_list is not None:
        return before, []
    before = dataclasses.replace(before, world_size=now.world_size, shard_list=now.shard_list,
                                 train_clips=now.train_clips, start_epoch=now.start_epoch)
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
