"""Delta tensors: exact arithmetic within a kind, dense fallback across kinds, SVD truncation, sizes, norms, errors.

Every check compares against plain torch on the dense matrices.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from deltatune import DenseDelta, LowRankDelta, SparseDelta
from deltatune.core.errors import ShapeMismatchError

OUT, IN = 7, 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense(seed: int = 0, shape: tuple[int, int] = (OUT, IN)) -> DenseDelta:
    return DenseDelta(torch.randn(*shape, generator=gen(seed), dtype=torch.float64))


def lowrank(seed: int = 1, r: int = 2, scale: float = 0.7, shape: tuple[int, int] = (OUT, IN)) -> LowRankDelta:
    g = gen(seed)
    return LowRankDelta(torch.randn(r, shape[1], generator=g, dtype=torch.float64),
                        torch.randn(shape[0], r, generator=g, dtype=torch.float64), scale)


def sparse(seed: int = 2, nnz: int = 9, shape: tuple[int, int] = (OUT, IN)) -> SparseDelta:
    g = gen(seed)
    index = torch.randperm(shape[0] * shape[1], generator=g)[:nnz].sort().values
    return SparseDelta(index, torch.randn(nnz, generator=g, dtype=torch.float64), shape)


KINDS = {"dense": dense, "lowrank": lowrank, "sparse": sparse}


def close(a: Tensor, b: Tensor, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- to_dense is what every other check compares against ---------------------------------------------------
def test_to_dense_by_hand() -> None:
    lr = lowrank(scale=-1.5)
    close(lr.to_dense(), -1.5 * lr.B @ lr.A)
    sp = SparseDelta(torch.tensor([0, 6, 34]), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), (OUT, IN))
    want = torch.zeros(OUT * IN, dtype=torch.float64)
    want[0], want[6], want[34] = 1.0, -2.0, 3.0
    close(sp.to_dense(), want.reshape(OUT, IN))
    assert sp.to_dense()[1, 1] == -2.0 and sp.to_dense()[6, 4] == 3.0  # flat row-major index
    d = dense()
    assert d.to_dense() is d.weight
    assert lr.shape == sp.shape == d.shape == (OUT, IN)


def test_sparse_from_dense_roundtrip() -> None:
    w = dense().weight * (torch.rand(OUT, IN, generator=gen(5), dtype=torch.float64) < 0.3)
    sp = SparseDelta.from_dense(w)
    assert sp.nnz == int((w != 0).sum())
    close(sp.to_dense(), w)


# --- + - * neg within and across kinds ------------------------------------------------------------------
@pytest.mark.parametrize("left", list(KINDS))
@pytest.mark.parametrize("right", list(KINDS))
def test_add_sub_match_dense(left: str, right: str) -> None:
    a, b = KINDS[left](10), KINDS[right](20)
    s, d = a + b, a - b
    close(s.to_dense(), a.to_dense() + b.to_dense())
    close(d.to_dense(), a.to_dense() - b.to_dense())
    if left == right:  # same kind stays that kind (exact, structured)
        assert type(s) is type(a) and type(d) is type(a)
    else:  # mixed kinds fall back to dense
        assert type(s) is DenseDelta and type(d) is DenseDelta
    assert s.shape == (OUT, IN)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("c", [2, -0.5, 0.0])
def test_scalar_mul_and_neg(kind: str, c: float) -> None:
    t = KINDS[kind]()
    for got in (t * c, c * t):
        assert type(got) is type(t)
        close(got.to_dense(), c * t.to_dense())
    neg = -t
    assert type(neg) is type(t)
    close(neg.to_dense(), -t.to_dense())
    close((t - t).to_dense(), torch.zeros(OUT, IN, dtype=torch.float64))
    close(t.to_dense(), KINDS[kind]().to_dense())  # operands are not modified


@pytest.mark.parametrize("kind", list(KINDS))
def test_mul_rejects_non_scalars(kind: str) -> None:
    t = KINDS[kind]()
    for bad in (t, torch.tensor(2.0), "2", None):
        with pytest.raises(TypeError):
            t * bad  # noqa: B018
    with pytest.raises(TypeError):
        t + torch.zeros(OUT, IN)  # noqa: B018


def test_lowrank_sum_concatenates_factors_exactly() -> None:
    a, b = lowrank(1, r=2, scale=0.5), lowrank(2, r=3, scale=-2.0)
    s = a + b
    assert isinstance(s, LowRankDelta) and s.rank == 5
    assert s.nnz == a.nnz + b.nnz
    close(s.to_dense(), a.to_dense() + b.to_dense())


def test_sparse_sum_overlapping_indices_exact() -> None:
    shape = (3, 4)
    a = SparseDelta(torch.tensor([0, 3, 5, 11]), torch.tensor([1.0, 2.0, 3.0, 4.0]), shape)
    b = SparseDelta(torch.tensor([11, 1, 5]), torch.tensor([10.0, 20.0, -3.0]), shape)
    s = a + b
    assert isinstance(s, SparseDelta)
    assert s.index.tolist() == [0, 1, 3, 5, 11]  # union, unique, sorted
    assert s.values.tolist() == [1.0, 20.0, 2.0, 0.0, 14.0]  # overlaps summed exactly
    assert s.nnz == 5
    assert torch.equal(s.to_dense(), a.to_dense() + b.to_dense())
    d = a - b
    assert isinstance(d, SparseDelta) and torch.equal(d.to_dense(), a.to_dense() - b.to_dense())


def test_sparse_sum_promotes_dtype() -> None:
    a = SparseDelta(torch.tensor([1]), torch.tensor([1.5], dtype=torch.float32), (2, 2))
    b = SparseDelta(torch.tensor([1, 2]), torch.tensor([0.25, 1.0], dtype=torch.float64), (2, 2))
    s = a + b
    assert s.values.dtype == torch.float64
    assert s.to_dense().tolist() == [[0.0, 1.75], [1.0, 0.0]]


# --- shapes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("left", list(KINDS))
@pytest.mark.parametrize("right", list(KINDS))
def test_shape_mismatch_raises(left: str, right: str) -> None:
    a, b = KINDS[left](1), KINDS[right](2, shape=(IN, OUT))
    with pytest.raises(ShapeMismatchError, match=r"\(7, 5\).*\(5, 7\)"):
        a + b  # noqa: B018
    with pytest.raises(ShapeMismatchError):
        a - b  # noqa: B018


def test_constructors_validate_shapes() -> None:
    with pytest.raises(ShapeMismatchError):
        LowRankDelta(torch.zeros(2, IN), torch.zeros(OUT, 3))  # rank differs
    with pytest.raises(ShapeMismatchError):
        LowRankDelta(torch.zeros(2, IN, 1), torch.zeros(OUT, 2))
    with pytest.raises(ShapeMismatchError):
        SparseDelta(torch.tensor([0, OUT * IN]), torch.zeros(2), (OUT, IN))  # index past the end
    with pytest.raises(ShapeMismatchError):
        SparseDelta(torch.tensor([-1]), torch.zeros(1), (OUT, IN))
    with pytest.raises(ShapeMismatchError):
        SparseDelta(torch.tensor([0, 1], dtype=torch.int32), torch.zeros(2), (OUT, IN))
    with pytest.raises(ShapeMismatchError):
        SparseDelta(torch.tensor([0, 1]), torch.zeros(3), (OUT, IN))
    empty = SparseDelta(torch.zeros(0, dtype=torch.int64), torch.zeros(0), [OUT, IN])
    assert empty.shape == (OUT, IN) and empty.nnz == 0 and empty.norm() == 0.0
    assert torch.equal(empty.to_dense(), torch.zeros(OUT, IN))


# --- nnz and norm ----------------------------------------------------------------------------------------
def test_nnz() -> None:
    assert dense().nnz == OUT * IN
    assert lowrank(r=3).nnz == 3 * IN + OUT * 3
    assert sparse(nnz=9).nnz == 9


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("scale", [1.0, -3.0])
def test_norm_is_dense_frobenius(kind: str, scale: float) -> None:
    t = KINDS[kind]() * scale
    assert isinstance(t.norm(), float)
    assert t.norm() == pytest.approx(float(torch.linalg.matrix_norm(t.to_dense(), "fro")), rel=1e-10)


def test_lowrank_norm_with_correlated_factors() -> None:
    a = torch.randn(1, IN, generator=gen(3), dtype=torch.float64)
    lr = LowRankDelta(torch.cat([a, a]), torch.randn(OUT, 2, generator=gen(4), dtype=torch.float64), 0.3)
    assert lr.norm() == pytest.approx(float(torch.linalg.matrix_norm(lr.to_dense())), rel=1e-10)
    cancel = LowRankDelta(torch.cat([a, a]), torch.cat([torch.ones(OUT, 1), -torch.ones(OUT, 1)], 1).double())
    assert cancel.norm() == pytest.approx(0.0, abs=1e-6)  # B A = 0 exactly


# --- svd(rank): Eckart–Young --------------------------------------------------------------------------------
def _tail(m: Tensor, k: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[k:].square().sum().sqrt())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("k", [1, 2, 4])
def test_svd_is_best_rank_k(kind: str, k: int) -> None:
    t = {"dense": dense, "sparse": lambda: sparse(nnz=20), "lowrank": lambda: lowrank(r=5, scale=-0.8)}[kind]()
    m = t.to_dense()
    approx = t.svd(k)
    assert isinstance(approx, LowRankDelta) and approx.rank == k and approx.scale == 1.0
    assert approx.A.shape == (k, IN) and approx.B.shape == (OUT, k)
    err = float(torch.linalg.matrix_norm(m - approx.to_dense().double()))
    assert err == pytest.approx(_tail(m, k), rel=1e-4, abs=1e-5)
    # and it is the truncated SVD itself, not just as good: singular values agree
    torch.testing.assert_close(torch.linalg.svdvals(approx.to_dense().double())[:k],
                               torch.linalg.svdvals(m.double())[:k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_svd_recovers_low_rank_input_exactly(kind: str) -> None:
    lr = lowrank(7, r=3, scale=1.3)
    t = DenseDelta(lr.to_dense()) if kind == "dense" else lr
    for k in (3, 4, 10):  # any k >= the true rank recovers the matrix; k beyond min(out, in) is clamped
        approx = t.svd(k)
        assert approx.rank == min(k, 3 if kind == "lowrank" else min(OUT, IN))
        torch.testing.assert_close(approx.to_dense().double(), lr.to_dense(), atol=1e-5, rtol=1e-5)
    assert float(torch.linalg.matrix_norm(lr.to_dense() - t.svd(2).to_dense().double())) == pytest.approx(
        _tail(lr.to_dense(), 2), rel=1e-4)


def test_svd_rejects_rank_below_one() -> None:
    for t in (dense(), lowrank(), sparse()):
        with pytest.raises(ValueError):
            t.svd(0)
