"""What deltatune keeps on a model: the attached deltas' records, the active composition, merged names."""
from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, TypeVar

from torch import nn

from ..compose import Node, leaves
from ..core.config import DeltaConfig
from ..core.errors import StateError
from ..core.piece import Piece


@dataclass
class DeltaRecord:
    name: str
    config: DeltaConfig
    paths: list[str]
    trainable: bool
    #: path -> the Piece class there: its declared capabilities are what compositions check, without walking the model
    pieces: dict[str, type[Piece]] = field(default_factory=dict)


@dataclass
class ModelState:
    """What deltatune keeps on a model: attached deltas, the active set, merged names, the base's grad flags."""

    deltas: dict[str, DeltaRecord] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    block: Node | None = None  # the active composition (active = its delta names)
    merged: list[str] = field(default_factory=list)
    base_requires_grad: dict[str, bool] = field(default_factory=dict)
    call_hooks: tuple = ()  # handles of the top model's hooks that take per-call keywords off its calls
    #: per-call keywords the attached pieces read (Piece.keywords), taken off the model's calls
    keywords: frozenset[str] = frozenset()
    #: the last merge / unmerge into quantised weights: module path -> {max_abs, relative, relative_to_update} of
    #: the rounding that requantising introduced (empty when no quantised weight was rewritten)
    rounding: dict[str, dict[str, float]] = field(default_factory=dict)

    def refresh_keywords(self) -> None:
        self.keywords = frozenset(k for rec in self.deltas.values() for cls in set(rec.pieces.values()) for k in cls.keywords)


_STATE = "_deltatune_state"
_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_CREATE_LOCK = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def lock_of(model: nn.Module) -> threading.RLock:
    """The lock that serialises changes of `model`'s shared delta state (attach, load, detach, activate, merge, ...)."""
    lock = _LOCKS.get(model)
    if lock is None:
        with _CREATE_LOCK:
            lock = _LOCKS.setdefault(model, threading.RLock())
    return lock


def serialised(fn: F) -> F:
    """Run `fn(model, ...)` holding the model's lock: verbs that change shared state never interleave."""

    @wraps(fn)
    def locked(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with lock_of(model):
            return fn(model, *args, **kwargs)

    return locked  # type: ignore[return-value]


@dataclass
class Override:
    """A composition active for the current thread / task only (`dt.active`, `dt.route`, `model(x, deltas=...)`):
    the model's shared state is not touched; each slot restricts `node` to its pieces on first use."""

    node: Node | None
    names: frozenset[str]
    #: id(slot) -> (plans per position, input plans, the activation's block caches, the slot's generation then)
    per_slot: dict[int, tuple[dict, tuple, dict, int]] = field(default_factory=dict)


_overrides: ContextVar[dict[int, Override]] = ContextVar("deltatune_overrides", default={})


def overrides() -> dict[int, Override]:
    """id(ModelState) -> the composition this context has put on that model, if any."""
    return _overrides.get()


@contextmanager
def overriding(st: ModelState, node: Node | None) -> Iterator[Override]:
    """Make `node` the composition of `st`'s model for the current context only (nests; undone on exit)."""
    override = Override(node, frozenset(leaves(node)) if node is not None else frozenset())
    token = _overrides.set({**_overrides.get(), id(st): override})
    try:
        yield override
    finally:
        _overrides.reset(token)


def state_of(model: nn.Module) -> ModelState | None:
    return model.__dict__.get(_STATE)


def new_state(model: nn.Module, call_hooks: tuple) -> ModelState:
    st = ModelState(call_hooks=call_hooks)
    model.__dict__[_STATE] = st
    return st


def drop_state(model: nn.Module) -> None:
    st = model.__dict__.pop(_STATE, None)
    for handle in st.call_hooks if st is not None else ():
        handle.remove()


def require_state(model: nn.Module) -> ModelState:
    st = state_of(model)
    if st is None:
        raise StateError(f"no delta is attached to this {type(model).__name__}; call dt.attach(model, cfg, name) first")
    return st
