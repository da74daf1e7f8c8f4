"""Atomic file writes, torch-free: shared by checkpoints, run logs, previews, MP4s and the shard writers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path, *, keep_extension: bool = False) -> Path:
    """The temporary name beside `path`: NAME.tmp, or NAME.tmp.EXT when the writer reads the format from it."""
    return path.with_name(path.name + TMP_SUFFIX + (path.suffix if keep_extension else ""))


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False,
                 keep_extension: bool = False) -> None:
    """Call write(tmp) for a temporary name beside `path`, optionally fsync it, then rename it to `path`.

    Readers see the old file or the new one, never a half-written one; when `write` (or anything
    after it) raises, the temporary file is removed and the old file is left as it was. fsync=True
    makes the new bytes durable before the rename, for files a crash must not lose (checkpoints,
    shards). keep_extension=True is for writers that pick the format from the file name (PIL, ffmpeg).
    """
    path = Path(path)
    tmp = tmp_path(path, keep_extension=keep_extension)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def folder_problem(path: Path) -> str | None:
    """Create `path` (and its parents) as a folder to write into; None when that worked, else what went
    wrong, as words that follow the path in a one-line error ("X exists and is not a folder; ...")."""
    if path.exists() and not path.is_dir():
        return "exists and is not a folder; choose a folder path"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot be created as a folder ({err.strerror or err})"
    return None
