"""Fuse: AdapterFusion (Pfeiffer et al. 2021) over the children's outputs, with a trained fusion delta.

    Fuse(a, b, fusion)(h) = Σ_i α_i (W_v o_i + b_v), o_i = child_i(h), α = softmax_i((W_q h + b_q)·(W_k o_i + b_k) / T)

The attention itself is the fusion delta's piece (`Piece.fuse`, a piece that declares `fuses`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from ..core.errors import ConfigError, DeltaNameError
from .blocks import POSITIONS, Block, Context, Node, _init_children, run


class Fuse(Block):
    """AdapterFusion: attention over the children's outputs with the trained fusion delta `fusion` (dt.Fusion)."""

    additive = False
    positions = POSITIONS
    survives_detach = False
    reads_value = True

    def __init__(self, *children: Node, fusion: str) -> None:
        _init_children(self, children)
        if len(children) < 2:
            raise ConfigError(f"Fuse needs at least two deltas to attend over, got {list(children)}")
        if not isinstance(fusion, str) or not fusion:
            raise ConfigError(f"Fuse(..., fusion=) names the attached dt.Fusion delta, got {fusion!r}")
        object.__setattr__(self, "fusion", fusion)

    def check(self, inside: tuple[type, ...] = ()) -> None:
        super().check(inside)
        nested = [c for c in self.children if not isinstance(c, str)]
        if nested:
            raise ConfigError(f"Fuse attends over deltas, not blocks ({nested[0]!r}); fuse delta names")

    def check_deltas(self, deltas: Mapping[str, Any]) -> None:
        super().check_deltas(deltas)
        if self.fusion not in deltas:
            raise DeltaNameError(f"unknown delta(s) {[self.fusion]}; attached: {sorted(deltas)}")
        record = deltas[self.fusion]
        fused = record.config.follows()
        stray = [n for n in self.children if n not in fused]
        if stray:
            raise ConfigError(f"Fuse over {stray}: fusion delta {self.fusion!r} was built over {list(fused)}; fuse those "
                              f"(or a subset), or attach a dt.Fusion over these deltas")
        if not all(p.fuses for p in record.pieces.values()):
            raise ConfigError(f"Fuse(..., fusion={self.fusion!r}): that delta is not a fusion layer; attach a "
                              f"dt.Fusion(deltas=...) over the fused deltas and name it here")
        used = {p for n in self.children for p in deltas[n].paths}
        missing = sorted(used - set(record.paths))
        if missing:
            raise ConfigError(f"fusion delta {self.fusion!r} has no piece at {missing[:3]}, where the fused deltas "
                              f"act; attach dt.Fusion(deltas=...) over these deltas")

    def restrict(self, present: Callable[[str], bool]) -> Node | None:
        # absent children are the identity at this module but still take part in the attention
        return self if any(present(c) for c in self.children) else None  # type: ignore[arg-type]

    def names(self) -> list[str]:
        return [*super().names(), self.fusion]

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        fusion = ctx.piece(self.fusion, any_position=True)
        if fusion is None:
            raise ConfigError(f"Fuse: the fusion delta {self.fusion!r} has no piece at {ctx.path!r}, where the fused "
                              f"deltas act; attach dt.Fusion(deltas=...) after the deltas it fuses")
        candidates = [run(c, h.clone(), ctx) for c in self.children]
        return fusion.fuse(h, candidates)

    def __repr__(self) -> str:
        return f"Fuse({', '.join(map(repr, self.children))}, fusion={self.fusion!r})"
