"""Atomic file writes (torch-free), a full disk reported as one line (DiskFullError), and the check, made
before the work, that an output path can be written and replaces nothing that must not be replaced."""

import contextlib
import errno
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Iterable

from evdm.data.schema import MANIFEST_NAME

TMP_SUFFIX = ".tmp"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Some writers report a short write without an errno (np.save: "N requested and M written"); with less
# than this left on the filesystem, a failed write is taken to be a full disk.
_NEARLY_FULL_BYTES = 1 << 20
# torch.save's zip archive starts with the local header of ARCHIVE/data.pkl (the name at byte 30, its
# length at byte 26); the legacy (pickle) format with the pickled magic number 0x1950a86a20f9469cfc6c.
_ZIP_HEAD, _PICKLE_NAME = b"PK\x03\x04", b"/data.pkl"
_LEGACY_TORCH_HEAD = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_CHECKPOINT_SUFFIXES = (".pt", ".pth")


class DiskFullError(OSError):
    """A write that ran out of space (ENOSPC, or over quota); str() is one line naming the file and the
    space left. An OSError, so callers that handle write errors in general still catch it."""

    def __init__(self, path: Path, free_bytes: int) -> None:
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device ({free_bytes / 2**20:.1f} MiB free there)")
        self.path, self.free_bytes = path, free_bytes

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self) -> tuple:  # a pool worker's error reaches the parent pickled: rebuild it from the same
        return type(self), (self.path, self.free_bytes)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _is_disk_full(err: BaseException, path: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in `err`'s chain (torch.save wraps the OSError), or a write failed with no space left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, (OSError, RuntimeError)) and free_bytes(path.parent) < _NEARLY_FULL_BYTES


@contextlib.contextmanager
def disk_full_as_error(path: str | Path, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Inside, a write that runs out of space raises DiskFullError naming `path`; `cleanup` (removing a
    partial file, which frees its space) runs first on any error. Other errors pass unchanged."""
    path = Path(path)
    try:
        yield
    except BaseException as err:
        full = isinstance(err, Exception) and not isinstance(err, DiskFullError) and _is_disk_full(err, path)
        if cleanup is not None:
            cleanup()
        if full:
            raise DiskFullError(path, free_bytes(path.parent)) from None
        raise


def tmp_path(path: Path, *, keep_extension: bool = False) -> Path:
    """The temporary name beside `path`: NAME.tmp, or NAME.tmp.EXT when the writer reads the format from it."""
    return path.with_name(path.name + TMP_SUFFIX + (path.suffix if keep_extension else ""))


def atomic_write(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False,
                 keep_extension: bool = False) -> None:
    """Call write(tmp) for a temporary name beside `path`, optionally fsync it, then rename it to `path`:
    readers see the old file or the new one; when anything raises, the temporary file is removed. A full disk
    raises DiskFullError. keep_extension=True: for writers that pick the format from the name (PIL, ffmpeg)."""
    path = Path(path)
    tmp = tmp_path(path, keep_extension=keep_extension)
    with disk_full_as_error(path, cleanup=lambda: tmp.unlink(missing_ok=True)):
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)


def folder_problem(path: Path) -> str | None:
    """Create `path` (and parents) as a folder; None when that worked, else what went wrong (follows the path)."""
    if path.exists() and not path.is_dir():
        return "exists and is not a folder; choose a folder path"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot be created as a folder ({err.strerror or err})"
    return None


def output_problem(path: str | Path, *, folder: bool = False, inputs: Iterable[str | Path] = (),
                   names: Iterable[str] = ()) -> str | None:
    """Why `path` cannot be written later as a file (or, folder=True, as a folder to write into), as words
    that follow the path in a one-line error; None when it can. Creates nothing. The nearest existing ancestor
    must take a new file (a probe). An output never replaces, unasked, one of the command's `inputs` (links
    resolved), a checkpoint (by content or .pt / .pth), a shard (.tar) or a manifest.json: a file path that is
    one is refused, and so is a folder holding one under a name matching `names` (globs of what it writes)."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        return "exists and is not a folder; choose a folder path" if folder else "is a folder; give a file name"
    inputs = _file_ids(inputs)
    if not folder and (what := _kept_as(path, inputs)):
        return f"is {what}, which this would replace; choose another path"
    names = tuple(names)
    if folder and names and path.is_dir():
        for file in sorted(path.iterdir()):
            if any(fnmatch.fnmatchcase(file.name, n) for n in names) and (what := _kept_as(file, inputs)):
                return f"holds {file.name}, {what}, which this could replace; choose another folder"
    base = _existing_ancestor(path if folder else path.parent)
    if not base.is_dir():
        return f"cannot be written: {base} is not a folder"
    try:
        tempfile.TemporaryFile(dir=base).close()
    except OSError as err:
        return f"cannot be written: {base} ({err.strerror or err})"
    return None


def _file_ids(paths: Iterable[str | Path]) -> dict[tuple[int, int], str]:
    """{(device, inode): path} of the existing files among `paths` (a missing input is the command's to name)."""
    ids = {}
    for item in paths:
        with contextlib.suppress(OSError):
            st = os.stat(item)
            ids.setdefault((st.st_dev, st.st_ino), str(item))
    return ids


def _kept_as(path: Path, inputs: dict[tuple[int, int], str]) -> str | None:
    """`path` as a noun ("a checkpoint") when it is a file no output replaces unasked, else None."""
    if not path.is_file():
        return None
    st = path.stat()
    if source := inputs.get((st.st_dev, st.st_ino)):
        return "an input of this command" + ("" if source == str(path) else f" (the same file as {source})")
    if path.suffix == ".tar":
        return "a shard"
    if path.name == MANIFEST_NAME:
        return "a shard folder's manifest"
    if path.suffix in _CHECKPOINT_SUFFIXES or _is_torch_file(path):
        return "a checkpoint"
    return None


def _is_torch_file(path: Path) -> bool:
    """Whether `path` starts as torch.save writes (a truncated checkpoint counts, whatever its name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if head.startswith(_ZIP_HEAD) and len(head) >= 30:
        name_end = 30 + int.from_bytes(head[26:28], "little")
        return head[30:name_end].endswith(_PICKLE_NAME)
    return head.startswith(_LEGACY_TORCH_HEAD)
