"""Progress of long jobs on stderr (stdout stays for results): a rich progress bar in a terminal; plain lines
when stderr is not a terminal (a log file, a batch job), where a redrawn bar would be noise. Disabled: silent.

    with Progress(total, description="train") as bar:
        bar.update(step, loss=0.31)        # the bar's fields (terminal only)
        bar.line("step 10/100 ...")        # a line: above the bar in a terminal, as is in a log
        with bar.phase("eval", 400) as advance:
            advance(64)                    # a second bar under the first; in a log a line every `every` s
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "train",
                 stream: TextIO | None = None, every: float = 30.0) -> None:
        self.enabled, self.total, self.start, self.description = enabled, total, start, description
        self.stream, self.every = stream, every  # stream None: sys.stderr as it is when the job starts
        self._bar: RichProgress | None = None
        self._t0 = time.perf_counter()

    @property
    def interactive(self) -> bool:
        """True when the bar is drawn (enabled, on a terminal)."""
        return self._bar is not None

    def __enter__(self) -> "Progress":
        self._t0 = time.perf_counter()
        if self.stream is None:
            self.stream = sys.stderr
        if self.enabled and _isatty(self.stream):
            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.start, info="")
        return self

    def update(self, completed: int, **info: Any) -> None:
        if self._bar is None:
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        self._bar.update(self._task, completed=completed, info=text)

    def line(self, text: str) -> None:
        """Print one line (nothing when disabled): above the bar in a terminal, a plain line otherwise."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.stream, flush=True)

    def eta(self, completed: int) -> float | None:
        """Seconds left at the average pace since the job (re)started, everything in it included; None before
        the first unit is done."""
        done = completed - self.start
        if done <= 0:
            return None
        return (time.perf_counter() - self._t0) / done * max(self.total - completed, 0)

    @contextlib.contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A sub-job (e.g. an evaluation) of `total` units; yields `advance(n)`. In a terminal a second bar, removed
        when the phase ends; in a log, a line `description: done/total` at most every `every` seconds."""
        done = [0]
        if not self.enabled:
            yield lambda n: None
            return
        if self._bar is not None:
            task = self._bar.add_task(description, total=total, info="")

            def advance(n: int) -> None:
                done[0] += n
                self._bar.update(task, completed=done[0])  # type: ignore[union-attr]
            try:
                yield advance
            finally:
                self._bar.remove_task(task)
            return
        last = [time.perf_counter()]

        def advance_log(n: int) -> None:
            done[0] += n
            now = time.perf_counter()
            if now - last[0] >= self.every and done[0] < total:
                last[0] = now
                self.line(f"{description}: {done[0]}/{total}")
        yield advance_log

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def duration(seconds: float | None) -> str:
    """h:mm:ss (m:ss under an hour); '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
