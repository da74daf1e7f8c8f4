"""Which files under DATA_DIR are sharded, and into which split: pure functions of the file list and the options.

The scan keeps files whose extension is a video container's (any case) and counts the rest. A
video's split comes from the split lists when they are given (`--split-list train=FILE`; only the
videos they name are used), else from its folder names, else from a stable hash. `--max-videos`
then keeps the videos with the smallest seeded hash of their path, so the choice is reproducible
and adding one file changes it by at most one video.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from preprocess.options import UserError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm")
SPLIT_NAMES = {"train": "train", "val": "val", "test": "val"}  # a test list is the val split, as test folders are
_LABEL_RE = re.compile(r"\s+\d+$")  # UCF-101's trainlist lines end in a class index: "Class/v_x.avi 1"
_KINETICS_RE = re.compile(r"_\d+_\d+$")  # Kinetics downloads are named {youtube_id}_{start}_{end}


@dataclass
class Selection:
    """The videos to shard with their splits, and what the scan and the lists left out (for the summary)."""

    splits: dict[str, str]  # relative path -> "train" | "val", in sorted path order
    found: int = 0  # video files the scan found
    not_videos: dict[str, int] = field(default_factory=dict)  # extension ("" for none) -> files skipped
    listed_missing: list[str] = field(default_factory=list)  # names in a split list that match no video
    unlisted: int = 0  # videos no split list names (left out)
    over_max: int = 0  # videos left out by --max-videos

    @property
    def videos(self) -> list[str]:
        return list(self.splits)

    def report(self) -> dict:
        """The manifest's "scan" entry."""
        return {"videos_found": self.found, "videos_used": len(self.splits), "not_videos": self.not_videos,
                "listed_missing": self.listed_missing, "unlisted": self.unlisted, "over_max_videos": self.over_max}


def normalize_extensions(values: list[str]) -> tuple[str, ...]:
    """"avi", ".MKV", "mp4,webm" -> (".avi", ".mkv", ".mp4", ".webm"): lower case, with the dot, no repeats."""
    exts = [("." + v.strip().lstrip(".")).lower() for text in values for v in text.split(",") if v.strip(" .")]
    return tuple(dict.fromkeys(exts))


def scan(data_dir: Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> tuple[list[str], dict[str, int]]:
    """(relative posix paths of every file under data_dir whose extension is in `extensions` (any case),
    sorted; {extension: count} of the other files)."""
    found, others = [], Counter()
    for root, _dirs, files in os.walk(data_dir):
        for name in files:  # os.walk lists dangling links here too: they become "unreadable"
            ext = os.path.splitext(name)[1].lower()
            if ext in extensions:
                found.append(Path(root, name).relative_to(data_dir).as_posix())
            else:
                others[ext] += 1
    return sorted(found), dict(sorted(others.items()))


def split_of(relpath: str, val_fraction: float) -> str:
    """A folder named like *train* / *val* / *test* decides (deepest wins; test is val), else a hash."""
    for part in reversed(PurePosixPath(relpath).parts[:-1]):
        low = part.lower()
        if "train" in low:
            return "train"
        if "val" in low or "test" in low:
            return "val"
    # A stable hash, not Python's salted hash(): the split must not change between runs.
    return "val" if _unit_hash(relpath) < val_fraction else "train"


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


# ---- split lists

def read_split_list(path: Path, column: str) -> list[str]:
    """The names a split list holds: one per line (a trailing class index dropped), or a CSV's `column`."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"split list {path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    if path.suffix.lower() != ".csv":
        lines = (_LABEL_RE.sub("", line.strip()) for line in text.splitlines())
        names = [line for line in lines if line and not line.startswith("#")]
    else:
        rows = csv.DictReader(text.splitlines())
        if column not in (rows.fieldnames or []):
            raise UserError(f"split list {path}: no column {column!r} (columns: {', '.join(rows.fieldnames or [])}); "
                            "choose one with --split-column")
        names = [row[column].strip() for row in rows if (row[column] or "").strip()]
    if not names:
        raise UserError(f"split list {path} names no video (empty, or only comments and blank lines)")
    return names


def _aliases(relpath: str) -> set[str]:
    """The names a list may use for a video: its path or any tail of it (lists made relative to a
    sub-folder of DATA_DIR), the path without extension, its stem, and a Kinetics download's YouTube id."""
    path = PurePosixPath(relpath)
    tails = {"/".join(path.parts[i:]) for i in range(len(path.parts))}
    return tails | {str(path.with_suffix("")), path.stem, _KINETICS_RE.sub("", path.stem)}


def _clean(name: str, root: Path | None) -> str:
    """A listed name as the aliases spell paths: "/" separators, no leading "./", and an absolute path under
    `root` (DATA_DIR, as given or with its links resolved) relative to it."""
    name = name.replace("\\", "/")
    if root is not None and name.startswith("/"):
        name = posixpath.normpath(name)
        for base in {os.path.abspath(root), str(root.resolve())}:
            if name.startswith(base.rstrip("/") + "/"):
                return name[len(base.rstrip("/")) + 1:]
    return name[2:] if name.startswith("./") else name


def assign_from_lists(videos: list[str], lists: dict[str, list[str]],
                      root: Path | None = None) -> tuple[dict[str, str], list[str], int]:
    """({video: split} for the videos the lists name, the listed names no video matches, videos named by none).

    lists: {"train" | "val": names}; root: DATA_DIR, for names that are absolute paths. A video two splits
    name is a UserError (a leak between splits), and so is a name that matches several videos (one file
    name in two folders) other than as one video's whole relative path.
    """
    paths = set(videos)
    by_alias: dict[str, list[str]] = {rel: [rel] for rel in videos}  # a whole path names its video alone
    for rel in videos:
        for alias in _aliases(rel) - paths:
            by_alias.setdefault(alias, []).append(rel)
    splits: dict[str, str] = {}
    missing = []
    for split, names in lists.items():
        for name in (_clean(n, root) for n in names):
            matches = by_alias.get(name, [])
            if not matches:
                missing.append(name)
            if len(matches) > 1:
                raise UserError(f"the {split} split list's {name!r} matches {len(matches)} videos "
                                f"({', '.join(matches)}); write the path under DATA_DIR (e.g. {matches[0]}) "
                                f"to choose one")
            for rel in matches:
                if splits.setdefault(rel, split) != split:
                    raise UserError(f"{rel} is named by both the {splits[rel]} and the {split} split list")
    return {rel: splits[rel] for rel in videos if rel in splits}, sorted(set(missing)), len(videos) - len(splits)


def lists_digest(lists: dict[str, list[str]]) -> str:
    """Fingerprint of the split lists' contents, so resume refuses shards made from other lists."""
    return hashlib.sha256(json.dumps({k: sorted(v) for k, v in lists.items()}, sort_keys=True).encode()).hexdigest()


# ---- the whole selection

def keep_some(videos: list[str], n: int, seed: int) -> list[str]:
    """The n videos with the smallest hash of (seed, path), in path order."""
    chosen = set(sorted(videos, key=lambda rel: _unit_hash(f"{seed}\0{rel}"))[:n])
    return [rel for rel in videos if rel in chosen]


def select_videos(data_dir: Path, *, extensions: tuple[str, ...], lists: dict[str, list[str]] | None,
                  val_fraction: float, max_videos: int | None, seed: int,
                  list_files: dict[str, str] | None = None) -> Selection:
    """Scan data_dir and decide each video's split; UserError when no video is left, or when a split's
    lists name none of the videos (list_files: {split: its list files}, to name them)."""
    videos, not_videos = scan(data_dir, extensions)
    if not videos:
        raise UserError(f"no video files ({' '.join(extensions)}, any case) found under {data_dir}")
    if lists:
        splits, missing, unlisted = assign_from_lists(videos, lists, data_dir)
        for split, names in lists.items():
            if split not in splits.values():
                where = f" ({list_files[split]})" if list_files and split in list_files else ""
                raise UserError(f"the {split} split list{where} names none of the {len(videos)} videos under "
                                f"{data_dir} (first listed: {names[0] if names else 'nothing'}): that split "
                                f"would be empty")
    else:
        splits, missing, unlisted = {rel: split_of(rel, val_fraction) for rel in videos}, [], 0
    kept = keep_some(list(splits), max_videos, seed) if max_videos else list(splits)
    return Selection({rel: splits[rel] for rel in kept}, found=len(videos), not_videos=not_videos,
                     listed_missing=missing, unlisted=unlisted, over_max=len(splits) - len(kept))
