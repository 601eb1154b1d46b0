"""SpIEL: the sparse autograd function, drop/regrow, optimizer state, memory, files, training loops.

Expected values come from direct implementations here: a dense copy of the model with W + ΔW as a leaf (its
autograd gradients), hand-built gradients with known magnitudes and brute-force top-k, a reference run
without regrowth for the optimizer state, and the allocator's own peak for memory.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, ShapeMismatchError
from deltatune.io.files import apply
from deltatune.methods.sparse import autograd as sparse_autograd, spiel
from deltatune.methods.sparse.autograd import SparseLinearFunction
from deltatune.runtime.step_hooks import after_optimizer_step, before_step

from conftest import Tiny, build_tiny, module_pieces as pieces

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress": False, "plot": False}


# --- helpers that do not trust the code under test ------------------------------------------------------


def scatter(index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense [out, in] with values at flat row-major indices, by plain Python indexing."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    for i, v in zip(index.tolist(), values.tolist()):
        out[i] += v
    return out.view(shape)


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def randomize(model: nn.Module, name: str, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, piece in pieces(model, name).values():
            piece.values.copy_(torch.randn(piece.values.shape, generator=g) * scale)


def dense_reference(tiny: Tiny, model: nn.Module, name: str) -> nn.Module:
    """A plain copy of the base whose targeted weights are W + ΔW leaves (requires_grad), everything else frozen."""
    ref = tiny.fresh()
    modules = dict(ref.named_modules())
    for p in ref.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        for path, (_, piece) in pieces(model, name).items():
            m = modules[path]
            dw = scatter(piece.index, piece.values.detach(), tuple(piece.shape.tolist()))
            m.weight.add_(dw if isinstance(m, nn.Linear) else dw.t())
            m.weight.requires_grad_(True)
    return ref


def mlp(width: int = 6, depth: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])


def load_common():
    spec = importlib.util.spec_from_file_location("deltatune_bench_common", ROOT / "bench" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --- the autograd function against a dense reference -------------------------------------------------
@pytest.mark.parametrize("csr", [False, True], ids=["dense-path", "csr-path"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"], ids=["linear-llama", "conv1d-gpt2"])
def test_forward_backward_match_dense_reference(kind: str, csr: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_autograd, "CSR_MAX_DENSITY", 1.0 if csr else 0.0)
    tiny = build_tiny(kind)
    dt.attach(tiny.model, dt.Sparse(k=20, seed=4), "s")
    randomize(tiny.model, "s")
    ref = dense_reference(tiny, tiny.model, "s")
    ids = tiny.inputs["input_ids"]
    embed = tiny.model.get_input_embeddings()
    g = torch.Generator().manual_seed(9)
    upstream = torch.randn(*ids.shape, 64, generator=g)

    def run(model: nn.Module) -> tuple[Tensor, Tensor]:
        x = embed(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits
        (logits * upstream).sum().backward()
        return logits.detach(), x.grad

    logits, gx = run(tiny.model)
    ref_logits, ref_gx = run(ref)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert gx.abs().max() > 1e-3 and torch.allclose(gx, ref_gx, atol=1e-5)
    modules = dict(ref.named_modules())
    for path, (module, piece) in pieces(tiny.model, "s").items():
        m = modules[path]
        grad = m.weight.grad if isinstance(m, nn.Linear) else m.weight.grad.t()  # [out, in]
        want = grad.reshape(-1)[piece.index]
        assert torch.allclose(piece.values.grad, want, atol=1e-5), path
        assert module.weight.grad is None  # the base stays frozen
    assert sum(float(p.values.grad.abs().sum()) for _, p in pieces(tiny.model, "s").values()) > 1e-2


@pytest.mark.parametrize("csr", [False, True], ids=["dense-path", "csr-path"])
def test_function_alone_against_formula(csr: bool) -> None:
    """y = acc + x ΔWᵀ; ∂/∂x = g ΔW; ∂/∂values = (gᵀx)[index]; ∂/∂acc = g, with 3-D inputs."""
    g = torch.Generator().manual_seed(1)
    out_, in_, k = 7, 5, 9
    index = torch.randperm(out_ * in_, generator=g)[:k]  # unsorted, as after a regrow
    values = torch.randn(k, generator=g, requires_grad=True)
    x = torch.randn(2, 3, in_, generator=g, requires_grad=True)
    acc = torch.randn(2, 3, out_, generator=g, requires_grad=True)
    up = torch.randn(2, 3, out_, generator=g)
    y = SparseLinearFunction.apply(x, acc, index, values, (out_, in_), None, csr)
    (y * up).sum().backward()
    w = scatter(index, values.detach(), (out_, in_))
    assert torch.allclose(y, acc.detach() + x.detach() @ w.t(), atol=1e-5)
    assert torch.allclose(x.grad, up @ w, atol=1e-5)
    assert torch.allclose(acc.grad, up)
    dense_grad = up.reshape(-1, out_).t() @ x.detach().reshape(-1, in_)
    assert torch.allclose(values.grad, dense_grad.reshape(-1)[index], atol=1e-5)


def test_nothing_of_size_out_by_in_is_saved_for_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Between forward and backward the function keeps x, index and values only (checked on what autograd saves)."""
    out_, in_, n, k = 40, 48, 3, 30
    model = nn.Sequential(nn.Linear(in_, out_, bias=False))
    dt.attach(model, dt.Sparse(k=k), "s")
    x = torch.randn(n, in_)
    for csr in (0.0, 1.0):  # the dense and the CSR path
        monkeypatch.setattr(sparse_autograd, "CSR_MAX_DENSITY", csr)
        saved: list[Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            model(x).sum()
        assert sorted(t.numel() for t in saved) == sorted([k, k, n * in_])
        assert max(t.numel() for t in saved) < out_ * in_


# --- regrowth on hand-built cases -------------------------------------------------------------------
def hand_layer(kind: str, every: int = 2, window: int = 2, fraction: float = 0.5) -> tuple[nn.Module, nn.Module]:
    """Linear(4 -> 3) with a sparse delta at known entries and values; a regrow replaces n = 4 · 0.5 = 2 of them
    (constant fraction)."""
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    dt.attach(model, dt.Sparse(k=4, regrow_every=every, regrow_window=window, regrow_fraction=fraction,
                               regrow=kind, regrow_decay="constant"), "s")
    piece = pieces(model, "s")["0"][1]
    with torch.no_grad():
        piece.index.copy_(torch.tensor([0, 5, 7, 10]))
        piece.values.copy_(torch.tensor([0.5, -0.01, 0.3, 0.02]))  # slots 1 and 3 are the smallest
    return model, piece


def backward_with(model: nn.Module, x: Tensor, g: Tensor) -> None:
    """One backward whose dense gradient of ΔW is gᵀx (loss = Σ y ⊙ g)."""
    (model(x) * g).sum().backward()
    for p in model.parameters():
        p.grad = None


GRADS = [  # (x [N, 4], g [N, 3]) per window step
    (torch.tensor([[1.0, -2.0, 0.5, 3.0]]), torch.tensor([[0.2, -1.0, 0.7]])),
    (torch.tensor([[0.3, 1.0, -1.5, 0.1], [2.0, 0.0, 1.0, -0.4]]), torch.tensor([[1.0, 0.5, -0.2], [-0.6, 0.3, 0.9]])),
]


def run_window(model: nn.Module, steps: list[tuple[Tensor, Tensor]]) -> None:
    """Steps 1..len(steps) with every = window = len(steps); the regrow happens after the last; no optimizer."""
    for step, (x, g) in enumerate(steps):
        before_step(model, step, None)
        backward_with(model, x, g)
        after_optimizer_step(model, None, step + 1, None)


def expected_regrow(index: list[int], values: list[float], scores: Tensor, n: int) -> tuple[list[int], list[float]]:
    """Brute force: drop the n smallest |value|, take the n best-scoring positions not kept; new entries take the
    freed slots in ascending order (slot order, position order); an entry dropped and chosen again stays."""
    order = sorted(range(len(index)), key=lambda s: (abs(values[s]), s))
    drop = order[:n]
    kept = {index[s] for s in range(len(index)) if s not in drop}
    cands = sorted((p for p in range(scores.numel()) if p not in kept), key=lambda p: -float(scores.view(-1)[p]))
    chosen = cands[:n]
    index, values = list(index), list(values)
    free = sorted(s for s in drop if index[s] not in chosen)
    new = sorted(p for p in chosen if p not in {index[s] for s in drop})
    for s, p in zip(free, new):
        index[s], values[s] = p, 0.0
    return index, values


def test_accumulated_regrow_picks_the_largest_summed_gradients() -> None:
    model, piece = hand_layer("accumulated")
    run_window(model, GRADS)
    summed = sum(g.t() @ x for x, g in GRADS)  # [3, 4]
    want_index, want_values = expected_regrow([0, 5, 7, 10], [0.5, -0.01, 0.3, 0.02], summed.abs(), 2)
    assert piece.index.tolist() == want_index
    assert piece.values.tolist() == pytest.approx(want_values)
    assert want_index != [0, 5, 7, 10]  # the case really moves entries
    assert piece._stats is None or not piece._stats.tensors()  # this window's accumulator is gone after the regrow


def test_momentum_regrow_uses_row_times_column_second_moments() -> None:
    model, piece = hand_layer("momentum")
    run_window(model, GRADS)
    sq = [(g.t() @ x) ** 2 for x, g in GRADS]
    rows, cols = sum(s.sum(1) for s in sq), sum(s.sum(0) for s in sq)
    want_index, want_values = expected_regrow([0, 5, 7, 10], [0.5, -0.01, 0.3, 0.02], torch.outer(rows, cols), 2)
    assert piece.index.tolist() == want_index
    assert piece.values.tolist() == pytest.approx(want_values)


def test_momentum_ranks_exactly_for_a_rank_one_gradient() -> None:
    """With one token the gradient is gᵀx (rank 1): r_i c_j = g_i² x_j² ‖g‖² ‖x‖², the same order as |G|."""
    x, g = torch.tensor([[0.3, -2.0, 1.1, 0.7]]), torch.tensor([[1.5, -0.4, 0.9]])
    results = []
    for kind in ("accumulated", "momentum"):
        model, piece = hand_layer(kind, every=1, window=1)
        run_window(model, [(x, g)])
        results.append(piece.index.tolist())
    assert results[0] == results[1]


def test_dropped_entry_chosen_again_keeps_its_slot_and_value() -> None:
    model, piece = hand_layer("accumulated", every=1, window=1)
    # slots 1 (position 5) and 3 (position 10) are dropped; G = gᵀx is 5 at position 5, 1.5 at 7 (kept),
    # 1 at 9, 0.3 at 11 and 0 elsewhere: positions 5 and 9 are regrown
    x = torch.tensor([[0.0, 1.0, 0.0, 0.3]])
    g = torch.tensor([[0.0, 5.0, 1.0]])
    run_window(model, [(x, g)])
    assert piece.index.tolist() == [0, 5, 7, 9]  # slot 1 keeps 5 (chosen again), slot 3 takes 9
    assert piece.values.tolist() == pytest.approx([0.5, -0.01, 0.3, 0.0])


def test_schedule_window_and_fraction() -> None:
    # every 5, window 2: statistics in steps 4, 5, 9, 10, ... (1-based), none for the regrow at the last step
    windows = [s + 1 for s in range(20) if spiel.in_window(s, 5, 2, total=15)]
    assert windows == [4, 5, 9, 10]
    assert spiel.fraction(0.2, "linear", 5, 20) == pytest.approx(0.15)
    assert spiel.fraction(0.2, "cosine", 10, 20) == pytest.approx(0.1)
    assert spiel.fraction(0.2, "constant", 10, 20) == pytest.approx(0.2)
    assert spiel.fraction(0.2, "linear", 10, None) == pytest.approx(0.2)
    assert spiel.count(20, 0.5 * (1 - 0.3)) == 7


def test_number_replaced_follows_the_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    """k = 40 on a 10x10 weight, every 2, window 1, fraction 0.5, linear over 8 steps: n = ⌊40 · 0.5 · (1 - s/8)⌋
    = 15, 10, 5 at steps 2, 4, 6 and no regrow at the last step."""
    calls: list[int] = []
    orig = spiel.regrow
    monkeypatch.setattr(spiel, "regrow", lambda index, values, stats, n, opt: calls.append(n) or orig(index, values, stats, n, opt))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    dt.attach(model, dt.Sparse(k=40, regrow_every=2, regrow_window=1, regrow_fraction=0.5), "s")
    piece = pieces(model, "s")["0"][1]
    g = torch.Generator().manual_seed(3)
    replaced = []
    for step in range(8):
        before = piece.index.clone()
        with torch.no_grad():
            piece.values.copy_(torch.randn(40, generator=g))  # distinct magnitudes: nothing is dropped and regrown
        before_step(model, step, 8)
        (model(torch.randn(4, 10, generator=g)) * torch.randn(4, 10, generator=g)).sum().backward()
        piece.values.grad = None
        after_optimizer_step(model, None, step + 1, 8)
        replaced.append(int((piece.index != before).sum()))
    assert calls == [15, 10, 5]
    # a dropped entry chosen again keeps its slot, so fewer slots may change than n, never more
    assert all(0 < r <= n for r, n in zip(replaced[1:7:2], calls)) and replaced[0::2] == [0, 0, 0, 0] and replaced[7] == 0


# --- optimizer state ------------------------------------------------------------------------------
def adamw_run(regrow: bool, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    tiny = build_tiny("llama")
    cfg = dt.Sparse(k=24, seed=2, **({"regrow_every": steps, "regrow_window": 2, "regrow_fraction": 0.5} if regrow else {}))
    dt.attach(tiny.model, cfg, "s")
    model = tiny.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tiny.inputs["input_ids"]
    for step in range(steps):
        before_step(model, step, 100)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, step + 1, 100)
    return model, opt


def test_optimizer_state_kept_exactly_for_kept_entries_and_zero_for_new_ones() -> None:
    ref_model, ref_opt = adamw_run(regrow=False, steps=4)
    model, opt = adamw_run(regrow=True, steps=4)  # regrows after step 4
    ref_pieces, new_pieces = pieces(ref_model, "s"), pieces(model, "s")
    total_new = 0
    for path, (_, piece) in new_pieces.items():
        ref = ref_pieces[path][1]
        kept = piece.index == ref.index
        new = ~kept
        total_new += int(new.sum())
        assert int(new.sum()) <= math.floor(24 * 0.5 * (1 - 4 / 100))  # n = 11; fewer if a dropped one is re-chosen
        st, rst = opt.state[piece.values], ref_opt.state[ref.values]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[key][kept], rst[key][kept]), (path, key)
            assert torch.equal(st[key][new], torch.zeros(int(new.sum()))), (path, key)
            assert rst[key][new].abs().min() > 0  # the reference had state there: zeroing is visible
        assert torch.equal(piece.values.detach()[kept], ref.values.detach()[kept])
        assert torch.equal(piece.values.detach()[new], torch.zeros(int(new.sum())))
        assert float(st["step"]) == float(rst["step"]) == 4.0  # the per-tensor step count is left alone
        assert not set(piece.index[new].tolist()) & set(ref.index.tolist())  # new positions were not active
    assert total_new >= 10 * len(new_pieces)


# --- memory ----------------------------------------------------------------------------------------
def training_peak(common, model: nn.Module, x: Tensor, step: int = 0, total: int | None = None) -> int:
    """Bytes alive before a step (weights, buffers, optimizer state, input) plus the allocator's peak above that
    during forward, backward, AdamW step and the step hooks (one untimed step first, as in bench/_common)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = {}

    def one(s: int) -> None:
        before_step(model, s, total)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, s + 1, total)

    def setup() -> None:
        one(step - 1 if step else 0)
        before["bytes"] = common.storage_bytes(common.live_state(model, opt, x))

    above, _ = common.allocator_peak(lambda: one(step), setup)
    return before["bytes"] + above


def test_peak_training_memory_grows_with_k_not_with_the_weights() -> None:
    common = load_common()
    width, depth, k = 256, 4, 256 * 8  # 3 % of each weight
    x = torch.randn(8, width)
    configs = {"minimal": dt.Sparse(k=1), "dense": dt.Dense(), "spiel": dt.Sparse(k=k, regrow_every=10, regrow_window=1),
               "spiel-ag-window": dt.Sparse(k=k, regrow_every=10, regrow_window=1, regrow="accumulated"),
               "spiel-ma-window": dt.Sparse(k=k, regrow_every=10, regrow_window=1, regrow="momentum")}
    extra = {}
    for name, cfg in configs.items():
        model = mlp(width, depth)
        dt.attach(model, cfg, "d")
        # "window": the measured step is step 10, which gathers statistics (window 1) and ends in a regrow
        extra[name] = training_peak(common, model, x, step=9 if "window" in name else 0, total=100)
    extra = {name: peak - extra["minimal"] for name, peak in extra.items()}  # above the frozen model's own step
    weights = depth * width * width * 4
    # a dense delta adds its ΔW, its gradient and two AdamW moments: four weights' worth
    assert extra["dense"] > 3.5 * weights
    # SpIEL between windows: k values, k int64 indices, k grads, 2k moments, plus one layer's transient ΔW
    assert extra["spiel"] < 0.5 * weights and extra["spiel"] < 0.12 * extra["dense"]
    # in a window the accumulated-gradient variant holds an fp32 accumulator per weight; momentum rows and columns
    assert extra["spiel-ag-window"] - extra["spiel"] > 0.9 * weights
    assert extra["spiel-ma-window"] - extra["spiel"] < 0.5 * weights


# --- files, merging, training ------------------------------------------------------------------------
def trained_with_regrow(kind: str = "llama") -> tuple[Tiny, dict[str, Tensor]]:
    tiny = build_tiny(kind)
    dt.attach(tiny.model, dt.Sparse(k=16, seed=1, regrow_every=2, regrow_window=1, regrow_fraction=0.5), "s")
    start = {p: piece.index.clone() for p, (_, piece) in pieces(tiny.model, "s").items()}
    model = tiny.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    ids = tiny.inputs["input_ids"]
    for step in range(5):
        before_step(model, step, 10)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after_optimizer_step(model, opt, step + 1, 10)
    model.eval()
    return tiny, start


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_save_load_after_regrow_gives_equal_logits(kind: str, tmp_path: Path) -> None:
    tiny, start = trained_with_regrow(kind)
    moved = {p for p, (_, piece) in pieces(tiny.model, "s").items() if not torch.equal(piece.index, start[p])}
    assert len(moved) == len(start)
    dt.save(tiny.model, tmp_path / "d", name="s")
    fresh = tiny.fresh()
    dt.load(fresh, tmp_path / "d")
    assert torch.allclose(tiny.logits(fresh), tiny.logits(), atol=1e-6)
    assert not torch.allclose(tiny.logits(fresh), tiny.logits(tiny.fresh()), atol=1e-3)
    loaded = dt.Delta.read(tmp_path / "d")
    assert loaded.config == pieces(tiny.model, "s")[next(iter(start))][1].cfg
    assert loaded.config.regrow_every == 2 and loaded.config.regrow_fraction == 0.5
    for path, (_, piece) in pieces(tiny.model, "s").items():
        assert torch.equal(loaded.state[path]["index"], piece.index)  # the moved, unsorted index is what is saved


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_equals_unmerged_after_regrow(kind: str) -> None:
    tiny, _ = trained_with_regrow(kind)
    unmerged = tiny.logits()
    weights = {n: p.detach().clone() for n, p in tiny.model.named_parameters() if ".deltatune." not in n}
    dt.merge(tiny.model, "s")
    assert torch.allclose(tiny.logits(), unmerged, atol=1e-5)
    for path, (module, piece) in pieces(tiny.model, "s").items():
        want = weights[f"{path}.weight"] + (lambda d: d if isinstance(module, nn.Linear) else d.t())(
            scatter(piece.index, piece.values.detach(), tuple(piece.shape.tolist())))
        assert torch.allclose(module.weight, want, atol=1e-6)
    dt.unmerge(tiny.model)
    for n, p in tiny.model.named_parameters():
        if ".deltatune." not in n:
            assert torch.allclose(p, weights[n], atol=1e-6)


def test_bad_saved_indices_are_refused_and_leave_the_model_untouched() -> None:
    tiny, _ = trained_with_regrow()
    delta = dt.Delta.from_model(tiny.model, "s")
    path = next(iter(delta.state))
    for bad, what in ((lambda i: i.clone().fill_(int(i[0])), "repeated"), (lambda i: i + 10**6, "outside")):
        broken = copy.deepcopy(delta)
        broken.state[path]["index"] = bad(broken.state[path]["index"])
        fresh = tiny.fresh()
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(ShapeMismatchError, match=what):
            apply(fresh, broken, "x")
        assert not any("deltatune" in n for n, _ in fresh.named_modules())
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_config_validation_and_json_round_trip() -> None:
    cfg = dt.Sparse(k=5, regrow_every=20, regrow="momentum", regrow_fraction=0.3, regrow_decay="cosine", regrow_window=4)
    again = dt.DeltaConfig.from_json(cfg.to_json())
    assert again == cfg and again.regrow == "momentum" and again.regrow_window == 4
    for bad, field in ((dict(regrow_every=0), "regrow_every"), (dict(regrow_every=2.5), "regrow_every"),
                       (dict(regrow="gradient"), "regrow"), (dict(regrow_fraction=0.0), "regrow_fraction"),
                       (dict(regrow_fraction=1.5), "regrow_fraction"), (dict(regrow_decay="exp"), "regrow_decay"),
                       (dict(regrow_every=3, regrow_window=4), "regrow_window"), (dict(regrow_window=0), "regrow_window")):
        with pytest.raises(ConfigError, match=field):
            dt.Sparse(k=5, **bad)


def test_train_loop_regrows_and_loss_decreases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.train import train
    from deltatune.train.data import local_splits
    from train_fixtures import additions, tiny_llama, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", additions(64, 1))
    splits = local_splits(str(tmp_path / "train.jsonl"), "generation")
    model = tiny_llama()
    seen: list[int] = []
    orig = spiel.regrow
    monkeypatch.setattr(spiel, "regrow", lambda *a: seen.append(orig(*a)) or seen[-1])
    r = train({"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 8, "lr": 2e-2, "log_every": 5,
               "warmup_ratio": 0.0, "task": "generation",
               "delta": {"kind": "sparse", "density": 0.1, "regrow_every": 5, "regrow_window": 2}, **QUIET},
              model=model, tokenizer=word_tokenizer(causal=True), splits=splits)
    losses = [h["loss"] for h in r.history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    assert len(seen) == 5 * 14 and sum(seen) > 0  # regrows at steps 5..25 on 14 weights, none at the last step
    saved = dt.Delta.read(r.delta_path)
    assert saved.config.regrow_every == 5


def test_hf_trainer_callback_regrows_and_resets_optimizer_state(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from deltatune.train.callback import DeltaCallback

    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Sparse(k=16, regrow_every=3, regrow_window=1, regrow_fraction=0.5,
                                    regrow_decay="constant"), "s")
    ids = tiny.inputs["input_ids"]
    data = [{"input_ids": row, "labels": row} for row in ids.repeat(4, 1)]
    start = {p: piece.index.clone() for p, (_, piece) in pieces(tiny.model, "s").items()}
    snapshots: list[dict] = []

    class Spy(DeltaCallback):  # records the optimizer state right after the regrow at step 3
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):  # type: ignore[no-untyped-def]
            before = {p: (piece.index.clone(), {k: v.clone() for k, v in optimizer.state[piece.values].items()})
                      for p, (_, piece) in pieces(model, "s").items()} if state.global_step == 3 else None
            super().on_step_end(args, state, control, model=model, optimizer=optimizer, **kw)
            if before is not None:
                snapshots.append({p: (before[p], piece.index.clone(), {k: v.clone() for k, v in optimizer.state[piece.values].items()})
                                  for p, (_, piece) in pieces(model, "s").items()})

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    Trainer(model=tiny.model.train(), args=args, train_dataset=data, callbacks=[Spy()]).train()
    assert snapshots
    changed = 0
    for path, ((idx0, st0), idx1, st1) in snapshots[0].items():
        new = idx0 != idx1
        changed += int(new.sum())
        assert int(new.sum()) <= 8
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st1[key][~new], st0[key][~new]) and not st1[key][new].any()
    assert changed >= 6 * len(start)
    assert all(not torch.equal(piece.index, start[p]) for p, (_, piece) in pieces(tiny.model, "s").items())
