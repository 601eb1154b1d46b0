"""Per-call information taken off the model's call: the keywords attached pieces declare (`Piece.keywords`, e.g.
Poly's `task_ids=`) and `deltas=` (one delta per example, for this call only).

    model(input_ids, task_ids=t)            # a keyword the model does not know: deltatune takes it off the call
    model(input_ids, deltas=["a", None])    # per-row deltas for this call only
    with dt.batch(task_ids=t): model.generate(input_ids)   # generate() refuses unknown keywords: use the context

Pieces read their values with `deltatune.core.calls.batch_value(key)` (a context variable, so threads do not see
each other's).
"""
from __future__ import annotations

from contextlib import ExitStack
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from ..core.calls import batch
from ..core.errors import ConfigError
from .activation import route
from .state import state_of

_calls: ContextVar[tuple[ExitStack, ...]] = ContextVar("deltatune_calls", default=())


def _pre(module: nn.Module, args: tuple, kwargs: dict):
    stack = ExitStack()  # pushed first: torch runs _post (always_call) even when this hook raises
    _calls.set((*_calls.get(), stack))
    st = state_of(module)
    keywords = st.keywords if st is not None else ()
    taken = {k: kwargs.pop(k) for k in keywords if k in kwargs}
    deltas = kwargs.pop("deltas", None)
    if (taken or deltas is not None) and torch.is_grad_enabled() and module.training \
            and getattr(module, "is_activation_checkpointing", getattr(module, "is_gradient_checkpointing", False)):
        raise ConfigError(f"per-call {', '.join(f'{k}=' for k in [*taken, *(['deltas'] if deltas is not None else [])])} "
                          f"end with the forward, before backward recomputes the checkpointed layers; with gradient "
                          f"checkpointing, run forward and backward inside `with dt.batch(...)` / "
                          f"`with dt.route(model, rows)` instead")
    try:
        if taken:
            stack.enter_context(batch(**taken))
        if deltas is not None:
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
    """Hooks on the top model that take per-call keywords and `deltas=` off its calls; returns their handles."""
    return (model.register_forward_pre_hook(_pre, with_kwargs=True),
            model.register_forward_hook(_post, with_kwargs=True, always_call=True))
