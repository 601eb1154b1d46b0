"""A rich progress bar showing loss, learning rate and tokens/s (a no-op when disabled)."""
from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "train") -> None:
        self.enabled, self.total, self.start, self.description = enabled, total, start, description
        self._bar: RichProgress | None = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.start, info="")
        return self

    def update(self, completed: int, **info: Any) -> None:
        if self._bar is None:
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in info.items())
        self._bar.update(self._task, completed=completed, info=text)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)
