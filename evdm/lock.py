"""One writer per folder, torch-free: an flock on FOLDER/.lock, held by the trainer on out_dir and by the shard
writers (preprocess.shard, preprocess.bair) on SHARD_DIR for a whole run."""

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from evdm.atomic import disk_full_as_error, folder_problem

LOCK_NAME = ".lock"


@contextlib.contextmanager
def lock_folder(folder: Path, label: str, error: type[Exception]) -> Iterator[None]:
    """Hold folder/.lock (an exclusive flock) while inside, creating the folder first if needed. A folder that
    is taken, cannot be created or cannot be written raises `error`, one line starting with `label` and the folder.
    The kernel drops a flock when its process dies, so a lock is never stale; the file names the holder ("pid N
    on host H") and is removed on the way out, with the folder when this call created it and it is empty."""
    created = not folder.exists()
    if problem := folder_problem(folder):
        raise error(f"{label} {folder} {problem}")
    lock_path = folder / LOCK_NAME
    fd = _acquire(lock_path, label, error)
    try:
        with disk_full_as_error(lock_path):
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink(missing_ok=True)  # before the close: a waiting run re-checks the inode (_acquire)
        os.close(fd)  # releases the flock
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty


def _holder(lock_path: Path) -> str:
    """The holder's "pid N on host H", waiting a moment for a run that took the lock an instant ago."""
    for _ in range(20):
        with contextlib.suppress(OSError):
            if text := lock_path.read_text().strip():
                return text
        time.sleep(0.01)
    return "another process"


def _acquire(lock_path: Path, label: str, error: type[Exception]) -> int:
    """An fd holding an exclusive flock on lock_path, retried if the holder removed the file meanwhile."""
    what = f"{label} {lock_path.parent}"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # EROFS, EACCES: a run could write nothing there either
            raise error(f"{what} cannot be written ({err.strerror or err}); make it writable or choose "
                        f"another {label}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise error(f"{what} is in use by {_holder(lock_path)} ({lock_path}); wait for that run to end or "
                        f"choose another {label}") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                return fd
        os.close(fd)  # locked a file its holder had just removed: take the new one
