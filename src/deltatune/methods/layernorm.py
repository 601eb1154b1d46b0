"""LayerNorm tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention"): train the scale γ (and bias β) of the
normalisation modules — LayerNorm, RMSNorm and their model-specific variants (layouts.is_norm).

The piece holds Δγ and Δβ (zeros at first); the adapted module is the same module with γ + Δγ and β + Δβ. Its
contribution is computed exactly by running the module's own forward with those parameters,
f(x; γ + Δγ, β + Δβ) − f(x; γ, β) — no re-implementation of any normalisation, and no division by γ. Because such
modules are affine in (γ, β) (f = n(x) ⊙ γ + β; Gemma's n(x) ⊙ (1 + γ) too), contributions of several deltas add up
exactly, and merging is γ += Δγ, β += Δβ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, TargetSpec, register

from ..core.layouts import Layout
from ..core.piece import Piece, master_dtype
from ..core.tensors import DeltaTensor, DenseDelta


@register("ln_tuning")
@dataclass(frozen=True)
class LNTuning(DeltaConfig):
    """Train Δγ (and Δβ where the module has a bias and `bias` is on) of every targeted normalisation module."""

    targets: TargetSpec = "all-norm"
    bias: bool = True

    def piece_class(self, module: Any = None) -> type[Piece]:
        return LNTuningPiece


class LNTuningPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Norm",)
    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: LNTuning) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        dtype = master_dtype(w.dtype)
        self.delta = nn.Parameter(torch.zeros_like(w, dtype=dtype))  # Δγ
        self.add_bias_delta(self.layout.bias(base), cfg.bias, dtype)  # Δβ

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        dtype = self.delta.dtype
        weight = self.layout.weight(base).to(dtype) + self.delta
        bias = self.layout.bias(base)
        if bias is not None:
            bias = bias.to(dtype) + self.bias if hasattr(self, "bias") else bias.to(dtype)
        out = self.layout.forward_with(base, x.to(dtype), weight, bias)
        if acc is base_out:  # alone: the adapted module's output itself
            return out.to(acc.dtype)
        return acc + (out - base_out.to(out.dtype)).to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return DenseDelta(state["delta"]), state.get("bias")
