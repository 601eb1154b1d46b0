"""Per-example information for the coming forward passes (task ids for Poly/MHR, per-row deltas for Route).

    model(input_ids, task_ids=t)            # a keyword the model does not know: deltatune takes it off the call
    model(input_ids, deltas=["a", None])    # Route for this call only
    with dt.batch(task_ids=t): model.generate(input_ids)   # generate() refuses unknown keywords: use the context

Pieces read what they need with `batch_value(key)` (a context variable, so threads do not see each other's).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from torch import nn

KEYS = ("task_ids",)
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


def _pre(module: nn.Module, args: tuple, kwargs: dict):
    taken = {k: kwargs.pop(k) for k in KEYS if k in kwargs}
    deltas = kwargs.pop("deltas", None)
    stack = module.__dict__.setdefault("_deltatune_call", [])
    contexts = []
    if taken:
        contexts.append(batch(**taken))
    if deltas is not None:
        from .api import route

        contexts.append(route(module, deltas))
    for c in contexts:
        c.__enter__()
    stack.append(contexts)
    return args, kwargs


def _post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    stack = module.__dict__["_deltatune_call"]
    contexts = stack.pop()
    if not stack:
        del module.__dict__["_deltatune_call"]
    for c in reversed(contexts):
        c.__exit__(None, None, None)
    return output


def install_call_hooks(model: nn.Module) -> tuple:
    """Hooks on the top model that take `task_ids=` and `deltas=` off its calls; returns their handles."""
    return (model.register_forward_pre_hook(_pre, with_kwargs=True),
            model.register_forward_hook(_post, with_kwargs=True, always_call=True))
