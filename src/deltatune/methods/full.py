"""Full: a module trained in full (e.g. a new classification head), saved whole with the delta.

The piece holds trainable copies of the module's weight and bias; its update relative to the base is
ΔW = W_trained − W_base, so it merges, unmerges and sums like any weight delta. Used directly
(`dt.Full(targets=...)`) or through any config's `modules_to_save`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from ..core.config import DeltaConfig, TargetSpec, register
from ..core.errors import UnsupportedError
from ..core.layouts import Layout
from ..core.piece import Piece
from ..core.tensors import DeltaTensor, DenseDelta


@register("full")
@dataclass(frozen=True)
class Full(DeltaConfig):
    """Train the targeted modules' weights and biases in full."""

    keeps_whole_modules: ClassVar[bool] = True
    targets: TargetSpec = ()  # no default: name the modules

    @classmethod
    def example(cls) -> "Full":
        return cls(targets="all-linear")  # the default names no module

    def piece_class(self, module: Any = None) -> type[Piece]:
        return FullPiece


class FullPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")
    mergeable: ClassVar[bool] = True
    needs_base: ClassVar[bool] = True  # ΔW = W_trained − W_base
    quantized_hosts: ClassVar[bool] = False  # a trained copy of a quantised layer would store the base's weights

    def __init__(self, base: nn.Module, path: str, cfg: DeltaConfig) -> None:
        super().__init__(base, path, cfg)
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

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        if weight is None:
            raise UnsupportedError("a module trained in full is a change against the base weight; pass it (base=)")
        w = state["weight"]
        dw = DenseDelta(layout.from_native(w) - weight.to(w.dtype))
        db = state["bias"] - bias.to(state["bias"].dtype) if "bias" in state and bias is not None else None
        return dw, db
