"""AdapterBias (Fu et al. 2022, "AdapterBias: Parameter-efficient Token-dependent Representation Shift for Adapters
in NLP Tasks"): a token-dependent shift of a module's output along one learned direction.

For a targeted module with output h = W x + b, every token's output becomes

    h' = h + (h · w_α) v            w_α, v ∈ R^{d_out}

w_α scores how much of the shift each token gets, v is the shift. v starts at zero, so the delta is the identity
at first; w_α starts small and random (uniform in ±1/√d_out, like a fresh nn.Linear(d_out, 1)). Since
h' = (I + v w_αᵀ)(W x + b), the delta is a weight update that depends on the base:

    ΔW = v (w_αᵀ W)  (rank one),    Δb = v (w_α · b)

so it merges, unmerges, and takes part in arithmetic and merging like any weight delta (given the base).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, TargetSpec, register
from ..core.errors import UnsupportedError
from ..core.layouts import Layout
from ..core.piece import Piece, master_dtype
from ..core.tensors import DeltaTensor, LowRankDelta


@register("adapter_bias")
@dataclass(frozen=True)
class AdapterBias(DeltaConfig):
    r"""A shift (h · w_α) v on the output of every targeted Linear / Conv1D module.

    The default targets are the feed-forward output projections of Llama-style models (`down_proj`). Elsewhere,
    pass them: GPT-2 `r"(.*\.)?h\.\d+\.mlp\.c_proj"` (`c_proj` alone also matches the attention's output
    projection), BERT `r"(.*\.)?layer\.\d+\.output\.dense"`."""

    targets: TargetSpec = ("down_proj",)

    def piece_class(self, module: Any = None) -> type[Piece]:
        return AdapterBiasPiece


class AdapterBiasPiece(Piece):
    """h ↦ h + (h · w_α) v on the module's output: W' = (I + v w_αᵀ) W, b' = (I + v w_αᵀ) b."""

    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    position: ClassVar[str] = "output"
    mergeable: ClassVar[bool] = True
    needs_base: ClassVar[bool] = True  # ΔW = v (w_αᵀ W)

    def __init__(self, base: nn.Module, path: str, cfg: AdapterBias) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        d_out = w.shape[0]
        kw = {"dtype": master_dtype(w.dtype), "device": w.device}
        bound = 1.0 / math.sqrt(d_out)
        self.w_alpha = nn.Parameter(torch.empty(d_out, **kw).uniform_(-bound, bound))  # w_α
        self.v = nn.Parameter(torch.zeros(d_out, **kw))  # v: zero, so the identity at first

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        h = acc.to(self.v.dtype)
        return acc + ((h @ self.w_alpha).unsqueeze(-1) * self.v).to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: AdapterBias, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        if weight is None:
            raise UnsupportedError("AdapterBias's update is v (w_αᵀ W), a change of the base weight; pass it (base=)")
        dtype = torch.promote_types(state["v"].dtype, torch.float32)
        v, w_alpha = state["v"].to(dtype), state["w_alpha"].to(dtype)
        dw = LowRankDelta((w_alpha @ weight.to(dtype))[None, :], v[:, None])  # A = w_αᵀ W [1, in], B = v [out, 1]
        db = None if bias is None else v * (w_alpha @ bias.to(dtype))
        return dw, db
