"""AdaLoRA: ΔW = s·P diag(Λ) Q with s = alpha / init_r, an orthogonality penalty, and a global rank budget that
masks and finally removes the least important triplets.

Expected values are written out here from the paper's formulas (Zhang et al. 2023: the SVD-form update, the penalty, the smoothed sensitivity and the cubic schedule),
never taken from the code under test: ΔW from the raw tensors, the penalty γ(‖PᵀP − I‖² + ‖QQᵀ − I‖²), importance
scores by a float64 re-implementation fed with the gradients the test itself reads, the budget with exact fractions.
peft 0.21.2 is the oracle for the forward formula and for the allocation on an identical training run.
"""
from __future__ import annotations

import copy
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, ShapeMismatchError, StateError, TargetError
from deltatune.methods.adalora import adalora
from deltatune.methods.adalora.budget import RankAllocator, budget
from deltatune.core.tensors import LowRankDelta
from deltatune.runtime.step_hooks import after_optimizer_step, before_step, regularization

from conftest import Tiny, build_tiny, module_pieces

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

KINDS = ["llama", "gpt2", "bert"]
LLAMA_T = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRIPLET = ("P", "Lambda", "Q")


# --- helpers that do not trust the code under test ----------------------------------------------------------
def weight_view(module: nn.Module) -> Tensor:
    """W as [out, in] for Linear and Conv1D, from the module types alone."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    raise AssertionError(type(module))


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw if isinstance(module, nn.Linear) else dw.t()


def expected_dw(cfg: dt.AdaLoRA, piece: nn.Module) -> Tensor:
    """s · P diag(Λ) Q with s = alpha / init_r (the rank the delta started with)."""
    p, lam, q = (getattr(piece, n).detach().double() for n in TRIPLET)
    return (cfg.alpha / cfg.init_r * p @ torch.diag(lam) @ q).float()


def attach(kind: str, cfg: dt.AdaLoRA | None = None, name: str = "a", seed: int = 3) -> tuple[Tiny, dt.AdaLoRA]:
    tiny = build_tiny(kind)
    cfg = cfg or dt.AdaLoRA(init_r=4, target_r=2, alpha=6.0)
    torch.manual_seed(seed)
    dt.attach(tiny.model, cfg, name)
    return tiny, cfg


@torch.no_grad()
def randomize(model: nn.Module, name: str, seed: int = 7) -> None:
    """Make P, Λ, Q (and any other delta's tensors) clearly non-zero, in place."""
    g = torch.Generator().manual_seed(seed)
    for _, (_, piece) in module_pieces(model, name).items():
        for _, p in piece.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def reference_model(tiny: Tiny, updates: list[dict[str, Tensor]]) -> nn.Module:
    """A plain copy of the base with W + Σ ΔW ([out, in] updates per path)."""
    ref = tiny.fresh()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for upd in updates:
            for path, dw in upd.items():
                modules[path].weight.add_(to_native(modules[path], dw))
    return ref


def ada_updates(model: nn.Module, cfg: dt.AdaLoRA, name: str = "a") -> dict[str, Tensor]:
    return {path: expected_dw(cfg, piece) for path, (_, piece) in module_pieces(model, name).items()}


def base_params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


def ranks(model: nn.Module, name: str = "a") -> dict[str, int]:
    """Kept rank per AdaLoRA module of delta `name` (a classification head next to them is skipped)."""
    return {path: int(piece.Lambda.numel()) for path, (_, piece) in module_pieces(model, name).items()
            if hasattr(piece, "Lambda")}


# --- parameter count: the paper's r(d_in + d_out + 1) per layer ----------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_trainable_count_is_r_times_in_plus_out_plus_one(kind: str) -> None:
    tiny, cfg = attach(kind, dt.AdaLoRA(init_r=3, target_r=1))
    want = 0
    for path, (module, _) in module_pieces(tiny.model, "a").items():
        d_out, d_in = weight_view(module).shape
        want += cfg.init_r * (d_in + d_out + 1)  # P: d_out·r, Λ: r, Q: r·d_in
    assert dt.summary(tiny.model)["a"].trainable == want
    # the docs' row: one 4096 x 4096 layer at init_r = 12 (meta device: no memory)
    layer = nn.Sequential(nn.Linear(4096, 4096, bias=False, device="meta"))
    dt.attach(layer, dt.AdaLoRA(init_r=12, target_r=8), "a")
    assert dt.summary(layer)["a"].trainable == 12 * (4096 + 4096 + 1) == 98_316


# --- identity at init, forward formula ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init_with_random_singular_vectors(kind: str) -> None:
    tiny = build_tiny(kind)
    y0 = tiny.logits()
    dt.attach(tiny.model, dt.AdaLoRA(init_r=4, target_r=2), "a")
    for _, (_, piece) in module_pieces(tiny.model, "a").items():
        assert not piece.Lambda.any()  # Λ = 0 ...
        for t in (piece.P, piece.Q):  # ... while P and Q are random N(0, 0.02²), so only Λ keeps ΔW at zero
            assert t.abs().min() > 0 and 0.01 < float(t.detach().std()) < 0.04
    torch.testing.assert_close(tiny.logits(), y0, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), y0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_s_P_diag_lambda_Q(kind: str) -> None:
    tiny, cfg = attach(kind)
    randomize(tiny.model, "a")
    y = tiny.logits()
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    want = tiny.logits(reference_model(tiny, [ada_updates(tiny.model, cfg)]))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)  # inference (in place) path
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=1e-5, rtol=0)  # autograd path
    for path, (module, piece) in module_pieces(tiny.model, "a").items():
        dw = piece.delta_weight(module)
        assert isinstance(dw, LowRankDelta) and dw.rank == cfg.init_r
        torch.testing.assert_close(dw.to_dense(), expected_dw(cfg, piece), atol=1e-6, rtol=0)


# --- merge, save/load, gradients, sums ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_unmerge_restores(kind: str) -> None:
    tiny, cfg = attach(kind)
    model = tiny.model
    randomize(model, "a")
    w0, y = base_params(model), tiny.logits()
    updates = ada_updates(model, cfg)
    dt.merge(model)
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)
    modules = dict(model.named_modules())
    for path, dw in updates.items():
        torch.testing.assert_close(modules[path].weight, w0[f"{path}.weight"] + to_native(modules[path], dw), atol=1e-6, rtol=0)
    dt.unmerge(model)
    for k, v in base_params(model).items():
        torch.testing.assert_close(v, w0[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_equal_logits(kind: str, tmp_path: Path) -> None:
    tiny, cfg = attach(kind)
    randomize(tiny.model, "a")
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="a")
    delta = dt.Delta.read(tmp_path / "d")
    assert delta.config == cfg  # nothing pruned: the config is saved as given
    for path, (_, piece) in module_pieces(tiny.model, "a").items():
        torch.testing.assert_close(delta.tensors()[path].to_dense(), expected_dw(cfg, piece), atol=1e-6, rtol=0)
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_gradients_reach_only_p_lambda_q(kind: str) -> None:
    tiny, _ = attach(kind)
    randomize(tiny.model, "a")
    y = tiny.logits(grad=True)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    for n, p in tiny.model.named_parameters():
        if "deltatune" not in n:
            assert not p.requires_grad and p.grad is None, n
    own = [p for _, (_, piece) in module_pieces(tiny.model, "a").items() for p in piece.parameters()]
    assert len(own) == 3 * len(module_pieces(tiny.model, "a"))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sum_with_an_active_lora_equals_the_formula(kind: str) -> None:
    tiny, cfg = attach(kind)
    lora = dt.LoRA(r=2, alpha=4.0, targets=("q_proj", "v_proj", "c_attn"))
    dt.attach(tiny.model, lora, "l")
    randomize(tiny.model, "a", seed=1)
    randomize(tiny.model, "l", seed=2)
    dt.activate(tiny.model, ["l", "a"])
    lora_dw = {path: (lora.alpha / lora.r * piece.lora_B.detach().double() @ piece.lora_A.detach().double()).float()
               for path, (_, piece) in module_pieces(tiny.model, "l").items()}
    want = tiny.logits(reference_model(tiny, [lora_dw, ada_updates(tiny.model, cfg)]))
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=1e-5, rtol=0)
    dt.merge(tiny.model, ["l", "a"])
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)


def test_mixed_batch_rows_get_their_own_delta() -> None:
    tiny, cfg = attach("llama")
    dt.attach(tiny.model, dt.AdaLoRA(init_r=3, target_r=1, alpha=3.0), "b")
    randomize(tiny.model, "a", seed=1)
    randomize(tiny.model, "b", seed=2)
    want = {name: tiny.logits(reference_model(tiny, [ada_updates(tiny.model, cfg if name == "a" else
                                                                  dt.AdaLoRA(init_r=3, target_r=1, alpha=3.0), name)]))
            for name in ("a", "b")}
    with dt.route(tiny.model, ["b", "a"]):
        y = tiny.logits()
    torch.testing.assert_close(y[0], want["b"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], want["a"][1], atol=1e-5, rtol=0)


# --- the orthogonality penalty -----------------------------------------------------------------------------
def test_regularizer_is_gamma_times_orthogonality_defect() -> None:
    tiny, cfg = attach("llama", dt.AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.3))
    randomize(tiny.model, "a")
    pieces = [piece for _, (_, piece) in module_pieces(tiny.model, "a").items()]
    want = 0.0
    for piece in pieces:
        p, q = piece.P.detach().double(), piece.Q.detach().double()
        r = p.shape[1]
        want += 0.3 * (float(((p.t() @ p - torch.eye(r, dtype=torch.float64)) ** 2).sum())
                       + float(((q @ q.t() - torch.eye(r, dtype=torch.float64)) ** 2).sum()))
    got = regularization(tiny.model, ["a"])
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()  # d/dP γ‖PᵀP − I‖² = 4γ P(PᵀP − I); Λ takes no part
    for piece in pieces:
        p, q = piece.P.detach().double(), piece.Q.detach().double()
        eye = torch.eye(p.shape[1], dtype=torch.float64)
        torch.testing.assert_close(piece.P.grad.double(), 4 * 0.3 * p @ (p.t() @ p - eye), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(piece.Q.grad.double(), 4 * 0.3 * (q @ q.t() - eye) @ q, atol=1e-5, rtol=1e-5)
        assert piece.Lambda.grad is None
    free, _ = attach("llama", dt.AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.0))
    assert regularization(free.model, ["a"]) == 0.0


# --- the budget schedule --------------------------------------------------------------------------------------
def paper_budget(t: int, tinit: int, final: int, b0: int, bT: int) -> int:
    """b(t): b0 up to tinit, bT + (b0 − bT)(1 − (t − tinit)/(final − tinit))³ (floored) until final, then bT."""
    if t <= tinit:
        return b0
    if t >= final:
        return bT
    return math.floor(bT + (b0 - bT) * (1 - Fraction(t - tinit, final - tinit)) ** 3)


def test_budget_schedule_is_the_cubic_of_the_paper() -> None:
    for b0, bT, tinit, final in ((56, 28, 2, 9), (1200, 800, 100, 900), (7, 1, 0, 5), (96, 95, 3, 40)):
        values = [budget(t, tinit, final, b0, bT) for t in range(final + 3)]
        assert values == [paper_budget(t, tinit, final, b0, bT) for t in range(final + 3)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # never grows
    # by hand: 56 -> 28 over (2, 9): 28 + ⌊28 (7 − (t − 2))³ / 343⌋
    assert [budget(t, 2, 9, 56, 28) for t in (2, 3, 4, 6, 8, 9)] == [56, 28 + 17, 28 + 10, 28 + 2, 28 + 0, 28]


# --- the allocator against a brute-force ranking --------------------------------------------------------------
class Scores:
    """The paper's importance in float64: I = |w·g|, Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2)|I − Ī|, s = Ī·Ū;
    S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.b1, self.b2 = beta1, beta2
        self.ema: dict[tuple[str, str], Tensor] = {}
        self.unc: dict[tuple[str, str], Tensor] = {}

    def update(self, values: dict[tuple[str, str], Tensor], grads: dict[tuple[str, str], Tensor]) -> None:
        for key, w in values.items():
            sens = (w * grads[key]).abs()
            ema = self.b1 * self.ema.get(key, torch.zeros_like(w)) + (1 - self.b1) * sens
            self.unc[key] = self.b2 * self.unc.get(key, torch.zeros_like(w)) + (1 - self.b2) * (sens - ema).abs()
            self.ema[key] = ema

    def triplets(self, paths: list[str]) -> list[tuple[str, int, float]]:
        out = []
        for path in paths:
            s = {n: self.ema[(path, n)] * self.unc[(path, n)] for n in TRIPLET}
            for i in range(s["Lambda"].numel()):
                out.append((path, i, float(s["Lambda"][i] + s["P"][:, i].mean() + s["Q"][i, :].mean())))
        return out


def check_kept(kept: dict[str, list[int]], scored: list[tuple[str, int, float]], b: int) -> None:
    """Exactly b triplets kept, and they are the b best by the brute-force scores (up to float32 near-ties)."""
    assert sum(len(v) for v in kept.values()) == b
    ranked = sorted(scored, key=lambda t: -t[2])
    want = {(p, i) for p, i, _ in ranked[:b]}
    got = {(p, i) for p, idx in kept.items() for i in idx}
    threshold = ranked[b - 1][2] if b else math.inf
    score = {(p, i): s for p, i, s in scored}
    for key in want ^ got:
        assert abs(score[key] - threshold) <= 1e-5 * abs(threshold), f"{key} scored {score[key]}, threshold {threshold}"
    assert len(want ^ got) <= 2


def snapshot(model: nn.Module, name: str = "a", grad: bool = False) -> dict[tuple[str, str], Tensor]:
    out = {}
    for path, (_, piece) in module_pieces(model, name).items():
        for n in TRIPLET:
            t = getattr(piece, n).grad if grad else getattr(piece, n)
            out[(path, n)] = (torch.zeros_like(getattr(piece, n)) if t is None else t).detach().double().clone()
    return out


ALLOC = dict(init_r=4, target_r=2, alpha=8.0, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.7, orth_reg_weight=0.1)
TOTAL = 12


def test_kept_rank_follows_the_schedule_and_pruned_triplets_are_the_least_important() -> None:
    tiny, cfg = attach("llama", dt.AdaLoRA(**ALLOC))
    model = tiny.model.train()
    paths = list(module_pieces(model, "a"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.inputs["input_ids"]
    brute = Scores(cfg.beta1, cfg.beta2)
    final, b0, bT = TOTAL - cfg.tfinal, cfg.init_r * len(paths), cfg.target_r * len(paths)
    masked_at, loss = [], None
    for s in range(TOTAL):
        before_step(model, s, TOTAL)
        loss = model(input_ids=ids, labels=ids).loss + regularization(model)  # the last loss stays alive (its graph too)
        loss.backward()
        grads = snapshot(model, grad=True)
        opt.step()
        opt.zero_grad(set_to_none=True)  # as dt.train: gradients are gone before the hook
        t, values = s + 1, snapshot(model)
        if t < final:
            brute.update(values, grads)
        after_optimizer_step(model, opt, t, TOTAL)
        pieces = module_pieces(model, "a")
        if t == final:  # the final allocation removes the pruned triplets
            scored = brute.triplets(paths)
            kept = {p: [] for p in paths}
            for path, (_, piece) in pieces.items():
                lam0 = values[(path, "Lambda")]
                # the kept triplets are the surviving columns/rows, in their original order, values untouched
                idx = [int((lam0 == v).nonzero()[0]) for v in piece.Lambda.detach().double()]
                assert idx == sorted(idx)
                kept[path] = idx
                torch.testing.assert_close(piece.P.detach().double(), values[(path, "P")][:, idx])
                torch.testing.assert_close(piece.Q.detach().double(), values[(path, "Q")][idx])
            check_kept(kept, scored, bT)
            assert sum(ranks(model).values()) == bT
        elif t > final:
            assert sum(ranks(model).values()) == bT
        elif t > cfg.tinit and t % cfg.deltaT == 0:  # a masking step: λ_i = 0 outside the b(t) best
            masked_at.append(t)
            kept = {path: [i for i in range(cfg.init_r) if piece.Lambda[i] != 0] for path, (_, piece) in pieces.items()}
            check_kept(kept, brute.triplets(paths), paper_budget(t, cfg.tinit, final, b0, bT))
            for path, (_, piece) in pieces.items():
                lam = piece.Lambda.detach().double()
                assert torch.equal(lam[kept[path]], values[(path, "Lambda")][kept[path]])
        else:  # no allocation: the optimizer's values stand
            for path, (_, piece) in pieces.items():
                assert torch.equal(piece.Lambda.detach().double(), values[(path, "Lambda")])
                assert sum(ranks(model).values()) == b0
    assert masked_at == [4, 6, 8]
    assert {paper_budget(t, 2, final, b0, bT) for t in masked_at} == {38, 30, 28}
    assert loss is not None
    assert dt.summary(model)["a"].trainable == paper_count(model)


def paper_count(model: nn.Module, name: str = "a") -> int:
    """Σ r_k (d_in + d_out + 1) over the modules, with r_k each module's current rank."""
    modules = dict(model.named_modules())
    return sum(k * (sum(weight_view(modules[p]).shape) + 1) for p, k in ranks(model, name).items())


def test_pruning_keeps_the_function_and_the_optimizer_state_of_kept_triplets() -> None:
    tiny, cfg = attach("gpt2", dt.AdaLoRA(**ALLOC))
    model = tiny.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.inputs["input_ids"]
    final = TOTAL - cfg.tfinal
    for s in range(TOTAL):
        before_step(model, s, TOTAL)
        loss = model(input_ids=ids, labels=ids).loss + regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s + 1 == final:  # what pruning should give: the chosen triplets kept, the others at λ = 0 (scores are not
            # updated at the final step)
            twin = copy.deepcopy(model).eval()
            twin_pieces = module_pieces(twin, "a")
            allocator = next(iter(twin_pieces.values()))[1].allocator
            chosen = dict(zip(twin_pieces, allocator.choose(allocator.target_budget())))
            for path, (_, piece) in twin_pieces.items():
                piece.apply_mask(chosen[path])
            want_logits = tiny.logits(twin)
            state = {(path, n): {k: v.clone() for k, v in opt.state[getattr(piece, n)].items()}
                     for path, (_, piece) in module_pieces(model, "a").items() for n in TRIPLET}
        after_optimizer_step(model, opt, s + 1, TOTAL)
        if s + 1 == final:
            model.eval()
            torch.testing.assert_close(tiny.logits(), want_logits, atol=1e-6, rtol=0)
            model.train()
            for path, (module, piece) in module_pieces(model, "a").items():
                keep = chosen[path].nonzero().view(-1)
                assert piece.rank == len(keep)
                dw = piece.delta_weight(module)
                assert isinstance(dw, LowRankDelta) and dw.rank == len(keep)
                for n, dim in (("P", 1), ("Lambda", 0), ("Q", 0)):
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert torch.equal(opt.state[getattr(piece, n)][key], state[(path, n)][key].index_select(dim, keep))
    assert sum(piece.rank for _, (_, piece) in module_pieces(model, "a").items()) == cfg.target_r * 8


# --- files after pruning, resuming ----------------------------------------------------------------------------
def pruned(kind: str = "llama") -> tuple[Tiny, dt.AdaLoRA]:
    tiny, cfg = attach(kind, dt.AdaLoRA(**ALLOC))
    model = tiny.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.inputs["input_ids"]
    for s in range(TOTAL - cfg.tfinal):
        before_step(model, s, TOTAL)
        (model(input_ids=ids, labels=ids).loss + regularization(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, s + 1, TOTAL)
    model.eval()
    return tiny, cfg


def test_saved_file_and_summary_show_the_pruned_ranks(tmp_path: Path) -> None:
    tiny, cfg = pruned()
    kept = ranks(tiny.model)
    assert sum(kept.values()) == cfg.target_r * len(kept) and len(set(kept.values())) > 1  # unevenly allocated
    y = tiny.logits()
    dt.save(tiny.model, tmp_path / "d", name="a")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    delta = dt.Delta.read(tmp_path / "d")
    for path, k in kept.items():
        assert delta.config.rank(path) == k
        assert tuple(delta.state[path]["Lambda"].shape) == (k,) and delta.state[path]["P"].shape[1] == k
        dw = delta.tensors()[path]
        assert isinstance(dw, LowRankDelta) and dw.rank == k
        torch.testing.assert_close(dw.to_dense(), expected_dw(cfg, module_pieces(tiny.model, "a")[path][1]), atol=1e-6, rtol=0)
    assert meta["config"]["init_r"] == cfg.init_r and meta["config"]["rank_pattern"]
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    assert ranks(fresh) == kept
    assert dt.summary(fresh)["a"].params == dt.summary(tiny.model)["a"].params == paper_count(fresh)
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-6, rtol=0)
    before_step(fresh, 0, None, ["a"])  # a pruned delta has nothing left to prune: no planned step count needed
    assert next(iter(module_pieces(fresh, "a").values()))[1].allocator.finished
    dt.merge(fresh)  # merging the pruned delta is the same model
    torch.testing.assert_close(tiny.logits(fresh), y, atol=1e-5, rtol=0)


def test_a_pruned_state_loads_into_pieces_built_at_init_r() -> None:
    """Resuming from a checkpoint written after pruning: pieces built from the training config take its ranks."""
    tiny, cfg = pruned()
    y = tiny.logits()
    state = {path: piece.state_dict() for path, (_, piece) in module_pieces(tiny.model, "a").items()}
    other, _ = attach("llama", cfg, seed=11)
    for path, (_, piece) in module_pieces(other.model, "a").items():
        piece.load_state_dict(state[path])
    torch.testing.assert_close(other.logits(), y, atol=1e-6, rtol=0)
    bad = dict(state[next(iter(state))])
    bad["Q"] = torch.zeros(bad["Q"].shape[0] + 1, bad["Q"].shape[1])
    piece = next(iter(module_pieces(other.model, "a").values()))[1]
    before = {k: v.clone() for k, v in piece.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="P \\[16, r\\], Λ \\[r\\], Q \\[r, 16\\]"):
        piece.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in piece.state_dict().items())


def test_finalize_prunes_after_an_early_stop() -> None:
    tiny, cfg = attach("bert", dt.AdaLoRA(**ALLOC))
    model = tiny.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.raises(StateError, match="no importance scores"):
        adalora.finalize(model, "a", opt)
    labels = torch.tensor([0, 2])
    for s in range(5):  # stopped long before total − tfinal
        before_step(model, s, TOTAL)
        (model(**tiny.inputs, labels=labels).loss + regularization(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, s + 1, TOTAL)
    allocator = next(iter(module_pieces(model, "a").values()))[1].allocator
    chosen = [m.nonzero().view(-1).tolist() for m in allocator.choose(allocator.target_budget())]
    adalora.finalize(model, "a", opt)
    assert [piece.rank for _, (_, piece) in module_pieces(model, "a").items()] == [len(c) for c in chosen]
    assert sum(ranks(model).values()) == cfg.target_r * len(chosen)
    after_optimizer_step(model, opt, 6, TOTAL)  # the schedule is over: nothing moves any more
    assert sum(ranks(model).values()) == cfg.target_r * len(chosen)


# --- dt.train -------------------------------------------------------------------------------------------------
def test_dt_train_masks_on_schedule_and_saves_the_pruned_delta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.train import train
    from deltatune.train.data import local_splits
    from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    splits = local_splits(str(tmp_path / "train.jsonl"), "classification")
    masks: list[int] = []
    orig = RankAllocator.mask
    monkeypatch.setattr(RankAllocator, "mask", lambda self, keep: masks.append(keep) or orig(self, keep))
    delta = {"kind": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4, "deltaT": 2, "alpha": 8.0,
             "orth_reg_weight": 0.1, "targets": ["query", "value", "dense"]}
    r = train({"output_dir": str(tmp_path / "run"), "max_steps": 14, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0,
               "log_every": 7, "eval_every": 10**9, "progress": False, "plot": False, "delta": delta},
              model=tiny_bert(), tokenizer=word_tokenizer(), splits=splits)
    saved = dt.Delta.read(r.delta_path)
    ada = [p for p in saved.state if "Lambda" in saved.state[p]]
    n = len(ada)
    # per layer query, value, attention.output.dense, intermediate.dense, output.dense; plus pooler.dense
    assert n == 2 * 5 + 1 and "classifier" in saved.state  # the head trains in full next to the AdaLoRA pieces
    final = 14 - 4
    assert masks == [paper_budget(t, 2, final, 4 * n, 2 * n) for t in (4, 6, 8)]
    assert sum(int(saved.state[p]["Lambda"].numel()) for p in ada) == 2 * n


def test_early_stopping_restores_a_snapshot_taken_before_pruning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The best evaluation came before the ranks were pruned: dt.train puts the unpruned tensors back and saves them."""
    from deltatune.train import loop, train
    from deltatune.train.data import local_splits
    from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    splits = local_splits(str(tmp_path / "train.jsonl"), "classification")
    monkeypatch.setattr(loop._Run, "evaluate", lambda self, examples: {"accuracy": 1.0 / self.step, "loss": 0.0})
    delta = {"kind": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 2, "deltaT": 1, "targets": ["query"]}
    model = tiny_bert()
    snapshots: list[dict[str, Tensor]] = []
    orig = loop._trainable_snapshot
    monkeypatch.setattr(loop, "_trainable_snapshot", lambda m: snapshots.append(orig(m)) or snapshots[-1])
    pruned_to: list[int] = []
    finish = RankAllocator.finish
    monkeypatch.setattr(RankAllocator, "finish", lambda self: pruned_to.append(sum(p.rank for p in self.pieces)) or finish(self))
    r = train({"output_dir": str(tmp_path / "run"), "max_steps": 8, "batch_size": 8, "lr": 1e-2, "warmup_ratio": 0.0,
               "eval_every": 2, "early_stopping_patience": 50, "progress": False, "plot": False, "delta": delta,
               "name": "a"},
              model=model, tokenizer=word_tokenizer(), splits=splits)
    assert r.metrics["best_step"] == 2 and len(snapshots) == 1 and pruned_to == [2 * 2]  # pruned at step 6
    restored = {n: p for n, p in model.named_parameters() if n in snapshots[0]}
    assert all(torch.equal(restored[n], t) for n, t in snapshots[0].items())
    assert all(v == 4 for v in ranks(model).values())
    saved = dt.Delta.read(r.delta_path)
    assert saved.config.rank_pattern == {} and all(saved.state[p]["Lambda"].numel() == 4 for p in ranks(model))


def test_resume_from_a_checkpoint_written_after_pruning_gives_the_same_losses(tmp_path: Path) -> None:
    from deltatune.train import train
    from deltatune.train.data import local_splits
    from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", sentiment(64, 1))
    splits = local_splits(str(tmp_path / "train.jsonl"), "classification")
    common = {"max_steps": 12, "batch_size": 8, "lr": 1e-2, "log_every": 1, "eval_every": 10**9, "progress": False,
              "plot": False, "delta": {"kind": "adalora", "init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 4,
                                       "deltaT": 2, "targets": ["query", "value"]}}
    base = tiny_bert()
    straight = train({**common, "output_dir": str(tmp_path / "a")}, model=copy.deepcopy(base),
                     tokenizer=word_tokenizer(), splits=splits)
    train({**common, "output_dir": str(tmp_path / "b"), "checkpoint_every": 10}, model=copy.deepcopy(base),
          tokenizer=word_tokenizer(), splits=splits)  # pruned at step 8, checkpoint at 10
    model = copy.deepcopy(base)
    resumed = train({**common, "output_dir": str(tmp_path / "b"), "resume": True}, model=model,
                    tokenizer=word_tokenizer(), splits=splits)
    la = [h["loss"] for h in straight.history if "loss" in h]
    lb = [h["loss"] for h in resumed.history if "loss" in h]
    assert len(la) == len(lb) == 12 and la == pytest.approx(lb, abs=1e-6)
    assert sum(ranks(model, "default").values()) == 2 * 4
    assert dt.Delta.read(resumed.delta_path).config == dt.Delta.read(straight.delta_path).config


def test_hf_trainer_callback_prunes_on_schedule(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from deltatune.train.callback import DeltaCallback

    tiny, cfg = attach("llama", dt.AdaLoRA(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1))
    ids = tiny.inputs["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids.repeat(4, 1)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=tiny.model.train(), args=args, train_dataset=data, callbacks=[DeltaCallback()]).train()
    assert sum(ranks(tiny.model).values()) == cfg.target_r * 14 and len(set(ranks(tiny.model).values())) > 1
    allocator = next(iter(module_pieces(tiny.model, "a").values()))[1].allocator
    assert allocator.finished and allocator.updates == 3  # scores from the gradients of steps 1..3 (< 6 − 2)
    assert all(float(sc["P"].ema.sum()) > 0 and float(sc["Q"].ema.sum()) > 0
               for sc, piece in zip(allocator.scores, allocator.pieces) if piece.rank)


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,field", [
    (dict(init_r=0), "init_r"), (dict(target_r=5, init_r=4), "target_r"), (dict(target_r=0), "target_r"),
    (dict(alpha=0.0), "alpha"), (dict(tinit=-1), "tinit"), (dict(tfinal=1.5), "tfinal"), (dict(deltaT=0), "deltaT"),
    (dict(beta1=1.0), "beta1"), (dict(beta2=0.0), "beta2"), (dict(orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=0), "total_step"), (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
    (dict(rank_pattern={"q_proj": 13}), "rank_pattern"), (dict(rank_pattern={"(": 2}), "regular expression"),
])
def test_config_errors_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        dt.AdaLoRA(**bad)


def test_config_json_round_trip() -> None:
    cfg = dt.AdaLoRA(init_r=6, target_r=3, tinit=5, tfinal=7, deltaT=3, total_step=50, rank_pattern={"q_proj": 0})
    assert dt.DeltaConfig.from_json(cfg.to_json()) == cfg


def test_bad_targets_and_schedules_leave_the_model_untouched(tmp_path: Path) -> None:
    tiny = build_tiny("llama")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(TargetError, match="Embedding"):
        dt.attach(tiny.model, dt.AdaLoRA(targets=("embed_tokens",)), "a")
    with pytest.raises(TargetError, match="exceeds min"):
        dt.attach(tiny.model, dt.AdaLoRA(init_r=17, target_r=2), "a")
    assert not any("deltatune" in n for n, _ in tiny.model.named_modules())
    dt.attach(tiny.model, dt.AdaLoRA(init_r=4, target_r=2, tinit=6, tfinal=6), "a")
    with pytest.raises(ConfigError, match="budgeting phase"):
        before_step(tiny.model, 0, 12)
    with pytest.raises(ConfigError, match="total_step"):
        before_step(tiny.model, 0, None)
    # a file whose ranks disagree with its config is refused before anything is attached
    randomize(tiny.model, "a")
    dt.save(tiny.model, tmp_path / "d", name="a")
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    meta["config"]["rank_pattern"] = {"q_proj": 3}
    (tmp_path / "d" / "delta.json").write_text(json.dumps(meta))
    fresh = tiny.fresh()
    with pytest.raises(ShapeMismatchError, match="q_proj"):
        dt.load(fresh, tmp_path / "d")
    assert not any("deltatune" in n for n, _ in fresh.named_modules())
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


# --- peft 0.21.2 as the oracle --------------------------------------------------------------------------------
peft = pytest.importorskip("peft")


def peft_model(tiny: Tiny, **kw):  # type: ignore[no-untyped-def]
    import warnings

    from peft import AdaLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny.fresh(), AdaLoraConfig(target_modules=list(LLAMA_T), **kw))


def peft_layers(pm: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in pm.base_model.model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E}


def test_peft_forward_equals_ours_with_equal_weights() -> None:
    """peft: ΔW = lora_alpha / (ranknum + 1e-5) · B (A ⊙ E) with ranknum = init_r; ours s = alpha / init_r. Equal
    weights (A = Q, B = P, E = Λ) and alpha = lora_alpha · r / (r + 1e-5) give equal logits."""
    tiny, _ = attach("llama", dt.AdaLoRA(init_r=4, target_r=2, alpha=6.0 * 4 / (4 + 1e-5), targets=LLAMA_T))
    randomize(tiny.model, "a")
    pm = peft_model(tiny, init_r=4, target_r=2, lora_alpha=6, total_step=10).eval()
    layers = peft_layers(pm)
    assert set(layers) == set(module_pieces(tiny.model, "a"))
    with torch.no_grad():
        for path, (_, piece) in module_pieces(tiny.model, "a").items():
            layers[path].lora_A["default"].copy_(piece.Q)
            layers[path].lora_B["default"].copy_(piece.P)
            layers[path].lora_E["default"].copy_(piece.Lambda[:, None])
    y = tiny.logits()
    assert (y - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    torch.testing.assert_close(tiny.logits(pm), y, atol=1e-5, rtol=0)


def test_allocation_matches_peft_on_an_identical_run() -> None:
    """Same initial weights, data and AdamW; peft's update_and_allocate vs our step hooks. The Λ zero pattern after
    each masking step and the final rank pattern agree, and so do the logits after pruning (peft keeps masked zeros,
    we removed them)."""
    sched = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, beta1=0.8, beta2=0.7, orth_reg_weight=0.0)
    tiny, _ = attach("llama", dt.AdaLoRA(alpha=8.0 * 4 / (4 + 1e-5), targets=LLAMA_T, **sched))
    pm = peft_model(tiny, lora_alpha=8, total_step=TOTAL, **sched)
    layers, ours = peft_layers(pm), module_pieces(tiny.model, "a")
    with torch.no_grad():
        for path, (_, piece) in ours.items():  # peft's own init (E = 0, A, B ~ N(0, 0.02²)) in both
            piece.Q.copy_(layers[path].lora_A["default"])
            piece.P.copy_(layers[path].lora_B["default"])
            piece.Lambda.copy_(layers[path].lora_E["default"][:, 0])
    model = tiny.model.train()
    pm.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    popt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.inputs["input_ids"]
    final = TOTAL - sched["tfinal"]
    compared = 0
    for s in range(TOTAL):
        t = s + 1
        before_step(model, s, TOTAL)
        (model(input_ids=ids, labels=ids).loss + regularization(model)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, t, TOTAL)
        pm(input_ids=ids, labels=ids).loss.backward()
        popt.step()
        pm.base_model.update_and_allocate(t)
        popt.zero_grad(set_to_none=True)
        if t > sched["tinit"] and t % sched["deltaT"] == 0 and t < final:
            for path, (_, piece) in ours.items():
                assert torch.equal(piece.Lambda != 0, layers[path].lora_E["default"][:, 0] != 0), (t, path)
            compared += 1
        if t == final:
            pattern = pm.peft_config["default"].rank_pattern  # {"<path>.lora_E.default": [kept?] per triplet}
            for path, (_, piece) in ours.items():
                kept = torch.tensor(pattern[f"{path}.lora_E.default"])
                assert piece.rank == int(kept.sum())
                torch.testing.assert_close(piece.Lambda, layers[path].lora_E["default"][kept, 0], atol=1e-5, rtol=0)
                torch.testing.assert_close(piece.P, layers[path].lora_B["default"][:, kept], atol=1e-5, rtol=0)
            compared += 1
    assert compared == 4
    model.eval()
    pm.eval()
    torch.testing.assert_close(tiny.logits(pm), tiny.logits(), atol=1e-5, rtol=0)
