"""Delta tensors: the algebra that merging, compression and serving share.

All of them represent a [out, in] update ΔW in the linear view (see layouts.py). Arithmetic stays exact:
low-rank + low-rank concatenates factors, sparse + sparse unions indices; mixed kinds fall back to dense.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ShapeMismatchError, UnsupportedError


class DeltaTensor(ABC):
    """Abstract: DenseDelta, LowRankDelta and SparseDelta implement the storage-specific operations."""

    shape: tuple[int, ...]

    @abstractmethod
    def to_dense(self) -> Tensor:
        """The update as one dense [out, in] tensor."""

    @property
    @abstractmethod
    def nnz(self) -> int:
        """Numbers stored."""

    def norm(self) -> float:
        """Frobenius norm of the dense update."""
        return float(torch.linalg.vector_norm(self.to_dense().double()))

    @abstractmethod
    def scaled(self, c: float) -> "DeltaTensor":
        """This update times a scalar, in the same storage kind."""

    def svd(self, rank: int) -> "LowRankDelta":
        """Best rank-`rank` approximation (Eckart–Young) as a LowRankDelta with scale 1."""
        if len(self.shape) != 2:
            raise UnsupportedError(f"a rank-{rank} approximation needs a matrix; this update has shape "
                                   f"{tuple(self.shape)} (a norm's scale vector): keep it dense")
        return _lowrank_from_svd(*torch.linalg.svd(self.to_dense().float(), full_matrices=False), rank)

    def _check(self, other: "DeltaTensor") -> None:
        if not isinstance(other, DeltaTensor):
            raise TypeError(f"cannot combine a delta tensor with {type(other).__name__}")
        if tuple(other.shape) != tuple(self.shape):
            raise ShapeMismatchError(f"delta tensor shapes differ: {tuple(self.shape)} vs {tuple(other.shape)}")

    def __add__(self, other: "DeltaTensor") -> "DeltaTensor":
        self._check(other)
        return DenseDelta(self.to_dense() + other.to_dense())

    def __sub__(self, other: "DeltaTensor") -> "DeltaTensor":
        return self + other.scaled(-1.0)

    def __neg__(self) -> "DeltaTensor":
        return self.scaled(-1.0)

    def __mul__(self, c: float) -> "DeltaTensor":
        if isinstance(c, DeltaTensor) or not isinstance(c, (int, float)):
            raise TypeError("delta tensors multiply by Python scalars only")
        return self.scaled(float(c))

    __rmul__ = __mul__


@dataclass(eq=False)
class DenseDelta(DeltaTensor):
    weight: Tensor

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.weight.shape)

    def to_dense(self) -> Tensor:
        return self.weight

    @property
    def nnz(self) -> int:
        return self.weight.numel()

    def scaled(self, c: float) -> "DenseDelta":
        return DenseDelta(self.weight * c)


@dataclass(eq=False)
class LowRankDelta(DeltaTensor):
    """ΔW = scale · B @ A with A [r, in] and B [out, r]."""

    A: Tensor
    B: Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(f"LowRankDelta needs A [r, in] and B [out, r]; got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def to_dense(self) -> Tensor:
        a, b = self.A, self.B
        if a.dtype in (torch.float16, torch.bfloat16) or b.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()  # the product of half-precision factors is formed in float32
        return (b @ a) * self.scale

    @property
    def nnz(self) -> int:
        return self.A.numel() + self.B.numel()

    def norm(self) -> float:
        a, b = self.A.double(), self.B.double()
        return abs(self.scale) * math.sqrt(max(float(torch.trace((a @ a.t()) @ (b.t() @ b))), 0.0))

    def scaled(self, c: float) -> "LowRankDelta":
        return LowRankDelta(self.A, self.B, self.scale * c)

    def __add__(self, other: DeltaTensor) -> DeltaTensor:
        self._check(other)
        if isinstance(other, LowRankDelta):
            return LowRankDelta(torch.cat([self.A, other.A]), torch.cat([self.B * self.scale, other.B * other.scale], 1))
        return super().__add__(other)

    def svd(self, rank: int) -> "LowRankDelta":
        # QR of both factors keeps the SVD at r x r instead of out x in.
        qb, rb = torch.linalg.qr(self.B.float())
        qa, ra = torch.linalg.qr(self.A.float().t())
        u, s, vh = torch.linalg.svd(rb @ ra.t() * self.scale, full_matrices=False)
        return _lowrank_from_svd(qb @ u, s, vh @ qa.t(), rank)


@dataclass(eq=False)
class SparseDelta(DeltaTensor):
    """ΔW with `values` at flat row-major `index` (int64) of a tensor of `shape`; indices are unique."""

    index: Tensor
    values: Tensor
    shape: tuple[int, ...]  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.index.dtype != torch.int64 or self.index.shape != self.values.shape or self.index.dim() != 1:
            raise ShapeMismatchError("SparseDelta needs 1-D int64 index and values of equal length")
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= math.prod(self.shape)):
            raise ShapeMismatchError(f"SparseDelta index out of range for shape {self.shape}")
        if torch.unique(self.index).numel() != self.index.numel():
            raise ShapeMismatchError("SparseDelta indices repeat; each entry of ΔW may be stored once (the file is "
                                     "damaged or was not written by a sparse delta)")

    @staticmethod
    def from_dense(weight: Tensor) -> "SparseDelta":
        flat = weight.reshape(-1)
        index = torch.nonzero(flat, as_tuple=False).reshape(-1)
        return SparseDelta(index, flat[index], tuple(weight.shape))

    def to_dense(self) -> Tensor:
        out = torch.zeros(math.prod(self.shape), dtype=self.values.dtype, device=self.values.device)
        out.index_add_(0, self.index, self.values)
        return out.reshape(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.index.numel())

    def norm(self) -> float:
        return float(torch.linalg.vector_norm(self.values.double()))

    def scaled(self, c: float) -> "SparseDelta":
        return SparseDelta(self.index, self.values * c, self.shape)

    def __add__(self, other: DeltaTensor) -> DeltaTensor:
        self._check(other)
        if isinstance(other, SparseDelta):
            index, inverse = torch.unique(torch.cat([self.index, other.index]), return_inverse=True)
            dtype = torch.promote_types(self.values.dtype, other.values.dtype)
            values = torch.zeros(index.numel(), dtype=dtype, device=self.values.device)
            values.index_add_(0, inverse, torch.cat([self.values.to(dtype), other.values.to(dtype)]))
            return SparseDelta(index, values, self.shape)
        return super().__add__(other)


def _lowrank_from_svd(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> LowRankDelta:
    if rank < 1:
        raise ValueError(f"svd rank must be >= 1, got {rank}")
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return LowRankDelta(vh[:rank] * root[:, None], u[:, :rank] * root[None, :], 1.0)
