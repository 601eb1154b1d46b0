"""SSF (Lian et al. 2022, "Scaling & Shifting Your Features"): a learned scale γ and shift β per output feature.

After a module with output y = x Wᵀ + b the features become y' = γ ⊙ y + β (γ starts at 1, β at 0). Folded into
the module this is W' = diag(γ) W and b' = γ ⊙ b + β, so the delta is a weight update that depends on the base:
ΔW = diag(γ − 1) W, Δb = (γ − 1) ⊙ b + β. On a normalisation module (y = n(x) ⊙ g + c) the same formulas act on its
1-D scale g and bias c. A module without a bias runs β unmerged: there is no bias to fold it into.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.errors import UnsupportedError
from ..core.layouts import Layout
from ..core.piece import Piece, master_dtype
from ..core.tensors import DeltaTensor, DenseDelta


@register("ssf")
@dataclass(frozen=True)
class SSF(DeltaConfig):
    """Scale and shift every output feature of the targeted Linear / Conv1D / LayerNorm-style modules."""

    def piece_class(self, module: Any = None) -> type[Piece]:
        return SSFPiece


def _rows(v: Tensor, w: Tensor) -> Tensor:
    """`v` ([out]) shaped to scale the rows of `w` ([out, in], or [out] for a normalisation module's scale)."""
    return v.reshape(-1, *([1] * (w.dim() - 1)))


def weight_update(scale: Tensor, weight: Tensor) -> DenseDelta:
    """ΔW = diag(γ − 1) W (in float32 or wider: half-precision weights are not rounded before merging)."""
    dtype = torch.promote_types(scale.dtype, torch.float32)
    return DenseDelta(_rows(scale.to(dtype) - 1, weight) * weight.to(dtype))


def bias_update(scale: Tensor, shift: Tensor, bias: Tensor | None) -> Tensor:
    """Δb = (γ − 1) ⊙ b + β; β alone for a module without a bias."""
    dtype = torch.promote_types(scale.dtype, torch.float32)
    if bias is None:
        return shift.to(dtype)
    return (scale.to(dtype) - 1) * bias.to(dtype) + shift.to(dtype)


class SSFPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Norm")
    mergeable: ClassVar[bool] = True
    needs_base: ClassVar[bool] = True  # ΔW = diag(γ − 1) W

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        dtype = master_dtype(w.dtype)
        self.scale = nn.Parameter(torch.ones(w.shape[0], dtype=dtype, device=w.device))   # γ
        self.shift = nn.Parameter(torch.zeros(w.shape[0], dtype=dtype, device=w.device))  # β

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        """acc + (γ − 1) ⊙ y + β for the base output y (alone: γ ⊙ y + β)."""
        if not torch.is_grad_enabled() and acc.dtype == self.scale.dtype:
            if acc is base_out:
                return acc.mul_(self.scale).add_(self.shift)
            return acc.add_(base_out * (self.scale - 1)).add_(self.shift)
        change = base_out.to(self.scale.dtype) * (self.scale - 1) + self.shift
        return acc + change.to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        if weight is None:
            raise UnsupportedError("SSF's update rescales the base weight; pass it (base=)")
        return weight_update(state["scale"], weight), bias_update(state["scale"], state["shift"], bias)
