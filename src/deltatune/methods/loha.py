"""LoHa (Hyeon-Woo et al., FedPara, ICLR 2022; LyCORIS): ΔW = s · (B₁A₁) ⊙ (B₂A₂), the Hadamard product of two
rank-r products, s = alpha / r. It reaches rank up to r² with 2r(in + out) parameters.

The product is itself one low-rank update with r² factors: (B₁A₁) ⊙ (B₂A₂) = B A where B [out, r²] holds every
product B₁[:, i] B₂[:, j] of a column of B₁ and a column of B₂, and A [r², in] every product A₁[i] A₂[j] of a row
of A₁ and a row of A₂ (the face-splitting / Khatri–Rao product). The forward uses that form (x → r² → out) when
it costs less than forming ΔW, and ΔW otherwise; `update` gives the same LowRankDelta, or DenseDelta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.schema import PositiveInt, Scale
from ..core.layouts import Layout
from ..core.piece import Piece, add_product, master_dtype
from ..core.tensors import DeltaTensor, DenseDelta, LowRankDelta
from .lora.inits import kaiming_a


@register("loha")
@dataclass(frozen=True)
class LoHa(DeltaConfig):
    """ΔW = alpha/r · (B₁A₁) ⊙ (B₂A₂) on each targeted Linear / Conv1D weight (A₂ starts at zero)."""

    r: PositiveInt = 8
    alpha: Scale = 8.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def piece_class(self, module: Any = None) -> type[Piece]:
        return LoHaPiece


def face_split(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(A [r₁r₂, in], B [out, r₁r₂]) with B A = (b1 a1) ⊙ (b2 a2)."""
    a = (a1[:, None, :] * a2[None, :, :]).reshape(a1.shape[0] * a2.shape[0], a1.shape[1])
    b = (b1[:, :, None] * b2[:, None, :]).reshape(b1.shape[0], b1.shape[1] * b2.shape[1])
    return a, b


def factored_is_cheaper(r: int, d_out: int, d_in: int) -> bool:
    """True when going through the r² factors costs less per input row than the dense ΔW."""
    return r * r * (d_out + d_in) < d_out * d_in


def loha_update(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, scale: float) -> DeltaTensor:
    """ΔW as a LowRankDelta of rank r² when that is the smaller form, else dense."""
    if factored_is_cheaper(a1.shape[0], b1.shape[0], a1.shape[1]):
        a, b = face_split(a1, b1, a2, b2)
        return LowRankDelta(a, b, scale)
    return DenseDelta((b1 @ a1) * (b2 @ a2) * scale)


class LoHaPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True  # rank r² factors where they are the smaller form

    def __init__(self, base: nn.Module, path: str, cfg: LoHa) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        d_out, d_in = (int(s) for s in w.shape)
        dtype, dev, r = master_dtype(w.dtype), w.device, cfg.r
        self.scale = cfg.scale
        # He init for three factors and A₂ = 0 (as FedPara/peft): ΔW = 0 at step 0, and every factor gets a gradient
        self.a1 = nn.Parameter(kaiming_a(r, d_in, dtype, dev))       # [r, in]
        self.b1 = nn.Parameter(kaiming_a(d_out, r, dtype, dev))      # [out, r]
        self.a2 = nn.Parameter(torch.zeros(r, d_in, dtype=dtype, device=dev))
        self.b2 = nn.Parameter(kaiming_a(d_out, r, dtype, dev))

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        d_out, d_in = self.b1.shape[0], self.a1.shape[1]
        if factored_is_cheaper(self.a1.shape[0], d_out, d_in):
            a, b = face_split(self.a1, self.b1, self.a2, self.b2)
            return add_product(acc, x.to(a.dtype) @ a.t(), b * self.scale)
        return add_product(acc, x, (self.b1 @ self.a1) * (self.b2 @ self.a2) * self.scale)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: LoHa, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return loha_update(state["a1"], state["b1"], state["a2"], state["b2"], cfg.scale), None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.a1.shape[0]}, scale={self.scale}"
