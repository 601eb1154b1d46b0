"""transformers' load report, held back while a model loads and shown afterwards unless a delta provides what it
reports.

`from_pretrained` logs a "LOAD REPORT" table of the weights the checkpoint lacked (MISSING: newly initialised),
had in excess (UNEXPECTED) or had in another shape (MISMATCH). Loading a pretrained encoder with a new
classification head always reports the head as MISSING; when the delta that goes on the model trains and saves
that head (its `modules_to_save`), the warning says nothing the user needs to act on. Any other row (another
missing weight, an unexpected or mismatched one) keeps the whole report.
"""
from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator

from torch import nn

from ..core.targeting import matches

LOGGER = "transformers.modeling_utils"  # where from_pretrained logs the report
MARK = "LOAD REPORT"
STATUSES = ("MISSING", "UNEXPECTED", "MISMATCH", "CONVERSION", "OWNED", "SKIPPED")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class HeldReports(logging.Filter):
    """Keeps the load reports logged while active by the thread that made it (other threads' records pass);
    `release` shows or drops them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and MARK in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self, model: nn.Module, provided: tuple[str, ...] | str = ()) -> list[str]:
        """Log again every held report, except one whose rows are all MISSING weights of modules matching
        `provided` (a `modules_to_save` spec: name suffixes or a regex) or inside one. Returns the keys of the
        reports left out."""
        dropped: list[str] = []
        modules = {p for p, _ in model.named_modules() if p and provided and matches(provided, p)}
        logger = logging.getLogger(LOGGER)
        for record in self.records:
            keys = missing_only(record.getMessage())
            if keys is not None and all(_inside(k, modules) for k in keys):
                dropped += keys
            else:
                logger.handle(record)
        self.records.clear()
        return dropped


def missing_only(message: str) -> list[str] | None:
    """The keys of a load report whose rows are all MISSING; None when it has any other row or cannot be read."""
    text = _ANSI.sub("", message).split("\n\nNotes:")[0]
    keys, rows = [], 0
    for line in text.splitlines()[1:]:  # the first line names the model class and the checkpoint
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 2 or cells[0] == "Key" or set(line) <= set("-+ "):
            continue
        rows += 1
        if cells[1] == "MISSING" and cells[0] and " " not in cells[0]:
            keys.append(cells[0])
    return keys if keys and rows == len(keys) else None


def _inside(key: str, modules: set[str]) -> bool:
    """True when the weight `key` (module path + name) belongs to one of `modules` or a submodule of one."""
    parts = key.split(".")[:-1]
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts) + 1))


@contextlib.contextmanager
def held_load_reports() -> Iterator[HeldReports]:
    """Hold transformers' load reports logged inside the block by this thread (another thread's loads log as
    usual); call `.release(model, provided)` after it (reports still held when the block raises are shown)."""
    held = HeldReports()
    logger = logging.getLogger(LOGGER)
    logger.addFilter(held)
    try:
        yield held
    except BaseException:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)
        held.records.clear()
        raise
    logger.removeFilter(held)
