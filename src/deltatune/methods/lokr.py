"""LoKr (LyCORIS; Yeh et al., ICLR 2024): ΔW = s · W₁ ⊗ W₂, a Kronecker product, s = alpha / r.

With out = a·b and in = c·d (each split by `factorize`), W₁ is [a, c] and W₂ is [b, d]; W₂ — and W₁ too with
`decompose_both` — is a rank-r product B A when r is below half its larger side (the rule LyCORIS and peft use).
ΔW[i·b + k, j·d + l] = s · W₁[i, j] · W₂[k, l].

The forward never forms ΔW: viewing an input row x as X [c, d], the output row is s · W₁ X W₂ᵀ [a, b] read row
by row, which costs in·b + c·out per row instead of in·out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, register
from ..core.schema import Check, PositiveInt, Scale

from ..core.layouts import Layout
from ..core.piece import Piece, add_to, master_dtype
from ..core.tensors import DeltaTensor, DenseDelta
from .lora.inits import kaiming_a

Init = Literal["default", "lycoris"]
INITS = get_args(Init)
Factor = Annotated[int, Check(lambda f: f == -1 or f >= 1, "-1 (balanced split) or a positive integer")]


@register("lokr")
@dataclass(frozen=True)
class LoKr(DeltaConfig):
    """ΔW = alpha/r · W₁ ⊗ W₂ on each targeted Linear / Conv1D weight.

    `factor`: -1 splits each dimension into the most balanced pair of divisors; a positive value takes it as the
    first factor when it divides the dimension, else the largest divisor below it (and below the square root).
    `init`: "default" starts W₁ at zero (peft), "lycoris" starts W₂ (its A factor when low-rank) at zero.
    """

    r: PositiveInt = 8
    alpha: Scale = 8.0
    factor: Factor = -1
    decompose_both: bool = False
    init: Init = "default"

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def piece_class(self, module: Any = None) -> type[Piece]:
        return LoKrPiece


def factorize(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, dim // m): m = factor when it divides dim, else the largest divisor m ≤ √dim with m ≤ factor (-1: no bound)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    bound = dim if factor == -1 else factor
    m = max(k for k in range(1, math.isqrt(dim) + 1) if dim % k == 0 and k <= bound)
    return m, dim // m


def kron_shapes(d_out: int, d_in: int, cfg: LoKr) -> tuple[int, int, int, int, bool, bool]:
    """(a, b, c, d, w1 low-rank, w2 low-rank) for a [d_out, d_in] weight."""
    a, b = factorize(d_out, cfg.factor)
    c, d = factorize(d_in, cfg.factor)
    return a, b, c, d, cfg.decompose_both and cfg.r < max(a, c) / 2, cfg.r < max(b, d) / 2


def kron_factor(state: dict[str, Tensor] | nn.Module, name: str) -> Tensor:
    """W₁ or W₂ from a state dict or a piece: the full matrix, or its B A product when stored low-rank."""
    get = state.get if isinstance(state, dict) else lambda k: getattr(state, k, None)
    full = get(name)
    return full if full is not None else get(name + "_a") @ get(name + "_b")


class LoKrPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: LoKr) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        a, b, c, d, low1, low2 = kron_shapes(int(w.shape[0]), int(w.shape[1]), cfg)
        self.blocks = (a, b, c, d)
        self.scale = cfg.scale
        dtype, dev, r = master_dtype(w.dtype), w.device, cfg.r

        def init(rows: int, cols: int, zero: bool) -> nn.Parameter:
            t = torch.zeros(rows, cols, dtype=dtype, device=dev) if zero else kaiming_a(rows, cols, dtype, dev)
            return nn.Parameter(t)

        zero_w1 = cfg.init == "default"  # one factor starts at zero so ΔW = 0; the other gets the gradient
        if low1:
            self.w1_a, self.w1_b = init(a, r, zero_w1), init(r, c, False)  # W₁ = w1_a @ w1_b
        else:
            self.w1 = init(a, c, zero_w1)
        if low2:
            self.w2_a, self.w2_b = init(b, r, False), init(r, d, not zero_w1)
        else:
            self.w2 = init(b, d, not zero_w1)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        a, b, c, d = self.blocks
        w1 = kron_factor(self, "w1") * self.scale  # [a, c], small
        xs = x.reshape(-1, c, d).to(w1.dtype)
        if hasattr(self, "w2"):
            z = xs @ self.w2.t()                          # X W₂ᵀ: [N, c, b]
        else:
            z = (xs @ self.w2_b.t()) @ self.w2_a.t()
        y = torch.einsum("ij,njk->nik", w1, z).reshape(*x.shape[:-1], a * b)  # W₁ X W₂ᵀ: [N, a, b]
        return add_to(acc, y)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: LoKr, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        return DenseDelta(torch.kron(kron_factor(state, "w1"), kron_factor(state, "w2")) * cfg.scale), None

    def extra_repr(self) -> str:
        a, b, c, d = self.blocks
        return f"path={self.path!r}, w1=[{a}, {c}], w2=[{b}, {d}], scale={self.scale}"
