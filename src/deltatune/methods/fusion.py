"""AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of frozen deltas, as its own small delta.

A `Fusion` delta goes on every module where the deltas it fuses act and is used by the `Fuse` block
(`dt.activate(model, dt.Fuse("a", "b", fusion="ab"))`). At a module, with h the value before the block and
o_i the value after delta i alone:

    q = W_q h + b_q,   k_i = W_k o_i + b_k,   v_i = W_v o_i + b_v,   α = softmax_i(q·k_i / T),   out = Σ_i α_i v_i

W_v starts as the identity and W_q, W_k small, so the untrained fusion is close to the mean of the o_i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compose import POSITIONS
from ..core.config import DeltaConfig, register
from ..core.schema import Check, Positive
from ..core.errors import TargetError
from ..runtime import slot_of
from ..core.piece import Piece, master_dtype


#: Fusion.deltas: the attached deltas fused (a list, kept as a tuple)
DeltaNames = Annotated[tuple[str, ...], Check(lambda names: len(names) >= 2 and all(names),
                                              "the names of at least two attached deltas")]


@register("fusion")
@dataclass(frozen=True)
class Fusion(DeltaConfig):
    """Attention over the deltas `deltas` at each module where they act (targets come from them)."""

    deltas: DeltaNames = ()
    temperature: Positive = 1.0
    init_std: Positive = 0.02

    def follows(self) -> tuple[str, ...]:
        return self.deltas

    @classmethod
    def example(cls) -> "Fusion":
        return cls(deltas=("a", "b"))  # a fusion goes on attached deltas: attach "a" and "b" first

    def piece_class(self, module: Any = None) -> type[Piece]:
        return FusionPiece


def value_features(piece: Piece, module: nn.Module) -> int:
    """The size of the value a piece acts on at `module` (its `features`, else the module's output width)."""
    f = getattr(piece, "features", None)
    if f is not None:
        return int(f)
    layout = piece.layout
    if layout is not None:
        return layout.shape(module)[0 if piece.position != "input" else 1]
    raise TargetError(f"cannot tell the width of {type(piece).__name__} at {piece.path!r}; set `features` on the piece")


class FusionPiece(Piece):
    position: ClassVar[str] = "block"  # run only by Fuse blocks, never on its own
    supported: ClassVar[tuple[str, ...] | None] = None  # any module where the fused deltas act
    fuses: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: Fusion) -> None:
        super().__init__(base, path, cfg)
        slot = slot_of(base)
        fused = [slot[n] for n in cfg.deltas if slot is not None and n in slot]
        other = [p for p in fused if p.position not in POSITIONS]
        if other:
            raise TargetError(f"Fusion attends over the values deltas produce at the weight, output or input position; "
                              f"{type(other[0]).__name__} at {path!r} acts at the {other[0].position} position (extra keys "
                              f"or tokens), which Fuse is not defined for (docs/composition.md)")
        if len({p.position for p in fused}) > 1:
            raise TargetError(f"Fusion at {path!r}: the fused deltas act at different positions of this module "
                              f"({sorted({p.position for p in fused})}); AdapterFusion attends over one value, so fuse "
                              f"deltas of one position")
        widths = {value_features(p, base) for p in fused}
        if len(widths) != 1:
            raise TargetError(f"Fusion at {path!r}: the fused deltas act on values of different widths {sorted(widths)} "
                              f"(different positions); fuse deltas of one position")
        d = widths.pop()
        ref = next((p for p in base.parameters() if p.is_floating_point()), None)  # not a quantised weight's bytes
        dtype = master_dtype(ref.dtype) if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        self.features = d
        self.temperature = cfg.temperature
        def param(init: Tensor) -> nn.Parameter:
            return nn.Parameter(init.to(dtype=dtype, device=device))

        # flat parameter names: a delta file stores `<module path>.<name>` (no nested submodules)
        self.wq = param(torch.randn(d, d) * cfg.init_std)
        self.wk = param(torch.randn(d, d) * cfg.init_std)
        self.wv = param(torch.eye(d))
        self.bq, self.bk, self.bv = (param(torch.zeros(d)) for _ in range(3))

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        return acc  # a fusion layer does nothing unless a Fuse block runs it

    def fuse(self, h: Tensor, candidates: list[Tensor]) -> Tensor:
        """Σ_i softmax_i(q·k_i / T) v_i with q from h and k_i, v_i from candidate i."""
        dtype = self.wq.dtype
        o = torch.stack([c.to(dtype) for c in candidates], dim=-2)         # [..., n, d]
        q = F.linear(h.to(dtype), self.wq, self.bq).unsqueeze(-2)          # [..., 1, d]
        scores = (q * F.linear(o, self.wk, self.bk)).sum(-1) / self.temperature  # [..., n]
        alpha = torch.softmax(scores, dim=-1).unsqueeze(-1)
        return (alpha * F.linear(o, self.wv, self.bv)).sum(-2).to(h.dtype)
