"""RandLoRA (Albert et al., ICLR 2025, "RandLoRA: full-rank parameter-efficient fine-tuning of large models").

For a weight with smaller side m = min(in, out) and larger side M = max(in, out), n = ⌈m / r⌉ frozen random
rank-r bases B_i [M, r] (one per term) and one shared frozen A [r, m] give a full-rank update

    ΔWₘ = s · Σ_{i=1..n} B_i Λ_i A Γ_i        (s = alpha / r, an [M, m] matrix)

where Λ_i = diag(λ_i), λ_i ∈ R^r and Γ_i = diag(γ_i), γ_i ∈ R^m are trained: n·(r + m) numbers per module. As in
the paper, Γ scales the *smaller* side: ΔW = ΔWₘ when in ≤ out, and ΔW = ΔWₘᵀ when in > out. λ starts at 0 (ΔW = 0
at step 0) and γ at 1/m (PEFT's initialisation). The bases have unit variance (U(±√3)) and are regenerated from the
config's `seed`, never saved (projections.py); A is drawn column by column and B row by row, so the bases of
a smaller module are slices of a larger one's, as PEFT slices its shared bases.

Forward: the scaled bases S = [λ_i[k] A[k] ⊙ γ_i] ([n·r, m], the size of the smaller square of W) are formed by an
autograd function that saves only A, λ and γ for backward (the paper's memory-lean form), then x goes through
S and the flattened B — or, when the batch has more rows than that path saves, through the dense ΔW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.config import DeltaConfig, register
from ...core.schema import Dropout, NonNegativeInt, PositiveInt, Scale
from ...core.layouts import Layout
from ...core.piece import Piece, add_to, master_dtype
from ...core.tensors import DeltaTensor, DenseDelta
from . import projections as rp
from .vera import check_saved_shape

UNIT = math.sqrt(3.0)  # U(-√3, √3) has variance 1


@register("randlora")
@dataclass(frozen=True)
class RandLoRA(DeltaConfig):
    """ΔW = alpha/r · Σ_i B_i diag(λ_i) A diag(γ_i) over ⌈min(in, out)/r⌉ frozen random bases; trains λ_i and γ_i."""

    r: PositiveInt = 32
    alpha: Scale = 640.0
    dropout: Dropout = 0.0
    seed: NonNegativeInt = 0
    #: keep the bases A and B in each piece's saved state instead of regenerating them from `seed`: for bases drawn
    #: elsewhere (a PEFT file's shared randlora_A / randlora_B); they start as the seed's and stay frozen
    saved_projections: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def piece_class(self, module: Any = None) -> type[Piece]:
        return RandLoRAPiece


def n_bases(r: int, m: int) -> int:
    """⌈m / r⌉: enough rank-r terms to reach full rank m."""
    return -(-m // r)


def randlora_bases(seed: int, r: int, m: int, big: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(A [r, m], B [M, n, r]) for smaller side m and larger side M = big: B[:, i] is the basis B_i."""
    n = n_bases(r, m)
    a = rp.shared(("randlora-A", seed, r, m), lambda: rp.uniform(("randlora-A", seed, r), (m, r), UNIT).t().contiguous(),
                  dtype, device)
    b = rp.shared(("randlora-B", seed, r, n, big), lambda: rp.uniform(("randlora-B", seed, r, n), (big, n, r), UNIT),
                  dtype, device)
    return a, b


class ScaledBases(torch.autograd.Function):
    """S[i, k, j] = λ[i, k] · A[k, j] · γ[i, j], saving only A, λ and γ (not the [n, r, m] product) for backward."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, lam: Tensor, gam: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(a, lam, gam)
        return lam[:, :, None] * a[None] * gam[:, None, :]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None]:  # type: ignore[override]
        a, lam, gam = ctx.saved_tensors
        g_lam = torch.einsum("ikj,kj,ij->ik", grad, a, gam) if ctx.needs_input_grad[1] else None
        g_gam = torch.einsum("ikj,kj,ik->ij", grad, a, lam) if ctx.needs_input_grad[2] else None
        return None, g_lam, g_gam


def scaled_bases(a: Tensor, lam: Tensor, gam: Tensor) -> Tensor:
    """The scaled bases as an [n·r, m] matrix (row i·r + k = λ_i[k] A[k] ⊙ γ_i)."""
    s = ScaledBases.apply(a, lam, gam) if torch.is_grad_enabled() else lam[:, :, None] * a[None] * gam[:, None, :]
    return s.reshape(-1, a.shape[1])


def randlora_update(a: Tensor, b: Tensor, lam: Tensor, gam: Tensor, scale: float, in_is_small: bool) -> Tensor:
    """ΔW [out, in] = s · Σ_i B_i Λ_i A Γ_i (transposed when the input side is the larger one)."""
    p = b.reshape(b.shape[0], -1) @ scaled_bases(a, lam, gam) * scale  # [M, m]
    return p if in_is_small else p.t()


class RandLoRAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: RandLoRA) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        self.dims = (int(w.shape[0]), int(w.shape[1]))
        m = min(self.dims)
        n = n_bases(cfg.r, m)
        dtype = master_dtype(w.dtype)
        self.register_buffer("shape", torch.tensor(self.dims, dtype=torch.int64))  # saved: files need no model
        self.lambdas = nn.Parameter(torch.zeros(n, cfg.r, dtype=dtype, device=w.device))
        self.gammas = nn.Parameter(torch.full((n, m), 1.0 / m, dtype=dtype, device=w.device))
        self.scale = cfg.scale
        self._held = rp.HeldBases()
        if cfg.saved_projections:  # frozen, saved with the piece
            a, b = randlora_bases(cfg.seed, cfg.r, m, max(self.dims), dtype, w.device)
            self.register_buffer("A", a.clone())
            self.register_buffer("B", b.clone())

    @property
    def in_is_small(self) -> bool:
        return self.dims[1] <= self.dims[0]

    def bases(self) -> tuple[Tensor, Tensor]:
        ref = self.lambdas
        if self.cfg.saved_projections:
            return self.A.to(ref.dtype), self.B.to(ref.dtype)
        return self._held.get(ref.dtype, ref.device, lambda dt, dev: randlora_bases(
            self.cfg.seed, self.cfg.r, min(self.dims), max(self.dims), dt, dev))  # type: ignore[return-value]

    def dense_is_cheaper(self, rows: int) -> bool:
        """Per forward: forming ΔW (n·r·m·M, then rows·m·M) against going through n·r dimensions (rows·n·r·(m+M))."""
        nr, m, big = self.lambdas.numel(), min(self.dims), max(self.dims)
        return nr * m * big + rows * m * big < rows * nr * (m + big)

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        a, b = self.bases()
        h = x.to(a.dtype)
        if self.training and self.cfg.dropout > 0:
            h = F.dropout(h, self.cfg.dropout, True)
        rows = h.numel() // max(h.shape[-1], 1)
        if self.dense_is_cheaper(rows):
            y = h @ randlora_update(a, b, self.lambdas, self.gammas, self.scale, self.in_is_small).t()
        else:
            s, b_flat = scaled_bases(a, self.lambdas, self.gammas), b.reshape(b.shape[0], -1)
            y = (h @ s.t()) @ b_flat.t() if self.in_is_small else (h @ b_flat) @ s
            y = y * self.scale
        return add_to(acc, y)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.cfg.r}, bases={self.lambdas.shape[0]}, shape={self.dims}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        check_saved_shape(state_dict.get(prefix + "shape"), self.dims, f"the RandLoRA delta at {self.path!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: RandLoRA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """s · Σ_i B_i Λ_i A Γ_i with the bases regenerated from the seed (the shared table: a live piece's own)."""
        lam, gam = state["lambdas"], state["gammas"]
        d_out, d_in = (int(v) for v in state["shape"])
        dtype = torch.promote_types(lam.dtype, torch.float32)
        if "A" in state:  # saved_projections
            a, b = state["A"].to(dtype), state["B"].to(dtype)
        else:
            a, b = randlora_bases(cfg.seed, cfg.r, min(d_out, d_in), max(d_out, d_in), dtype, lam.device)
        return DenseDelta(randlora_update(a, b, lam.to(dtype), gam.to(dtype), cfg.scale, d_in <= d_out)), None
