"""The shard plan and its resumable execution, shared by preprocess.shard (MP4s) and preprocess.bair.

Plan first, then work: a seeded permutation deals each split's items (videos, or BAIR records)
into fixed groups, one group per shard, so a shard is an independent unit. Each shard's clips are
shuffled with a seed of their own and written atomically; its completion (clip count, sha256) is
recorded in SHARD_DIR/progress.json (preprocess.state). A rerun with the same identity keeps every
recorded shard whose file still has its sha256 and redoes the rest; the manifest is written last.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from evdm.atomic import TMP_SUFFIX
from evdm.data.schema import MANIFEST_NAME, SHARD_PATTERN
from preprocess.state import save_state, still_valid
from preprocess.writer import SPLITS, split_entries, write_manifest, write_shard


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    items: tuple  # what the shard is made of: video paths (preprocess.shard) or RecordRefs (preprocess.bair)

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(split=self.split, index=self.index)


def plan_shards(items: dict[str, Sequence], seed: int, per_shard: int) -> list[ShardPlan]:
    """Deal each split's items ({split: items}), in a seeded random order, into groups of per_shard."""
    plans = []
    for split_id, split in enumerate(SPLITS):
        mine = items.get(split, ())
        # Neighbouring items (one folder, one file) are often alike: permuting spreads them over shards.
        order = np.random.default_rng([seed, split_id]).permutation(len(mine))
        for index, start in enumerate(range(0, len(mine), per_shard)):
            plans.append(ShardPlan(split, index, tuple(mine[i] for i in order[start:start + per_shard])))
    return plans


def inputs_digest(root: Path, paths: Iterable[str]) -> str:
    """Fingerprint of the input files (path and size), so resume refuses a changed input folder."""
    h = hashlib.sha256()
    for rel in paths:
        try:
            size = (root / rel).stat().st_size
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def worker_map(fn: Callable, tasks: list, workers: int, *, tmp_dir: Path | None = None) -> Iterator[Iterator]:
    """fn over tasks, results in task order: in `workers` processes, or here when one suffices. When the
    caller stops on an error, the workers are terminated mid-task, before their atomic writes can remove
    their temporary files: those left in `tmp_dir` (the caller's locked output folder) are removed then."""
    # One worker runs in this process: no pickling, and a fair single-core measurement.
    if workers <= 1 or len(tasks) <= 1:
        yield map(fn, tasks)
        return
    try:
        # spawn, not fork: the progress display runs a thread, and forking a threaded process is unsafe.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:  # leaving terminates the workers
            yield pool.imap(fn, tasks)
    except BaseException:
        for leftover in tmp_dir.glob(f"*{TMP_SUFFIX}") if tmp_dir is not None else ():
            leftover.unlink(missing_ok=True)
        raise


def write_planned_shard(shard_dir: Path, plan: ShardPlan, seed: int, items: list, encode: Callable[[Any], dict],
                        *, videos: int, skipped: list[dict], sources: list[dict] | None = None) -> dict:
    """Write the plan's clips (items, each encoded by `encode`) shuffled; return its progress record.

    No file is written when there are no clips. The shuffle has a seed of the shard's own, so one
    video's clips are not adjacent. `sources`: what the manifest records per usable video, if anything.
    """
    order = np.random.default_rng([seed, SPLITS.index(plan.split), plan.index, 1]).permutation(len(items))
    record = {"split": plan.split, "clips": len(items), "sha256": None, "bytes": 0, "videos": videos,
              "skipped": skipped}
    if sources is not None:
        record["sources"] = sources
    if items:
        _, record["sha256"] = write_shard(shard_dir / plan.name, (encode(items[k]) for k in order))
        record["bytes"] = (shard_dir / plan.name).stat().st_size
    return record


def resume_plans(shard_dir: Path, plans: list[ShardPlan], state: dict) -> tuple[dict[str, dict], list[ShardPlan]]:
    """({name: record} of the finished shards kept, the plans still to do); saves the state."""
    records = {p.name: state["shards"][p.name] for p in plans
               if p.name in state["shards"] and still_valid(shard_dir, p.name, state["shards"][p.name])}
    state["shards"] = dict(records)
    todo = [p for p in plans if p.name not in records]
    if todo:  # the manifest must never describe shards that are being redone
        (shard_dir / MANIFEST_NAME).unlink(missing_ok=True)
    # Saved before any shard is written, so a crash at any later point leaves a resumable folder.
    save_state(shard_dir, state)
    return records, todo


def record_shard(shard_dir: Path, state: dict, records: dict[str, dict], plan: ShardPlan, record: dict) -> None:
    """Note one finished shard, in memory and in progress.json (atomically)."""
    records[plan.name] = state["shards"][plan.name] = record
    save_state(shard_dir, state)


def finish(shard_dir: Path, plans: list[ShardPlan], records: dict[str, dict], *, options: dict,
           clip_shape: tuple[int, ...], skipped: list[dict], scan: dict | None = None) -> Manifest | None:
    """Write the manifest (last) and return it; None, and no manifest, when no shard has a clip."""
    if not any(r["clips"] for r in records.values()):
        return None
    with_sources = [r for r in records.values() if "sources" in r]
    sources = sorted((s for r in with_sources for s in r["sources"]), key=lambda s: s["path"]) if with_sources else None
    return write_manifest(shard_dir, options=options, clip_shape=clip_shape, skipped=skipped,
                          splits=split_entries({"name": p.name, **records[p.name]} for p in plans),
                          sources=sources, scan=scan)
