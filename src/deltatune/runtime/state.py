"""What deltatune keeps on a model: the attached deltas' records, the active composition, merged names."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..compose import Node
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

    def refresh_keywords(self) -> None:
        self.keywords = frozenset(k for rec in self.deltas.values() for cls in set(rec.pieces.values()) for k in cls.keywords)


_STATE = "_deltatune_state"


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
