"""A weight update made plain low-rank: the exact ΔW (and Δb) truncated by SVD to a given rank, with the relative
error it costs. Shared by the engine's `convert_rank` registrations and by `deltatune export --format vllm`."""
from __future__ import annotations

import torch
from torch import Tensor

from ..core.tensors import DeltaTensor, LowRankDelta


def truncate(dw: DeltaTensor, rank: int, db: Tensor | None = None) -> tuple[LowRankDelta, float]:
    """(the best rank-`rank` approximation of ΔW, its relative Frobenius error). A bias change `db` cannot be held by
    plain factors: it is dropped and counted in the error, which is then that of the augmented update [ΔW | Δb]
    (the map x ↦ ΔW x + Δb on inputs [x; 1])."""
    exact = dw.to_dense().double()
    low = dw.svd(rank)
    missed = float((exact - low.to_dense().double()).norm()) ** 2
    total = float(exact.norm()) ** 2
    if db is not None:
        bias = float(db.double().norm()) ** 2
        missed, total = missed + bias, total + bias
    return low, (missed / total) ** 0.5 if total > 0 else 0.0


def pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors A [r, in], B [out, r] padded with zeros to rank `rank` (an SVD of a matrix of lower rank may return
    fewer factors; a file of one rank throughout needs no per-module rank patterns)."""
    if a.shape[0] < rank:
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
    return a, b

