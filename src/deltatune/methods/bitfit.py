"""BitFit (Ben Zaken et al. 2022): train only the bias terms of the targeted modules.

The piece holds Δb (zeros at first): y' = y + Δb, i.e. ΔW = 0 and b' = b + Δb, so it merges, unmerges and sums like
any weight delta. A targeted module without a bias is refused by name when the delta is attached (Llama-style
models have none at all); narrow `targets` or `exclude` such modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.errors import TargetError, UnsupportedError
from ..core.layouts import Layout
from ..core.piece import Piece, master_dtype
from ..core.tensors import DeltaTensor, SparseDelta


@register("bitfit")
@dataclass(frozen=True)
class BitFit(DeltaConfig):
    """A trainable Δb on every targeted Linear / Conv1D / LayerNorm-style module; every one must have a bias."""

    def piece_class(self, module: Any = None) -> type[Piece]:
        return BitFitPiece


def zero_update(shape: tuple[int, ...], like: Tensor) -> SparseDelta:
    """ΔW = 0 of `shape`, stored as a sparse update with no entries."""
    return SparseDelta(torch.empty(0, dtype=torch.int64, device=like.device),
                       torch.empty(0, dtype=like.dtype, device=like.device), shape)


class BitFitPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Norm")
    mergeable: ClassVar[bool] = True
    needs_shape: ClassVar[bool] = True  # ΔW = 0 has the base weight's shape; the file holds Δb alone

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__(base, path, cfg)
        b = self.layout.bias(base)
        if b is None:
            raise TargetError(f"module {path!r} ({type(base).__name__}) has no bias, and BitFit trains biases only; "
                              f"narrow `targets` to modules with a bias or add it to `exclude` (models without any "
                              f"biases, such as Llama, have nothing for BitFit to train: use LNTuning, SSF or LoRA)")
        self.bias = nn.Parameter(torch.zeros_like(b, dtype=master_dtype(b.dtype)))  # Δb

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        if not torch.is_grad_enabled() and acc.dtype == self.bias.dtype:
            return acc.add_(self.bias)
        return (acc + self.bias).to(acc.dtype)  # in the piece's precision, rounded once

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """ΔW is zero, but its shape ([out, in]) is the base weight's, which the saved Δb does not give."""
        if weight is None:
            raise UnsupportedError("BitFit's ΔW is zero of the base weight's shape; pass the base (base=)")
        return zero_update(tuple(weight.shape), state["bias"]), state["bias"]
