"""LoRA-XS (Bałazy et al., 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters").

The pretrained weight's truncated SVD W ≈ U_r Σ_r V_rᵀ gives two frozen factors, B = U_r [out, r] and
A = Σ_r V_rᵀ [r, in] (the official code's split); a small trainable R [r, r] sits between them:
ΔW = s · B R A with s = alpha / r. R starts at zero, so ΔW = 0 at step 0; r² numbers are trained per module.

The frozen factors are computed once, when the delta is attached, from the weight the module has then, and they are
*saved* with R. Recomputing them on load would need the base weight in `Delta.update` and an SVD that returns
the same singular vectors (signs and order of equal singular values are not unique across devices and
libraries); saved factors make the update exact anywhere. The cost: a LoRA-XS file holds r·(in + out) + r²
numbers per module — about a rank-r LoRA file — although only r² of them are trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import DeltaConfig, register
from ...core.schema import Dropout, PositiveInt, Scale
from ...core.errors import TargetError
from ...core.layouts import Layout
from ...core.piece import Piece, add_to, master_dtype
from ...core.tensors import DeltaTensor, LowRankDelta


@register("lora_xs")
@dataclass(frozen=True)
class LoRAXS(DeltaConfig):
    """ΔW = alpha/r · U_r R Σ_r V_rᵀ from the weight's rank-r SVD; trains only R [r, r] (starts at 0)."""

    r: PositiveInt = 8
    alpha: Scale = 16.0
    dropout: Dropout = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def piece_class(self, module: Any = None) -> type[Piece]:
        return LoRAXSPiece


def svd_frozen_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A = Σ_r V_rᵀ [r, in], B = U_r [out, r]) of the weight w [out, in], computed in float32."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return (s[:r, None] * vh[:r]).contiguous(), u[:, :r].contiguous()


class LoRAXSPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True  # frozen A, B are saved: the update needs no base

    def __init__(self, base: nn.Module, path: str, cfg: LoRAXS) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        d_out, d_in = (int(s) for s in w.shape)
        if cfg.r > min(d_out, d_in):
            raise TargetError(f"LoRA-XS rank r={cfg.r} exceeds min(out={d_out}, in={d_in}) of module {path!r}: the "
                              f"weight has only {min(d_out, d_in)} singular vectors; lower r or narrow `targets`")
        dtype = master_dtype(w.dtype)
        a, b = svd_frozen_factors(w, cfg.r)
        self.register_buffer("A", a.to(dtype))  # frozen, saved
        self.register_buffer("B", b.to(dtype))  # frozen, saved
        self.R = nn.Parameter(torch.zeros(cfg.r, cfg.r, dtype=dtype, device=w.device))
        self.scale = cfg.scale

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        h = x.to(self.R.dtype)
        if self.training and self.cfg.dropout > 0:
            h = F.dropout(h, self.cfg.dropout, True)
        y = ((h @ self.A.t()) @ self.R.t()) @ self.B.t()  # x Aᵀ Rᵀ Bᵀ through r dimensions
        return add_to(acc, y * self.scale)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.cfg.r}"

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: LoRAXS, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return LowRankDelta(state["R"] @ state["A"], state["B"], cfg.scale), None
