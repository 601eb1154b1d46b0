"""Per-example information for the coming forward passes (task ids for Poly/MHR, per-row deltas for Route).

    model(input_ids, task_ids=t)            # a keyword the model does not know: deltatune takes it off the call
    model(input_ids, deltas=["a", None])    # Route for this call only
    with dt.batch(task_ids=t): model.generate(input_ids)   # generate() refuses unknown keywords: use the context

Pieces read what they need with `batch_value(key)` (a context variable, so threads do not see each other's).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError

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


_calls: ContextVar[tuple[ExitStack, ...]] = ContextVar("deltatune_calls", default=())


def _pre(module: nn.Module, args: tuple, kwargs: dict):
    stack = ExitStack()  # pushed first: torch runs _post (always_call) even when this hook raises
    _calls.set((*_calls.get(), stack))
    taken = {k: kwargs.pop(k) for k in KEYS if k in kwargs}
    deltas = kwargs.pop("deltas", None)
    if (taken or deltas is not None) and torch.is_grad_enabled() and module.training \
            and getattr(module, "is_activation_checkpointing", getattr(module, "is_gradient_checkpointing", False)):
        raise ConfigError("per-call task_ids= / deltas= end with the forward, before backward recomputes the "
                          "checkpointed layers; with gradient checkpointing, run forward and backward inside "
                          "`with dt.batch(task_ids=...)` / `with dt.route(model, rows)` instead")
    try:
        if taken:
            stack.enter_context(batch(**taken))
        if deltas is not None:
            from .api import route

            stack.enter_context(route(module, deltas))
    except BaseException:
        stack.close()
        raise
    return args, kwargs


def _post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    calls = _calls.get()
    if calls:
        _calls.set(calls[:-1])
        calls[-1].close()
    return output


def install_call_hooks(model: nn.Module) -> tuple:
    """Hooks on the top model that take `task_ids=` and `deltas=` off its calls; returns their handles."""
    return (model.register_forward_pre_hook(_pre, with_kwargs=True),
            model.register_forward_hook(_post, with_kwargs=True, always_call=True))
