"""SORSA (Cao 2024, "Singular Values and Orthonormal Regularized Singular Vectors Adaptation"): the principal part
U₀ diag(S₀) V₀ᵀ of the pretrained W (its top-r SVD) becomes trainable U diag(S) Vᵀ; the residual
W − U₀ diag(S₀) V₀ᵀ stays frozen; an orthonormality penalty γ(‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) joins the loss.

The base weight is never modified: the piece adds ΔW = U diag(S) Vᵀ − U₀ diag(S₀) V₀ᵀ, with (U₀, S₀, V₀) kept as
buffers, so W + ΔW = W_res + U diag(S) Vᵀ. ΔW is exactly zero at step 0, is a rank-2r LowRankDelta
([Vᵀ; V₀ᵀ], [U diag(S), −U₀ diag(S₀)]), and merges, unmerges and adds like any weight delta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.schema import Finite, PositiveInt, Range
from ..core.errors import TargetError
from ..core.layouts import Layout
from ..core.piece import Piece, add_to, master_dtype
from ..core.tensors import DeltaTensor, LowRankDelta


@register("sorsa")
@dataclass(frozen=True)
class SORSA(DeltaConfig):
    """Train the top-r singular vectors and values of each targeted Linear / Conv1D weight; `gamma` weighs the
    orthonormality penalty (per module, summed over modules; 0 turns it off)."""

    r: PositiveInt = 8
    gamma: Annotated[float, Finite(), Range(0)] = 4e-4

    def piece_class(self, module: Any = None) -> type[Piece]:
        return SORSAPiece


def sorsa_update(u: Tensor, s: Tensor, vh: Tensor, u0: Tensor, s0: Tensor, vh0: Tensor) -> LowRankDelta:
    """U diag(S) Vᵀ − U₀ diag(S₀) V₀ᵀ as one rank-2r low-rank update."""
    return LowRankDelta(torch.cat([vh, vh0]), torch.cat([u * s, -(u0 * s0)], 1))


class SORSAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: SORSA) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base).detach()
        if cfg.r > min(w.shape):
            raise TargetError(f"SORSA rank r={cfg.r} exceeds min(out={w.shape[0]}, in={w.shape[1]}) of module {path!r}; "
                              f"lower r or narrow `targets`")
        dtype = master_dtype(w.dtype)
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        u, s, vh = (t.to(dtype).contiguous() for t in (u[:, :cfg.r], s[:cfg.r], vh[:cfg.r]))
        self.U = nn.Parameter(u.clone())    # [out, r]
        self.S = nn.Parameter(s.clone())    # [r]
        self.Vh = nn.Parameter(vh.clone())  # Vᵀ: [r, in]
        self.register_buffer("U0", u)
        self.register_buffer("S0", s)
        self.register_buffer("Vh0", vh)
        self.gamma = cfg.gamma

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        x = x.to(self.Vh.dtype)
        # the trained and the initial principal part each through their own r columns, then subtracted: at step 0
        # both are the same computation on the same numbers, so the output is the base's exactly
        y = ((x @ self.Vh.t()) * self.S) @ self.U.t() - ((x @ self.Vh0.t()) * self.S0) @ self.U0.t()
        return add_to(acc, y)

    def regularizer(self) -> Tensor | None:
        if self.gamma == 0:
            return None
        eye = torch.eye(self.S.shape[0], dtype=self.U.dtype, device=self.U.device)
        return self.gamma * ((self.U.t() @ self.U - eye).square().sum() + (self.Vh @ self.Vh.t() - eye).square().sum())

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: SORSA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return sorsa_update(*(state[k] for k in ("U", "S", "Vh", "U0", "S0", "Vh0"))), None

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.S.shape[0]}, gamma={self.gamma}"

