"""Merge methods against direct implementations of their formulas, schema validation, Fisher estimation, soups.

Every expected value is computed here element by element in Python floats (float64) from the formula in
docs/merging.md — never with the functions under test — on small tensors (5×7, 3 inputs) and hand-made edge
cases. DARE's random masks are re-derived from the documented seeding rule (sha256 of seed, key, input index).
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, CorruptFileError, DeltaNameError, ShapeMismatchError, StateError, TargetError
from deltatune.merging import (PerInput, estimate_fisher, get_method, greedy_soup, list_methods, load_fisher,
                               merge_method, save_fisher, tall_masks)
from deltatune.merging import registry

SHAPE = (5, 7)
ATOL = 1e-5


@pytest.fixture
def taus() -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=g) for _ in range(3)]


# --- direct implementations ------------------------------------------------------------------------
def flat(t: Tensor) -> list[float]:
    return [float(x) for x in t.double().flatten()]


def as_tensor(values: list[float], shape=SHAPE) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(shape)


def count(fraction: float, n: int) -> int:
    """⌊fraction·n⌋, at least 1 (documented rounding)."""
    return max(1, min(n, math.floor(fraction * n + 1e-9)))


def ranked(values: list[float]) -> list[int]:
    """Indices by magnitude, largest first, equal magnitudes by position."""
    return sorted(range(len(values)), key=lambda j: (-abs(values[j]), j))


def keep_only(values: list[float], keep: set[int]) -> list[float]:
    return [v if j in keep else 0.0 for j, v in enumerate(values)]


def gta(values: list[list[float]], w: list[float], *, elect: bool, normalize: bool, lam: float) -> list[float]:
    """Per entry: λ · Σ w_i v_i, over sign-agreeing inputs only when `elect`, divided by their weights if normalize."""
    out = []
    for j in range(len(values[0])):
        contrib = [w[i] * values[i][j] for i in range(len(values))]
        if elect:
            sign = 1.0 if sum(contrib) >= 0 else -1.0
            chosen = [i for i, c in enumerate(contrib) if c != 0 and math.copysign(1.0, c) == sign]
            num, den = sum(contrib[i] for i in chosen), sum(w[i] for i in chosen)
            out.append(lam * (num / den if normalize and den != 0 else num))
        else:
            out.append(lam * (sum(contrib) / sum(w) if normalize else sum(contrib)))
    return out


def ref_ties(taus, w, density, normalize=True, lam=1.0):
    vals = [flat(t) for t in taus]
    trimmed = [keep_only(v, set(ranked(v)[:count(d, len(v))])) for v, d in zip(vals, density)]
    return as_tensor(gta(trimmed, w, elect=True, normalize=normalize, lam=lam), taus[0].shape)


def ref_dare_mask(shape, density: float, seed: int, key: str, index: int) -> Tensor:
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(shape, generator=g) < density


def ref_dare(taus, w, density, *, seed, key, elect, rescale=True, normalize=False, lam=1.0):
    vals = []
    for i, (t, d) in enumerate(zip(taus, density)):
        mask = [bool(m) for m in ref_dare_mask(t.shape, d, seed, key, i).flatten()]
        vals.append([(v / d if rescale else v) if m else 0.0 for v, m in zip(flat(t), mask)])
    return as_tensor(gta(vals, w, elect=elect, normalize=normalize, lam=lam), taus[0].shape)


def ref_breadcrumbs_row(row: list[float], density: float, gamma: float) -> list[float]:
    n = len(row)
    n_keep = count(density, n)
    n_top = min(math.floor(gamma * n + 1e-9), n - n_keep)
    return keep_only(row, set(ranked(row)[n_top:n_top + n_keep]))


def ref_breadcrumbs_mask_apply(t: Tensor, density: float, gamma: float, per_row: bool = True) -> list[float]:
    if per_row and t.dim() >= 2:
        rows = t.double().reshape(-1, t.shape[-1]).tolist()
        return [v for row in rows for v in ref_breadcrumbs_row(row, density, gamma)]
    return ref_breadcrumbs_row(flat(t), density, gamma)


# --- linear family --------------------------------------------------------------------------------
def test_linear_is_weighted_average(taus):
    w = [0.5, 2.0, 1.5]
    vals = [flat(t) for t in taus]
    expect = [sum(w[i] * vals[i][j] for i in range(3)) / sum(w) for j in range(35)]
    torch.testing.assert_close(get_method("linear")(taus, weight=w).double(), as_tensor(expect), atol=ATOL, rtol=0)
    plain = [sum(w[i] * vals[i][j] for i in range(3)) for j in range(35)]
    torch.testing.assert_close(get_method("linear")(taus, weight=w, normalize=False).double(), as_tensor(plain),
                               atol=ATOL, rtol=0)
    with pytest.raises(ConfigError, match="sum to 0"):
        get_method("linear")(taus, weight=[1.0, -1.0, 0.0])


def test_task_arithmetic_weights_negation_and_lambda(taus):
    a, b, c = (flat(t) for t in taus)
    out = get_method("task_arithmetic")(taus, weight=[1.0, -1.0, 0.5], **{"lambda": 0.7})
    expect = [0.7 * (a[j] - b[j] + 0.5 * c[j]) for j in range(35)]
    torch.testing.assert_close(out.double(), as_tensor(expect), atol=ATOL, rtol=0)
    # default weights 1, λ 1: the plain sum; negation of a single task vector
    torch.testing.assert_close(get_method("task_arithmetic")(taus).double(),
                               as_tensor([a[j] + b[j] + c[j] for j in range(35)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(get_method("task_arithmetic")(taus[:1], weight=-1.0), -taus[0], atol=0, rtol=0)
    # the Python spelling lambda_ is the same parameter
    torch.testing.assert_close(get_method("task_arithmetic")(taus, lambda_=0.7, weight=[1.0, -1.0, 0.5]), out)


def test_soup_uniform_is_mean(taus):
    vals = [flat(t) for t in taus]
    expect = [sum(v[j] for v in vals) / 3 for j in range(35)]
    torch.testing.assert_close(get_method("soup_uniform")(taus).double(), as_tensor(expect), atol=ATOL, rtol=0)


def test_mwa_weights_from_loss_and_steps(taus):
    vals = [flat(t) for t in taus]
    losses, steps, p = [0.9, 0.5, 0.7], [100.0, 200.0, 300.0], 2.0
    for kind, metric, raw in (("loss", losses, [m ** -p for m in losses]), ("steps", steps, [m ** p for m in steps])):
        w = [r / sum(raw) for r in raw]
        expect = [sum(w[i] * vals[i][j] for i in range(3)) for j in range(35)]
        out = get_method("mwa")(taus, metric=metric, kind=kind, penalty=p)
        torch.testing.assert_close(out.double(), as_tensor(expect), atol=ATOL, rtol=0)
    # p = 0 is the uniform average; a large p approaches the best checkpoint alone
    torch.testing.assert_close(get_method("mwa")(taus, metric=losses, penalty=0.0), get_method("soup_uniform")(taus))
    torch.testing.assert_close(get_method("mwa")(taus, metric=losses, penalty=200.0), taus[1], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match=r"metric\[1\] = 0.0 is out of range"):
        get_method("mwa")(taus, metric=[1.0, 0.0, 2.0])


# --- TIES ---------------------------------------------------------------------------------------------
def test_ties_matches_formula(taus):
    for w, density, normalize, lam in (([1.0, 1.0, 1.0], [0.2] * 3, True, 1.0),
                                       ([0.3, 1.2, 0.8], [0.2, 0.5, 0.9], True, 0.6),
                                       ([0.3, -1.2, 0.8], [0.4, 0.3, 1.0], False, 1.3)):
        out = get_method("ties")(taus, weight=w, density=density, normalize=normalize, **{"lambda": lam})
        torch.testing.assert_close(out.double(), ref_ties(taus, w, density, normalize, lam), atol=ATOL, rtol=0)


def test_ties_hand_example_trim_sign_tie_and_zero_entries():
    # entries: 0 trimmed in both; 1 opposite signs, equal mass (tie -> +); 2 all zero; 3 majority -; 4 agreeing
    t1 = torch.tensor([[0.1, 2.0, 0.0, -3.0, 1.0]])
    t2 = torch.tensor([[-0.2, -2.0, 0.0, 1.0, 3.0]])
    out = get_method("ties")([t1, t2], density=0.6)  # keeps 3 of 5: drops 0.1, 0 and -0.2, 0
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0, -3.0, 2.0]]), atol=0, rtol=0)
    out = get_method("ties")([t1, t2], density=0.6, normalize=False)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0, -3.0, 4.0]]), atol=0, rtol=0)
    # density 0.4 keeps the 2 largest of each: t1 {-3, 2}, t2 {3, -2}
    out = get_method("ties")([t1, t2], density=0.4)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0, -3.0, 3.0]]), atol=0, rtol=0)
    assert torch.isfinite(get_method("ties")([torch.zeros(2, 3), torch.zeros(2, 3)], density=0.5)).all()


def test_equal_magnitudes_rank_by_position():
    g = torch.Generator().manual_seed(2)
    small = [torch.randint(-2, 3, (4, 6), generator=g).float() for _ in range(3)]  # many ties at every cut
    for density in (0.1, 0.25, 0.5, 0.7):
        out = get_method("ties")(small, density=density, weight=[1.0, 0.5, 2.0])
        torch.testing.assert_close(out.double(), ref_ties(small, [1.0, 0.5, 2.0], [density] * 3), atol=ATOL, rtol=0)
        for gamma in (0.0, 0.2, 0.4):
            vals = [ref_breadcrumbs_mask_apply(t, density, gamma) for t in small]
            out = get_method("breadcrumbs")(small, density=density, gamma=gamma)
            torch.testing.assert_close(out.double(), as_tensor(gta(vals, [1.0] * 3, elect=False, normalize=False,
                                                                   lam=1.0), (4, 6)), atol=ATOL, rtol=0)


# --- DARE -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("elect", [False, True])
def test_dare_matches_formula_with_documented_seeding(taus, elect):
    name = "dare_ties" if elect else "dare_linear"
    w, density = [0.7, 1.0, -0.4], [0.3, 0.6, 0.9]
    out = get_method(name)(taus, weight=w, density=density, seed=11, key="model.layers.0.q_proj")
    torch.testing.assert_close(out.double(), ref_dare(taus, w, density, seed=11, key="model.layers.0.q_proj",
                                                      elect=elect), atol=ATOL, rtol=0)
    out = get_method(name)(taus, weight=w, density=density, seed=3, key="k", rescale=False, normalize=True,
                           **{"lambda": 0.5})
    torch.testing.assert_close(out.double(), ref_dare(taus, w, density, seed=3, key="k", elect=elect, rescale=False,
                                                      normalize=True, lam=0.5), atol=ATOL, rtol=0)


def test_dare_reproducible_and_independent_across_modules(taus):
    dare = get_method("dare_linear")
    a = dare(taus, density=0.5, seed=1, key="a")
    torch.testing.assert_close(dare(taus, density=0.5, seed=1, key="a"), a, atol=0, rtol=0)
    assert not torch.equal(dare(taus, density=0.5, seed=1, key="b"), a)
    assert not torch.equal(dare(taus, density=0.5, seed=2, key="a"), a)
    # equal inputs at different positions get different masks
    same = [taus[0], taus[0]]
    kept0, kept1 = (dare([t], density=0.5, seed=1, key="a") != 0 for t in same)
    both = dare(same, density=0.5, seed=1, key="a", weight=[1.0, 0.0])
    assert torch.equal(both != 0, kept0) and torch.equal(kept0, kept1)  # index 0 alone == index 0 in a pair
    second = dare(same, density=0.5, seed=1, key="a", weight=[0.0, 1.0]) != 0
    assert not torch.equal(second, kept0)


def test_dare_is_unbiased_over_seeds(taus):
    tau, d, n = taus[0], 0.3, 3000
    dare = get_method("dare_linear")
    outs = torch.stack([dare([tau], density=d, seed=s, key="m") for s in range(n)])
    kept = (outs != 0).double().mean()
    assert abs(float(kept) - d) < 0.01                                   # Bernoulli(density) keep rate
    mean = outs.double().mean(0)
    sigma = tau.double().abs() * math.sqrt((1 - d) / d / n)              # std of the mean of n draws
    assert bool(((mean - tau.double()).abs() <= 5 * sigma + 1e-9).all())  # E[dare(τ)] = τ
    plain = torch.stack([dare([tau], density=d, seed=s, key="m", rescale=False) for s in range(400)]).double().mean(0)
    assert float((plain - d * tau.double()).abs().max()) < float(0.5 * d * tau.abs().max())  # no rescale: E = d·τ


# --- Model Breadcrumbs -------------------------------------------------------------------------------
def test_breadcrumbs_hand_example():
    row = torch.tensor([[5.0, -1.0, 0.2, 3.0, -0.1]])
    out = get_method("breadcrumbs")([row], density=0.4, gamma=0.2)  # drop the top 1 (5), keep the next 2 (3, -1)
    torch.testing.assert_close(out, torch.tensor([[0.0, -1.0, 0.0, 3.0, 0.0]]), atol=0, rtol=0)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.01), (0.5, 0.15), (0.9, 0.2), (0.05, 0.0), (1.0, 0.3), (0.3, 0.6)])
def test_breadcrumbs_per_row_matches_formula(taus, density, gamma):
    w = [1.0, 0.5, 2.0]
    vals = [ref_breadcrumbs_mask_apply(t, density, gamma) for t in taus]
    expect = as_tensor(gta(vals, w, elect=False, normalize=False, lam=0.8))
    out = get_method("breadcrumbs")(taus, weight=w, density=density, gamma=gamma, **{"lambda": 0.8})
    torch.testing.assert_close(out.double(), expect, atol=ATOL, rtol=0)
    # every row keeps exactly ⌊density·7⌋ (≥ 1) entries, even when ⌊γ·7⌋ = 0 outliers are dropped
    single = get_method("breadcrumbs")(taus[:1], density=density, gamma=gamma)
    assert ((single != 0).sum(1) == count(density, 7)).all()
    expect_ties = as_tensor(gta(vals, w, elect=True, normalize=True, lam=1.0))
    out = get_method("breadcrumbs_ties")(taus, weight=w, density=density, gamma=gamma, normalize=True)
    torch.testing.assert_close(out.double(), expect_ties, atol=ATOL, rtol=0)


def test_breadcrumbs_tiny_and_whole_tensor(taus):
    one = torch.tensor([[2.5]])
    torch.testing.assert_close(get_method("breadcrumbs")([one], density=0.1, gamma=0.5), one)  # keeps its one entry
    bias = torch.tensor([1.0, -4.0, 2.0, 0.5])  # 1-D: one row
    torch.testing.assert_close(get_method("breadcrumbs")([bias], density=0.5, gamma=0.25),  # drops -4, keeps 2, 1
                               torch.tensor([1.0, 0.0, 2.0, 0.0]))
    out = get_method("breadcrumbs")(taus[:1], density=0.3, gamma=0.1, per_row=False)
    torch.testing.assert_close(out.double(), as_tensor(ref_breadcrumbs_mask_apply(taus[0], 0.3, 0.1, per_row=False)),
                               atol=ATOL, rtol=0)
    assert int((out != 0).sum()) == 10  # ⌊0.3·35⌋ over the whole tensor, after dropping its ⌊0.1·35⌋ = 3 largest


# --- Fisher merging ---------------------------------------------------------------------------------
def test_fisher_merge_matches_formula(taus):
    g = torch.Generator().manual_seed(5)
    fishers = [torch.rand(SHAPE, generator=g) ** 3 for _ in range(3)]
    fishers[1][0, :] = 0.0                          # a row where input 1 has no information
    for f in fishers:
        f[2, 3] = 0.0                               # an entry with no information anywhere: weighted mean
    w, eps = [1.0, 2.0, 0.5], 1e-4
    vals, fv = [flat(t) for t in taus], [flat(f) for f in fishers]
    expect = [sum(w[i] * (fv[i][j] + eps) * vals[i][j] for i in range(3)) / sum(w[i] * (fv[i][j] + eps) for i in range(3))
              for j in range(35)]
    out = get_method("fisher")(taus, fisher=fishers, weight=w, eps=eps)
    torch.testing.assert_close(out.double(), as_tensor(expect), atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2, 3].double(), sum(w[i] * taus[i][2, 3].double() for i in range(3)) / sum(w))
    with pytest.raises(ShapeMismatchError, match=r"fisher\[2\] has shape \(7, 5\)"):
        get_method("fisher")(taus, fisher=[fishers[0], fishers[1], fishers[2].t()])
    with pytest.raises(ConfigError, match="negative"):
        get_method("fisher")(taus, fisher=[fishers[0], -fishers[1], fishers[2]])
    with pytest.raises(ConfigError, match="'fisher' is required"):
        get_method("fisher")(taus)


# --- SLERP ---------------------------------------------------------------------------------------------
def ref_slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    va, vb = flat(a), flat(b)
    na, nb = math.sqrt(sum(x * x for x in va)), math.sqrt(sum(x * x for x in vb))
    cos = sum(x * y for x, y in zip(va, vb)) / (na * nb)
    th = math.acos(cos)
    s0, s1 = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return as_tensor([s0 * x + s1 * y for x, y in zip(va, vb)], a.shape)


def test_slerp(taus):
    a, b = taus[0], taus[1]
    slerp = get_method("slerp")
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        torch.testing.assert_close(slerp([a, b], t=t).double(), ref_slerp(a, b, t), atol=ATOL, rtol=0)
    torch.testing.assert_close(slerp([a, b], t=0.0), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(slerp([a, b], t=1.0), b, atol=1e-6, rtol=0)
    # orthogonal inputs of different norms: cos(tπ/2) τ0 + sin(tπ/2) τ1
    o = b - (a * b).sum() / (a * a).sum() * a
    o = 3.0 * o / o.norm() * a.norm()
    for t in (0.3, 0.5):
        torch.testing.assert_close(slerp([a, o], t=t), math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * o,
                                   atol=1e-5, rtol=0)
    # (anti)parallel inputs and a zero input fall back to linear interpolation
    for other in (2.0 * a, -0.5 * a, torch.zeros_like(a)):
        torch.testing.assert_close(slerp([a, other], t=0.3), 0.7 * a + 0.3 * other, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="exactly 2 inputs, got 3"):
        slerp(taus, t=0.5)
    with pytest.raises(ConfigError, match=r"t = 1.5 is out of range; expected a number in \[0, 1\]"):
        slerp([a, b], t=1.5)


# --- TALL masks and Consensus --------------------------------------------------------------------
def ref_tall(taus, w, lams):
    vals = [flat(t) for t in taus]
    mtl = [sum(w[i] * vals[i][j] for i in range(len(vals))) for j in range(len(vals[0]))]
    masks = [[abs(w[t] * vals[t][j]) > lams[t] * abs(mtl[j] - w[t] * vals[t][j]) for j in range(len(mtl))]
             for t in range(len(vals))]
    return mtl, masks


def test_consensus_and_tall_match_formula(taus):
    w, lams = [1.0, 0.8, 1.2], [0.2, 0.4, 0.6]
    mtl, masks = ref_tall(taus, w, lams)
    counts = [sum(m[j] for m in masks) for j in range(35)]
    seen = set()
    for k in range(5):
        expect = [0.9 * mtl[j] if counts[j] >= k else 0.0 for j in range(35)]
        out = get_method("consensus")(taus, k=k, mask_lambda=lams, weight=w, **{"lambda": 0.9})
        torch.testing.assert_close(out.double(), as_tensor(expect), atol=ATOL, rtol=0)
        seen.add(int((out != 0).sum()))
    assert len(seen) >= 3  # the k values really select different entries
    torch.testing.assert_close(get_method("consensus")(taus, k=0, weight=w), get_method("task_arithmetic")(taus, weight=w))
    assert not get_method("consensus")(taus, k=4).any()  # more tasks than there are: nothing kept
    for t in range(3):
        out = get_method("tall")(taus, task=t, mask_lambda=lams, weight=w)
        torch.testing.assert_close(out.double(), as_tensor([mtl[j] if masks[t][j] else 0.0 for j in range(35)]),
                                   atol=ATOL, rtol=0)
    mtl_t, mask_t = tall_masks(taus, lams, w)
    assert [bool(x) for x in mask_t[1].flatten()] == masks[1]
    with pytest.raises(ConfigError, match="task = 3 but there are only 3 inputs"):
        get_method("tall")(taus, task=3)


def test_tall_mask_never_counts_an_untouched_entry():
    t1, t2, t3 = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0])
    _, masks = tall_masks([t1, t2, t3], [0.4] * 3)
    assert masks[0].tolist() == [False, True]  # τ_MTL − τ_1 = 0 at entry 0, yet task 1 does not use it


# --- schema and validation ---------------------------------------------------------------------------
def test_every_documented_method_is_registered():
    assert set(list_methods()) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                                   "breadcrumbs_ties", "fisher", "slerp", "consensus", "tall", "mwa", "soup_uniform"}
    for name in list_methods():
        assert get_method(name).paper and get_method(name).summary


def test_linear_declaration_holds(taus):
    params = {"linear": {"weight": [0.5, 2.0, -1.0]}, "task_arithmetic": {"weight": [0.5, 2.0, -1.0], "lambda": 0.3},
              "soup_uniform": {}, "mwa": {"metric": [0.9, 0.5, 0.7], "penalty": 2.0}}
    declared = {n for n in list_methods() if get_method(n).linear}
    assert declared == set(params)  # sparsifying, Fisher, SLERP and consensus results depend on the values
    for name, p in params.items():
        probes = [torch.eye(3)[i].reshape(1, 3) for i in range(3)]
        c = get_method(name)(probes, **p)[0].tolist()
        torch.testing.assert_close(get_method(name)(taus, **p), sum(ci * t for ci, t in zip(c, taus)), atol=ATOL, rtol=0)


def test_schema_from_signature_and_validation(taus):
    ties = get_method("ties")
    p = ties.params
    assert (p["density"].per_input, p["density"].default, p["density"].required) == (True, 1.0, False)
    assert (p["lambda"].arg, p["normalize"].type, p["normalize"].per_input) == ("lambda_", bool, False)
    v = ties.validate({"density": 0.2, "weight": [1, 2, 3]}, 3)
    assert v == {"weight": [1.0, 2.0, 3.0], "density": [0.2] * 3, "normalize": True, "lambda": 1.0}
    assert all(type(x) is float for x in v["weight"])
    cases = [({"densty": 0.2}, r"no parameter 'densty' \(did you mean 'density'\?\); its parameters are: density, lambda, normalize, weight"),
             ({"density": "high"}, r"density = 'high' is not a number; expected a number in \(0, 1\]"),
             ({"density": 0.0}, r"density = 0.0 is out of range"),
             ({"density": [0.2, 1.5, 0.3]}, r"density\[1\] = 1.5 is out of range"),
             ({"density": [0.2, 0.3]}, r"'density' has 2 values for 3 inputs; expected .* a list of 3 such values"),
             ({"weight": True}, r"weight = True is not a number"),
             ({"weight": float("nan")}, r"weight = nan is not finite"),
             ({"normalize": 2}, r"normalize = 2 is not a boolean"),
             ({"lambda": 1.0, "lambda_": 2.0}, r"given twice"),
             ({"weight": None}, r"weight = None is not allowed")]
    for params, message in cases:
        with pytest.raises(ConfigError, match=message):
            ties(taus, **params)
    with pytest.raises(ConfigError, match=r"kind = 'accuracy' is not an allowed choice; expected one of 'loss', 'steps'"):
        get_method("mwa").validate({"metric": 1.0, "kind": "accuracy"}, 2)
    with pytest.raises(ConfigError, match=r"seed = 1.5 is not an integer"):
        get_method("dare_ties").validate({"seed": 1.5}, 2)
    with pytest.raises(ConfigError, match=r"unknown merge method 'tie' \(did you mean 'ties'\?\); known: breadcrumbs"):
        get_method("tie")
    with pytest.raises(ShapeMismatchError, match=r"different shapes \[\(5, 7\), \(7, 5\)\]"):
        ties([taus[0], taus[1].t()])
    with pytest.raises(ConfigError, match="at least one input"):
        ties([])
    # a per-input list equals broadcasting when all values are equal
    torch.testing.assert_close(ties(taus, density=0.4), ties(taus, density=[0.4] * 3), atol=0, rtol=0)


def test_custom_method_registration_and_optional_per_input(taus):
    @merge_method("_test_scaled_first", paper="none")
    def scaled_first(tensors: list[Tensor], *, scale: PerInput[float] | None = None, mode: str = "x") -> Tensor:
        """First input times its scale (test only)."""
        return tensors[0] * (1.0 if scale is None else scale[0])

    try:
        p = scaled_first.params
        assert (p["scale"].per_input, p["scale"].optional, p["scale"].default) == (True, True, None)
        assert scaled_first.validate({}, 2) == {"scale": None, "mode": "x"}
        torch.testing.assert_close(get_method("_test_scaled_first")(taus, scale=[3.0, 1.0, 1.0]), 3 * taus[0])
        with pytest.raises(ValueError, match="already registered"):
            merge_method("_test_scaled_first")(scaled_first.fn)
        with pytest.raises(TypeError, match="keyword-only"):
            merge_method("_test_bad")(lambda tensors, density=1.0: tensors[0])
    finally:
        registry._REGISTRY.pop("_test_scaled_first", None)


def test_low_precision_inputs_are_merged_in_float32(taus):
    halves = [t.bfloat16() for t in taus]
    out = get_method("ties")(halves, density=0.3, weight=[0.3, 0.3, 0.4])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, get_method("ties")([h.float() for h in halves], density=0.3, weight=[0.3, 0.3, 0.4]),
                               atol=0, rtol=0)
    torch.testing.assert_close(out.double(), ref_ties([h.float() for h in halves], [0.3, 0.3, 0.4], [0.3] * 3),
                               atol=ATOL, rtol=0)
    # delta tensors are accepted as inputs
    torch.testing.assert_close(get_method("soup_uniform")([dt.DenseDelta(t) for t in taus]), taus[0] / 3 + taus[1] / 3 + taus[2] / 3)


def test_docs_example_runs():
    text = (Path(__file__).parents[1] / "docs" / "merging.md").read_text()
    section = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "docs/merging.md ## Methods has no python example"
    exec(compile(blocks[0], "docs/merging.md", "exec"), {})


# --- Fisher estimation ----------------------------------------------------------------------------
def _mlp_with_deltas() -> tuple[nn.Module, list[dict[str, Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    dt.attach(model, dt.Dense(targets=("0", "2")), "d")
    dt.attach(model, dt.Dense(targets=("0", "2")), "other", activate=False)
    with torch.no_grad():
        for i in ("0", "2"):
            getattr(model, i).deltatune["d"].delta.normal_(0, 0.3)
            getattr(model, i).deltatune["other"].delta.normal_(0, 5.0)
    g = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(6, 4, generator=g), "t": torch.randn(6, 3, generator=g)} for _ in range(3)]
    return model, batches


def _mse(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return 0.5 * ((model(batch["x"]) - batch["t"]) ** 2).sum(-1).mean()


def test_estimate_fisher_matches_hand_computed_gradients():
    model, batches = _mlp_with_deltas()
    dt.activate(model, "other")  # estimation must use "d" alone, then restore this
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w0 = model[0].weight.detach() + model[0].deltatune["d"].delta.detach()
    w2 = model[2].weight.detach() + model[2].deltatune["d"].delta.detach()
    b0, b2 = model[0].bias.detach(), model[2].bias.detach()
    expect0, expect2 = torch.zeros_like(w0), torch.zeros_like(w2)
    expect_b0, expect_b2 = torch.zeros_like(b0), torch.zeros_like(b2)
    for b in batches:  # loss = 0.5/B Σ ||tanh(x W0ᵀ + b0) W2ᵀ + b2 − t||²
        x, t = b["x"], b["t"]
        h = torch.tanh(x @ w0.t() + b0)
        r = (h @ w2.t() + b2 - t) / x.shape[0]
        expect2 += (r.t() @ h) ** 2
        expect_b2 += r.sum(0) ** 2
        g0 = (r @ w2) * (1 - h ** 2)
        expect0 += (g0.t() @ x) ** 2
        expect_b0 += g0.sum(0) ** 2
    fisher = estimate_fisher(model, "d", batches, loss_fn=_mse, progress=False)
    assert set(fisher) == {"0", "2", "0.bias", "2.bias"}
    torch.testing.assert_close(fisher["0"], expect0 / 3, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fisher["2"], expect2 / 3, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fisher["0.bias"], expect_b0 / 3, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fisher["2.bias"], expect_b2 / 3, atol=1e-6, rtol=1e-5)
    # the model is exactly as it was
    assert dt.active_names(model) == ("other",)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    only = estimate_fisher(model, "d", batches, loss_fn=_mse, modules=["2"], progress=False)
    assert set(only) == {"2", "2.bias"} and torch.equal(only["2"], fisher["2"])


def test_estimate_fisher_conv1d_layout_and_default_loss(tiny_gpt2):
    model = tiny_gpt2.model
    dt.attach(model, dt.LoRA(r=2, targets=("c_attn",)), "a")
    ids = tiny_gpt2.inputs["input_ids"]
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]
    fisher = estimate_fisher(model, "a", batches, progress=False)
    path = "transformer.h.1.attn.c_attn"
    weight = dict(model.named_modules())[path].weight  # Conv1D stores [in, out]
    weight.requires_grad_(True)
    try:
        grads = [torch.autograd.grad(model(**b).loss, weight)[0] for b in batches]
    finally:
        weight.requires_grad_(False)
    assert fisher[path].shape == (48, 16)
    torch.testing.assert_close(fisher[path], sum(g.t() ** 2 for g in grads) / 2, atol=1e-7, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_estimate_fisher_bad_input_leaves_model_untouched():
    model, batches = _mlp_with_deltas()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(DeltaNameError, match="no delta 'nope'"):
        estimate_fisher(model, "nope", batches, loss_fn=_mse, progress=False)
    with pytest.raises(TargetError, match=r"\['1'\] are not targeted"):
        estimate_fisher(model, "d", batches, loss_fn=_mse, modules=["1"], progress=False)
    with pytest.raises(ConfigError, match="no batch"):
        estimate_fisher(model, "d", [], loss_fn=_mse, progress=False)
    with pytest.raises(ConfigError, match="scalar tensor"):
        estimate_fisher(model, "d", batches, loss_fn=lambda m, b: m(b["x"]), progress=False)
    assert dt.active_names(model) == ("d",)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    dt.activate(model, ["d", "other"])
    dt.merge(model, "other")
    with pytest.raises(StateError, match=r"\['other'\] are merged"):
        estimate_fisher(model, "d", batches, loss_fn=_mse, progress=False)


def test_fisher_save_load_roundtrip(tmp_path):
    fisher = {"model.layers.0.q_proj": torch.rand(3, 4), "lm_head": torch.rand(2, 2)}
    path = save_fisher(fisher, tmp_path / "fisher.safetensors")
    back = load_fisher(path)
    assert set(back) == set(fisher) and all(torch.equal(back[k], fisher[k]) for k in fisher)
    save_fisher({"x": torch.ones(1)}, path)  # replaced atomically, no temporary files left
    assert list(tmp_path.iterdir()) == [path] and torch.equal(load_fisher(path)["x"], torch.ones(1))
    from safetensors.torch import save_file
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CorruptFileError, match="not a deltatune Fisher file"):
        load_fisher(tmp_path / "other.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptFileError):
        load_fisher(tmp_path / "cut.safetensors")


# --- greedy soup ------------------------------------------------------------------------------------
def test_greedy_soup_known_answer():
    target = torch.zeros(2)
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.5]), torch.tensor([0.0, 4.0])
    calls = []

    def evaluate(x: Tensor) -> float:
        calls.append(x)
        return -float(((x - target) ** 2).sum())

    soup = greedy_soup([c, b, a], evaluate, progress=False)  # ranked a (−1), b (−1.25), c (−16)
    assert soup.members == [2, 1]                   # a, then b joins (mean [0, .25]: −0.0625); c would hurt
    torch.testing.assert_close(soup.merged, torch.tensor([0.0, 0.25]))
    assert soup.score == pytest.approx(-0.0625) and soup.individual_scores == pytest.approx([-16.0, -1.25, -1.0])
    assert len(calls) == 5
    # "does not drop" admits an equal score; task-vector dicts average per module path
    dicts = [{"q": torch.ones(2), "v": torch.zeros(1)}, {"q": torch.ones(2), "v": torch.zeros(1)}]
    soup = greedy_soup(dicts, lambda d: -float(d["q"].sum()), progress=False)
    assert soup.members == [0, 1] and torch.equal(soup.merged["q"], torch.ones(2))
    # any object, with its own combine
    soup = greedy_soup([3.0, 1.0, 2.5], lambda x: -abs(x - 2.0), combine=lambda xs: sum(xs) / len(xs), progress=False)
    assert soup.members == [2, 1] and soup.merged == pytest.approx(1.75)  # 2.5 alone, +3.0 hurts, +1.0 helps
    with pytest.raises(ConfigError, match="no candidates"):
        greedy_soup([], evaluate)
    with pytest.raises(ConfigError, match="pass combine="):
        greedy_soup(["a", "b"], lambda x: 0.0, progress=False)
