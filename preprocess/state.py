"""The state of SHARD_DIR, for both shard writers: which files are ours, what can be resumed, what is refused.

A run (preprocess.shard or preprocess.bair, through preprocess.plan) holds SHARD_DIR/.lock
(evdm.lock) from its start, records its identity (options and an input fingerprint) and each finished
shard in SHARD_DIR/progress.json, saved atomically after every shard. A rerun with the same identity
keeps the recorded shards whose bytes still match; anything else is refused unless --overwrite, which
deletes only files this package writes, never the user's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from evdm.atomic import TMP_SUFFIX
from evdm.data.schema import MANIFEST_NAME
from evdm import legacy
from evdm.lock import LOCK_NAME
from preprocess.options import UserError
from preprocess.writer import SPLITS, sha256_file, write_json_atomic

PROGRESS_NAME = "progress.json"


def is_ours(path: Path) -> bool:
    """Files the shard writers write (shards, manifest, progress record, and their temporaries)."""
    name = path.name.removesuffix(TMP_SUFFIX)
    if name in (MANIFEST_NAME, PROGRESS_NAME):
        return True
    split, _, rest = name.partition("-")
    return split in SPLITS and rest.endswith(".tar") and rest[:-4].isdigit()


def open_state(shard_dir: Path, identity: dict, *, overwrite: bool, added: dict | None = None,
               list_digests: dict[str, str] | None = None) -> dict:
    """Prepare SHARD_DIR (an existing folder the caller has locked); return the progress record to resume
    from ({"shards": {}} when fresh).

    added: options that later versions introduced, with the value that does what runs before them did;
    a recorded identity without such a key resumes when the option has that value now (the inputs
    fingerprint still decides whether the same videos were chosen). list_digests: {split list file:
    digest of its names}, kept beside the identity only to name the file that changed in a refusal."""
    for tmp in shard_dir.glob("*" + TMP_SUFFIX):  # left by a crash: never complete
        if is_ours(tmp):
            tmp.unlink()
    extra = {"split_list_files": list_digests} if list_digests else {}
    fresh = {"format": 1, "identity": identity, **extra, "videos_per_shard": None, "shards": {}}
    entries = [p for p in shard_dir.iterdir() if p.name != LOCK_NAME]
    ours = [p for p in entries if p.is_file() and is_ours(p)]
    if entries:
        old = _read_progress(shard_dir, overwrite)
        if old is not None and _completed(old.get("identity", {}), added or {}) == identity:
            return {**old, **extra}
        if not overwrite:
            if old is None:
                raise UserError(f"{shard_dir} is not empty and has no {PROGRESS_NAME} of a shard writer; "
                                "choose an empty SHARD_DIR or pass --overwrite")
            changed = _describe_change(old, identity, added or {}, list_digests or {})
            raise UserError(f"{shard_dir} holds shards made with different {changed}; "
                            "pass --overwrite to replace them, or choose another SHARD_DIR")
    for path in ours:
        path.unlink()
    return fresh


def _read_progress(shard_dir: Path, overwrite: bool) -> dict | None:
    """The recorded progress: None when there is none, {} when it is damaged and --overwrite was given."""
    path = shard_dir / PROGRESS_NAME
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        if not overwrite:
            raise UserError(f"{path} is damaged; pass --overwrite to start over") from None
        return {}


def _completed(identity: dict, added: dict) -> dict:
    """`identity` as written by an earlier version, with the options it predates filled in (evdm.legacy)."""
    return legacy.upgrade_progress_identity(identity, added)


def _describe_change(old_state: dict, new: dict, added: dict, list_digests: dict[str, str]) -> str:
    """What differs between the recorded run and this one, the cause first: the options (which also decide
    the videos chosen), then the split lists' contents (which do too), then the input files."""
    old = old_state.get("identity", {})
    before, after = old.get("options", {}), new.get("options", {})
    completed = _completed(old, added).get("options", {})  # an added option at its old behaviour is no change
    diffs = [f"{k} {_shown(before, k)} -> {_shown(after, k)}" for k in sorted(set(completed) | set(after))
             if k not in completed or k not in after or completed[k] != after[k]]
    if diffs:
        return "options (" + ", ".join(diffs) + ")"
    if old.get("split_lists") != new.get("split_lists"):
        recorded = old_state.get("split_list_files", {})  # absent in folders of older versions
        changed = [path for path, digest in list_digests.items() if recorded.get(path, digest) != digest]
        return f"split lists ({', '.join(changed) or 'their contents'} changed)"
    return "inputs (files added, removed or resized in the input folder)"


def _shown(options: dict, key: str) -> str:
    # An option that a run of an older version did not have, and that is not at the value reproducing it.
    return repr(options[key]) if key in options else "(not recorded)"


def still_valid(shard_dir: Path, name: str, record: dict) -> bool:
    """Whether a recorded shard can be reused: it had no clips, or its file still has its sha256."""
    if record["clips"] == 0:
        return True
    path = shard_dir / name
    return path.is_file() and sha256_file(path) == record["sha256"]


def save_state(shard_dir: Path, state: dict) -> None:
    write_json_atomic(shard_dir / PROGRESS_NAME, json.dumps(state, indent=1, sort_keys=True))
