"""Composition blocks: how several active deltas combine at each module (docs/composition.md).

A block is a tree whose leaves are delta names. At a module, for one position (weight, output, input), a
leaf is a function of the running value h: a weight-position piece returns h + c(x) (its contribution, from
the module's input x), an output/input-position piece returns g(h). A delta without a piece of that position
at the module is the identity there. The blocks:

    Stack(a, b)(h)        = b(a(h))
    Sum(a, b)(h)          = h + (a(h) - h) + (b(h) - h)
    Average(a, b, w)(h)   = h + w_a (a(h) - h) + w_b (b(h) - h)
    Fuse(a, b, fusion)(h) = Σ_i α_i (W_v o_i + b_v), o_i = child_i(h), α = softmax_i((W_q h + b_q)·(W_k o_i + b_k) / T)
    Route(rows)(h)[b]     = rows[b](h[b])       (row b of the batch; None = identity)
    Arrow(a, b, k)(h)[t]  = h[t] + Σ_{i ∈ top-k} softmax(|x[t]·v_i| / T)_i c_i(x[t])   (weight position only)

Stack, Sum and Average live here with the generic tree functions; Fuse, Route and Arrow have a file each.

For weight-position leaves (additive), Sum and Stack coincide: W + ΔW_a + ΔW_b.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from ..core.errors import ConfigError

Node = Union[str, "Block"]
POSITIONS = ("input", "weight", "output")


class Block(ABC):
    """A composition node over child nodes (delta names or blocks)."""

    children: tuple[Node, ...] = ()
    #: False for blocks that scale or select their children: a merged delta cannot sit below them
    additive: bool = True
    #: the positions (Piece.position) this block is defined for; others are an error at activation
    positions: tuple[str, ...] = ("input", "weight", "output", "attention")
    #: a block left with one child is that child (Sum, Stack)
    collapses: bool = False
    #: without one of its children the block still means what was asked (Sum, Stack, Average); others are dropped
    #: whole when a child is detached
    survives_detach: bool = True
    #: at the weight position, child(h) - h may depend on h (attention over the candidates): no sequential shortcut
    reads_value: bool = False
    #: the block may add into the running value in place when grad is off (the host then hands over its own output)
    in_place: bool = False

    def names(self) -> list[str]:
        """Every delta name below this block, in order."""
        out: list[str] = []
        for c in self.children:
            out.extend([c] if isinstance(c, str) else c.names())
        return out

    def check(self, inside: tuple[type, ...] = ()) -> None:
        """ConfigError for nesting that makes no sense; called at activation."""
        for c in self.children:
            if isinstance(c, Block):
                c.check((*inside, type(self)))
            elif not isinstance(c, str) or not c:
                raise ConfigError(f"{type(self).__name__} children are delta names or blocks, got {c!r}")

    def check_deltas(self, deltas: Mapping[str, Any]) -> None:
        """ConfigError unless this block can run over the attached deltas it names; called at activation, before
        anything changes. `deltas` maps every attached name to its record (`.config`, `.paths`, and `.pieces`:
        path -> Piece class, whose declared capabilities say what the piece can do). Default: every direct child's
        pieces act at a position this block is defined for. Blocks with more requirements extend this."""
        for name in self.children:
            if not isinstance(name, str):
                continue
            for path, piece in deltas[name].pieces.items():
                if piece.position not in self.positions:
                    raise ConfigError(f"{type(self).__name__} is not defined for {piece.position}-position deltas such as "
                                      f"{name!r} at {path!r} ({type(self).__name__} takes {', '.join(self.positions)}); "
                                      f"see docs/composition.md")

    def blocks(self) -> list["Block"]:
        """This block and every block below it."""
        return [self, *[b for c in self.children if isinstance(c, Block) for b in c.blocks()]]

    def restrict(self, present: Callable[[str], bool]) -> Node | None:
        """This block at one module and position: children with nothing there dropped (None if nothing is left)."""
        return self.map(lambda c: _restrict(c, present))

    def map(self, fn: Callable[[Node], Node | None]) -> Node | None:
        """This block with each child replaced by fn(child) (None drops it); a Sum/Stack left with one child is
        that child, an empty block is None."""
        kept = [k for k in (fn(c) for c in self.children) if k is not None]
        if not kept:
            return None
        return kept[0] if len(kept) == 1 and self.collapses else self._with(kept)

    def _with(self, children: list[Node]) -> "Block":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        object.__setattr__(clone, "children", tuple(children))
        return clone

    @abstractmethod
    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        """The value after this block given the value h before it, at ctx's module and position."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash((type(self), self.children))


def _restrict(node: Node, present: Callable[[str], bool]) -> Node | None:
    if isinstance(node, str):
        return node if present(node) else None
    return node.restrict(present)


def _init_children(block: Block, children: Sequence[Node]) -> None:
    if not children:
        raise ConfigError(f"{type(block).__name__} needs at least one delta name or block")
    object.__setattr__(block, "children", tuple(children))


class Stack(Block):
    """Children applied one after another: Stack(a, b)(h) = b(a(h))."""

    collapses = True

    def __init__(self, *children: Node) -> None:
        _init_children(self, children)

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        for c in self.children:
            h = run(c, h, ctx)
        return h


class Sum(Block):
    """Children applied to the same value, their changes added: h + Σ (child(h) - h)."""

    collapses = True

    def __init__(self, *children: Node) -> None:
        _init_children(self, children)

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        if ctx.position == "weight" and all(_h_free(c) for c in self.children):
            return Stack.run(self, h, ctx)  # type: ignore[arg-type]  # changes that do not depend on h: as Stack
        out = h
        for c in self.children:  # out of place: `out` never aliases h, children get their own copy
            out = out + (run(c, h.clone(), ctx) - h)
        return out


class Average(Block):
    """A weighted sum of the children's changes: h + Σ w_i (child_i(h) - h). Weights are used as given."""

    additive = False
    positions = POSITIONS

    def __init__(self, *children: Node, weights: Sequence[float] | None = None) -> None:
        _init_children(self, children)
        if weights is None:
            weights = [1.0 / len(children)] * len(children)
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(children) or not all(math.isfinite(w) for w in weights):
            raise ConfigError(f"Average needs one finite weight per child: {len(children)} children, weights {weights}")
        object.__setattr__(self, "weights", weights)

    def map(self, fn: Callable[[Node], Node | None]) -> Node | None:
        pairs = [(k, w) for k, w in ((fn(c), w) for c, w in zip(self.children, self.weights)) if k is not None]
        return Average(*[k for k, _ in pairs], weights=[w for _, w in pairs]) if pairs else None

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        out = h.clone()
        for c, w in zip(self.children, self.weights):
            change = (run(c, torch.zeros_like(h), ctx) if ctx.is_additive_leaf(c) else run(c, h.clone(), ctx) - h)
            out = out + w * change
        return out

    def __repr__(self) -> str:
        return f"Average({', '.join(map(repr, self.children))}, weights={list(self.weights)})"


@dataclass
class Context:
    """What a block needs at one module: the module's input and base output, its slot, the position."""

    x: Tensor
    y: Tensor | None
    module: Any
    slot: Any
    position: str
    #: caches valid for this activation at this module (a per-call composition has its own)
    cache: dict = field(default_factory=dict)

    @property
    def path(self) -> str:
        pieces = list(self.slot.values())
        return pieces[0].path if pieces else "?"

    def piece(self, name: str, any_position: bool = False):
        """The running piece of `name` at this module and position, or None (identity)."""
        slot = self.slot
        if name not in slot or name in slot.internal.merged:
            return None
        p = slot[name]
        return p if any_position or p.position == self.position else None

    def is_additive_leaf(self, node: Node) -> bool:
        return isinstance(node, str) and self.position == "weight"

    def rows(self, idx: Tensor) -> "Context":
        """This context for a subset of the batch's rows."""
        return Context(self.x.index_select(0, idx), None if self.y is None else self.y.index_select(0, idx),
                       self.module, self.slot, self.position, self.cache)


def run(node: Node, h: Tensor, ctx: Context) -> Tensor:
    """The value after `node` given the value h before it (h may be changed in place when grad is off)."""
    if isinstance(node, str):
        piece = ctx.piece(node)
        if piece is None:
            return h
        return piece(ctx.x, ctx.y if ctx.y is not None else h, h, ctx.module)
    return node.run(h, ctx)


def as_node(spec: Any) -> Node:
    """A node from what `dt.activate` accepts: a name, a block, or a list of names (their Sum)."""
    if isinstance(spec, (str, Block)):
        return spec
    if isinstance(spec, (list, tuple)):
        items = list(spec)
        if not items:
            raise ConfigError("an empty list of deltas; pass None for the bare model")
        return items[0] if len(items) == 1 else Sum(*items)
    raise ConfigError(f"expected a delta name, a list of names, a block (dt.Stack, dt.Sum, ...) or None, got {spec!r}")


def placements(node: Node) -> list[tuple[str, "Block"]]:
    """(delta name, the block directly above it) for every leaf below `node`."""
    if isinstance(node, str):
        return []
    out = [(c, node) for c in node.children if isinstance(c, str)]
    for c in node.children:
        if isinstance(c, Block):
            out.extend(placements(c))
    return out


def leaves(node: Node) -> list[str]:
    return [node] if isinstance(node, str) else node.names()


def without(node: Node | None, name: str) -> Node | None:
    """The composition after delta `name` is detached: Sum/Stack/Average lose that child; a block that does not
    survive the loss of a child (Fuse, Route, Arrow) is dropped whole (it no longer means what was asked)."""
    if node is None or node == name:
        return None
    if isinstance(node, str) or name not in node.names():
        return node
    if not node.survives_detach:
        return None
    return node.map(lambda c: without(c, name))


def _h_free(node: Node) -> bool:
    """At the weight position, whether node(h) - h does not depend on h (so children can run one after another)."""
    if isinstance(node, str):
        return True
    return not node.reads_value and all(_h_free(c) for c in node.children)


def additive_names(node: Node) -> set[str]:
    """Names reached from the root through Sum/Stack only: the deltas that may be merged into the weights."""
    if isinstance(node, str):
        return {node}
    if not node.additive:
        return set()
    out: set[str] = set()
    for c in node.children:
        out |= additive_names(c)
    return out
