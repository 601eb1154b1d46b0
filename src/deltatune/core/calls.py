"""Per-call values for the coming forward passes (task ids for Poly/MHR, ...), context-local.

Pieces that read such a value declare its keyword in `Piece.keywords`; the runtime then takes the keyword off the
model's call (`model(ids, task_ids=t)`), or a caller sets it for a block of calls (`with dt.batch(task_ids=t):
model.generate(ids)`: generate() refuses unknown keywords). Values live in a context variable, so each thread (and
each asyncio task) sees only its own.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_current: ContextVar[dict[str, Any]] = ContextVar("deltatune_batch", default={})


def batch_value(key: str) -> Any:
    """The value given for `key` by the enclosing `batch` context or the current model call, else None."""
    return _current.get().get(key)


@contextmanager
def batch(**info: Any) -> Iterator[None]:
    """Per-example information (e.g. task_ids=LongTensor[batch]) for every forward inside."""
    token = _current.set({**_current.get(), **info})
    try:
        yield
    finally:
        _current.reset(token)
