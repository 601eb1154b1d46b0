"""Which deltas act: the active composition (a name, a list of names, or a block), for good or for a while."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from ..compose import Block, Node, additive_names, as_node, leaves, per_row
from ..core.errors import ConfigError
from .weights import Names, names_of, unmerge, weight_conflict
from .slot import slot_of
from .state import lock_of, overrides, overriding, require_state, serialised, state_of


def set_active(model: nn.Module, node: Node | Sequence[str] | None) -> None:
    """Make `node` the active composition, unmerging first whatever it cannot keep merged (no checks of `node`)."""
    st = require_state(model)
    if node is not None and not isinstance(node, (str, Block)):
        node = as_node(node) if len(node) else None
    names = tuple(leaves(node)) if node is not None else ()
    mergeable_here = additive_names(node) if node is not None else set()
    if any(n not in mergeable_here for n in st.merged) or weight_conflict(model, names, st.merged):
        # a merged delta that stops being active (or now sits under a block that scales or selects it) must leave
        # the weights too; unmerging all of them, newest first, is exact even for updates that need the base (DoRA);
        # those still active keep acting unmerged
        unmerge(model)
    apply_plan(model, node)


def apply_plan(model: nn.Module, node: Node | None) -> None:
    """Record `node` as the active composition and give every slot its local plan (no checks, no unmerging)."""
    st = require_state(model)
    names = tuple(leaves(node)) if node is not None else ()
    st.active = names
    st.block = node
    for module in model.modules():
        slot = slot_of(module)
        if slot is not None:
            slot.internal.active = tuple(n for n in names if n in slot)
            slot.set_plan(node if slot.internal.active else None)


def check_composition(model: nn.Module, node: Node) -> None:
    """Everything about a composition that can be checked before it runs: names, nesting, and each block's own
    requirements on the deltas it names (`Block.check_deltas`)."""
    if isinstance(node, Block):
        node.check()
    names = leaves(node)
    names_of(model, names, ())
    if len(set(names)) != len(names):
        raise ConfigError(f"delta names repeat in {node!r}; each delta may appear once in a composition")
    if isinstance(node, Block):
        records = require_state(model).deltas
        for block in node.blocks():
            block.check_deltas(records)


@serialised
def activate(model: nn.Module, names: Names | Block) -> nn.Module:
    """Make `names` the active composition: one name, a list of names (their Sum), a block (dt.Stack,
    dt.Average, dt.Fuse, dt.Route, dt.Arrow, nested), or None for the bare model.

    If a merged delta would become inactive, every merged delta is unmerged first (as PEFT does). This changes the
    model's shared state: for one thread or one call only, use `dt.active` / `dt.route` / `model(x, deltas=...)`."""
    if names is None:
        require_state(model)
        set_active(model, None)
        return model
    node = as_node(names)
    check_composition(model, node)
    set_active(model, node)
    return model


def active_names(model: nn.Module) -> tuple[str, ...]:
    """The active deltas' names as this thread sees them (its own `dt.active` composition, else the model's)."""
    st = state_of(model)
    if st is None:
        return ()
    override = overrides().get(id(st))
    return st.active if override is None else tuple(leaves(override.node)) if override.node is not None else ()


def active_block(model: nn.Module) -> Node | None:
    """The active composition (a name or a block) as this thread sees it, None for the bare model."""
    st = state_of(model)
    if st is None:
        return None
    override = overrides().get(id(st))
    return st.block if override is None else override.node


@contextmanager
def active(model: nn.Module, names: Names | Block) -> Iterator[nn.Module]:
    """Activate `names` (anything `activate` takes) for the calls made inside this block by this thread (or asyncio
    task) only: other threads keep seeing their own composition, and the model's shared state is not changed — with
    one exception: merged deltas that `names` leaves out (or scales, or routes) are unmerged first, for good, under the
    model's lock, since weights are shared."""
    st = require_state(model)
    node = None if names is None else as_node(names)
    if node is not None:
        check_composition(model, node)
    kept = additive_names(node) if node is not None else set()
    if st.merged and (any(n not in kept for n in st.merged)
                      or weight_conflict(model, tuple(leaves(node)) if node is not None else (), st.merged)):
        with lock_of(model):
            unmerge(model)
    with overriding(st, node):
        yield model


@contextmanager
def route(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-example deltas: row b of every batch run inside goes through delta rows[b] (None: the bare model), in
    forward and in generate (every decode step), for this thread only (see `active`)."""
    with active(model, per_row(rows)):
        yield model
