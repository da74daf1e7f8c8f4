"""Progress display for the shard writers: a rich bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time


class Progress:
    """`done` of `total` items (`label`, e.g. "videos"), with running counts such as clips and MB.

    On a terminal: a rich progress bar. Otherwise (a log file, CI) a status line each time another
    tenth is done when `log_tenths`, and the lines given to `log`. `quiet` shows nothing (library
    calls). Use as a context manager: the bar stops however the block ends.
    """

    def __init__(self, label: str, total: int, *, done: int = 0, counts: dict[str, float] | None = None,
                 log_tenths: bool = True, quiet: bool = False, console=None):
        from rich.console import Console  # here, not at import: the tools' workers never draw

        self.console = console or Console()
        self.label, self.total, self.done = label, total, done
        self.counts = dict(counts or {})
        self.log_tenths, self.quiet = log_tenths, quiet
        self._first_done, self._t0 = done, time.perf_counter()
        self._bar, self._logged = None, -1

    def __enter__(self) -> Progress:
        if self.done:
            self._print(f"resuming: {self.done}/{self.total} {self.label} already done")
        if self.console.is_terminal and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, stats=self.stats())
            self._bar.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._bar is not None:
            self._bar.stop()
        return False

    def stats(self) -> str:
        """The running counts and the rate of this run, e.g. "12 clips, 0.4 MB, 3.1 videos/s"."""
        rate = (self.done - self._first_done) / max(time.perf_counter() - self._t0, 1e-9)
        parts = [f"{v} {k}" if isinstance(v, int) else f"{v:.1f} {k}" for k, v in self.counts.items()]
        return ", ".join(parts + [f"{rate:.1f} {self.label}/s"])

    def advance(self, n: int = 1, **counts: float) -> None:
        """n more items done; counts are added to the running counts of the same name."""
        self.done += n
        for k, v in counts.items():
            self.counts[k] += v
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, stats=self.stats())
            return
        tenth = self.done * 10 // max(1, self.total)
        if self.log_tenths and tenth > self._logged:
            self._logged = tenth
            self._print(f"{self.label}: {self.done}/{self.total}, {self.stats()}")

    def log(self, line: str) -> None:
        """Without a bar: print `line` and where the run stands; with one, the bar already says it."""
        if self._bar is None:
            self._print(f"{line} | {self.label} {self.done}/{self.total}, {self.stats()}")

    def _print(self, line: str) -> None:
        if not self.quiet:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
