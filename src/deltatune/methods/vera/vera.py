"""VeRA (Kopiczko et al., ICLR 2024, "VeRA: Vector-based Random Matrix Adaptation"): ΔW = Λ_b B Λ_d A.

A [r, in] and B [out, r] are frozen random matrices (Kaiming uniform, U(±√(6/fan_in))) shared by every module of
the same size; only the vectors d ∈ R^r (Λ_d = diag(d), starts at `d_initial`) and b ∈ R^out (Λ_b = diag(b), starts
at 0, so ΔW = 0 at step 0) are trained: r + out numbers per module.

A and B are never saved: they are regenerated from the config's `seed` (projections.py), and pieces on
modules of one size hold the same tensors. A depends on (seed, r, in) and B on (seed, r, out), and B is drawn
row by row, so the B of a smaller `out` is the first rows of a larger one (as PEFT slices its one shared B).
Files hold d, b and the module's [out, in] size, so `Delta.update` rebuilds ΔW without a model.
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
from ...core.errors import ShapeMismatchError
from ...core.layouts import Layout
from ...core.piece import Piece, add_to, master_dtype
from ...core.tensors import DeltaTensor, LowRankDelta
from . import projections as rp


@register("vera")
@dataclass(frozen=True)
class VeRA(DeltaConfig):
    """ΔW = diag(b) B diag(d) A with frozen seeded random A [r, in], B [out, r]; trains d (r) and b (out)."""

    r: PositiveInt = 256
    d_initial: Scale = 0.1  # d = b = 0 would get no gradient
    dropout: Dropout = 0.0
    seed: NonNegativeInt = 0
    #: keep A and B in each piece's saved state instead of regenerating them from `seed`: for projections drawn
    #: elsewhere (a PEFT file's shared vera_A / vera_B); they start as the seed's and stay frozen
    saved_projections: bool = False

    def piece_class(self, module: Any = None) -> type[Piece]:
        return VeRAPiece


def vera_projections(seed: int, r: int, d_out: int, d_in: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]): the shared frozen matrices of VeRA for this seed, rank and size."""
    a = rp.shared(("vera-A", seed, r, d_in), lambda: rp.uniform(("vera-A", seed, r, d_in), (r, d_in), math.sqrt(6 / d_in)),
                  dtype, device)
    b = rp.shared(("vera-B", seed, r, d_out), lambda: rp.uniform(("vera-B", seed, r), (d_out, r), math.sqrt(6 / r)),
                  dtype, device)
    return a, b


def check_saved_shape(saved: Tensor | None, dims: tuple[int, int], what: str) -> None:
    """ShapeMismatchError unless a file's recorded [out, in] size is this module's."""
    if saved is not None and (saved.numel() != 2 or tuple(int(v) for v in saved.reshape(-1)) != dims):
        raise ShapeMismatchError(f"{what} was saved for a weight of size {saved.reshape(-1).tolist()} but this module's "
                                 f"weight is {list(dims)} ([out, in]); load it into the model it was trained on")


class VeRAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: VeRA) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        self.dims = (int(w.shape[0]), int(w.shape[1]))
        dtype = master_dtype(w.dtype)
        self.register_buffer("shape", torch.tensor(self.dims, dtype=torch.int64))  # saved: files need no model
        self.lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), dtype=dtype, device=w.device))
        self.lambda_b = nn.Parameter(torch.zeros(self.dims[0], dtype=dtype, device=w.device))
        self._held = rp.HeldBases()
        if cfg.saved_projections:  # frozen, saved with the piece
            a, b = vera_projections(cfg.seed, cfg.r, *self.dims, dtype, w.device)
            self.register_buffer("A", a.clone())
            self.register_buffer("B", b.clone())

    def projections(self) -> tuple[Tensor, Tensor]:
        """(A, B) in the dtype and on the device of the trained vectors."""
        ref = self.lambda_d
        if self.cfg.saved_projections:
            return self.A.to(ref.dtype), self.B.to(ref.dtype)
        return self._held.get(ref.dtype, ref.device, lambda dt, dev: vera_projections(
            self.cfg.seed, self.cfg.r, *self.dims, dt, dev))  # type: ignore[return-value]

    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        a, b = self.projections()
        h = x.to(a.dtype)
        if self.training and self.cfg.dropout > 0:
            h = F.dropout(h, self.cfg.dropout, True)
        y = ((h @ a.t()) * self.lambda_d) @ b.t() * self.lambda_b  # x Aᵀ Λ_d Bᵀ Λ_b, never out × in
        return add_to(acc, y)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, r={self.cfg.r}, shape={self.dims}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        check_saved_shape(state_dict.get(prefix + "shape"), self.dims, f"the VeRA delta at {self.path!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: VeRA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """Λ_b B Λ_d A with A, B regenerated from the seed (the shared table: a live piece's own copies)."""
        d, b_vec = state["lambda_d"], state["lambda_b"]
        dims = (int(state["shape"][0]), int(state["shape"][1]))
        dtype = torch.promote_types(d.dtype, torch.float32)
        if "A" in state:  # saved_projections
            a, b = state["A"].to(dtype), state["B"].to(dtype)
        else:
            a, b = vera_projections(cfg.seed, cfg.r, *dims, dtype, d.device)
        return LowRankDelta(d.to(a.dtype)[:, None] * a, b_vec.to(b.dtype)[:, None] * b, 1.0), None
