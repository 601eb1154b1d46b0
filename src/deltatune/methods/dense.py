"""Dense: an arbitrary ΔW (and Δb) stored whole — the output of merges kept dense, and extraction residues."""
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


@register("dense")
@dataclass(frozen=True)
class Dense(DeltaConfig):
    """A trainable dense ΔW per targeted module (starts at zero); `bias` adds a Δb where the module has a bias."""

    bias: bool = False
    stores: ClassVar[type] = DenseDelta

    def piece_class(self, module: Any = None) -> type[Piece]:
        return DensePiece

    @classmethod
    def for_tensors(cls, tensors: dict[str, DeltaTensor], biases: dict[str, Tensor]) -> "Dense":
        return cls(targets=tuple(tensors), bias=bool(biases))


class DensePiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D", "Embedding")
    mergeable: ClassVar[bool] = True
    zero_if_missing: ClassVar[tuple[str, ...]] = ("bias",)  # merged/compressed files hold Δb only where it is not 0

    def __init__(self, base: nn.Module, path: str, cfg: Dense) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        dtype = master_dtype(w.dtype)
        self.delta = nn.Parameter(torch.zeros(w.shape, dtype=dtype, device=w.device))  # [out, in] view
        self.add_bias_delta(self.layout.bias(base), cfg.bias, dtype)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        out = self.layout.matmul(base, x.to(self.delta.dtype) if x.is_floating_point() else x, self.delta)
        if hasattr(self, "bias"):
            out = out + self.bias
        return acc + out.to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: DeltaConfig, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return DenseDelta(state["delta"]), state.get("bias")

    @classmethod
    def tensors_to_state(cls, dw: DeltaTensor, db: Tensor | None, layout: Layout) -> dict[str, Tensor]:
        if not isinstance(dw, DenseDelta):
            raise UnsupportedError(f"Dense stores dense updates; got a {type(dw).__name__} (use .to_dense())")
        state = {"delta": dw.weight.contiguous()}
        if db is not None:
            state["bias"] = db.contiguous()
        return state
