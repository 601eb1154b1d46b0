"""Full: a module trained in full (e.g. a new classification head), saved whole with the delta.

The piece holds trainable copies of the module's weight and bias; its update relative to the base is
ΔW = W_trained − W_base, so it merges, unmerges and sums like any weight delta. Used directly
(`dt.Full(targets=...)`) or through any config's `modules_to_save`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import DeltaConfig, register
from ..layouts import layout_of
from ..piece import Piece
from ..tensors import DeltaTensor, DenseDelta


@register("full")
@dataclass(frozen=True)
class Full(DeltaConfig):
    """Train the targeted modules' weights and biases in full."""

    targets: Any = ()

    def piece_class(self, module: Any = None) -> type[Piece]:
        return FullPiece


class FullPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__(base, path, cfg)
        self.layout = layout_of(base, path, self.supported)
        self.weight = nn.Parameter(base.weight.detach().clone())
        bias = self.layout.bias(base)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        out = self.layout.matmul(base, x.to(self.weight.dtype) if x.is_floating_point() else x,
                                 self.layout.from_native(self.weight))
        if hasattr(self, "bias"):
            out = out + self.bias
        out = out.to(acc.dtype)
        if acc is base_out:
            return out
        return acc + (out - base_out)

    def delta_weight(self, base: nn.Module) -> DeltaTensor:
        return DenseDelta(self.layout.from_native(self.weight.detach()) - self.layout.weight(base).detach())

    def delta_bias(self, base: nn.Module) -> Tensor | None:
        if not hasattr(self, "bias"):
            return None
        return self.bias.detach() - self.layout.bias(base).detach()

    @torch.no_grad()
    def unmerge_from(self, base: nn.Module, layout) -> None:
        # after merging, base holds W_trained; the base weight cannot be recovered from it, so we keep it
        w = base.weight
        w.copy_(self._merged_w)
        if hasattr(self, "bias"):
            base.bias.copy_(self._merged_b)
        del self._merged_w
        if hasattr(self, "_merged_b"):
            del self._merged_b

    @torch.no_grad()
    def merge_into(self, base: nn.Module, layout) -> None:
        self._merged_w = base.weight.detach().clone()
        if hasattr(self, "bias"):
            self._merged_b = base.bias.detach().clone()
        super().merge_into(base, layout)
