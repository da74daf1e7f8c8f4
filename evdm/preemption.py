"""Preemption: SIGTERM and SIGINT become a stop request that the training loop reads between steps (DataLoader
workers ignore both: docs/GUIDE.md, Design notes). The main process only sets a flag: raising inside arbitrary
code (a checkpoint write, a collective) is what loses runs. Torch-free: train.py installs the handlers first."""

import atexit
import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[str] = []  # the signals received: module state, a handler has nowhere else to write


def _on_signal(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    text = (f"{name} again: already stopping, last.pt is being saved; wait a few seconds\n" if _received
            else f"{name}: stopping after the current step and saving last.pt\n")
    _received.append(name)
    # os.write, not print: print() in a handler that interrupted a print() raises "reentrant call" (a traceback).
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


def stop_requested() -> bool:
    """True once SIGINT or SIGTERM arrived while the stop handlers were installed."""
    return bool(_received)


def install_stop_handlers() -> None:
    """From now on SIGINT/SIGTERM set the stop flag instead of raising; installing again keeps a request
    already received (train.py installs them at start, and train() again for library callers)."""
    if signal.getsignal(signal.SIGINT) is not _on_signal:
        _received.clear()
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def _handlers(handler: object) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` while inside (a no-op outside the main thread, which alone gets signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    if handler is _on_signal:
        install_stop_handlers()
    else:
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_on_signals() -> contextlib.AbstractContextManager:
    """`install_stop_handlers` while inside; the previous handlers come back after (library callers, tests)."""
    return _handlers(_on_signal)


def default_signals() -> contextlib.AbstractContextManager:
    """SIGINT/SIGTERM end the process at once while inside: a rendezvous waits inside one C++ call, after
    which a flag-setting handler would run too late. Nothing is trained yet there, so nothing is lost."""
    return _handlers(signal.SIG_DFL)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Ignore SIGINT/SIGTERM, then take the signals blocked at fork back. DataLoader workers' worker_init_fn;
    and train.py once the run is over: shutdown restores default handlers (a late Ctrl-C would turn exit 0
    into 130), but a SIG_IGN survives it."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def kill_workers_at_exit() -> None:
    """SIGKILL the daemonic children (DataLoader workers) still alive when the process exits. Workers ignore
    the SIGTERM multiprocessing's exit hook sends before joining them with no timeout; registered after that
    hook, so it runs first. DataLoader's SIGCHLD handler goes first: it would report the kill as a failure."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while DataLoader workers fork (and see that they die at exit): a signal
    between a worker's fork and its worker_init_fn cannot kill it; the main process gets it after."""
    atexit.unregister(kill_workers_at_exit)  # registered once, and after multiprocessing's hook
    atexit.register(kill_workers_at_exit)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
