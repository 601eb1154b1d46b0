"""Sparse storage and composition, PaCA, SHiRA gradient masks and the LT-SFT driver — every check numeric.

Expected values come from direct implementations here (dense matrices built by hand, brute-force top-k,
autograd on a plain copy of the weights, a replay of LT-SFT's phase 1 with the ordinary loop), never from the
code under test.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, ShapeMismatchError, TargetError, UnsupportedError
from deltatune.io.files import apply
from deltatune.init import attach_sparse, gradient_mask, select_entries
from deltatune.core.layouts import layout_by_name
from deltatune.methods.sparse.paca import PaCAPiece
from deltatune.train import train
from deltatune.train.data import local_splits
from deltatune.train.lt_sft import add_l1_pull

from conftest import Tiny, build_tiny, module_pieces as pieces
from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

QUIET = {"progress": False, "plot": False}


# --- helpers that do not trust the code under test ------------------------------------------------------


def weight_view(module: nn.Module) -> Tensor:
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def to_native(module: nn.Module, dw: Tensor) -> Tensor:
    return dw if isinstance(module, nn.Linear) else dw.t()


def scatter(index: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense [out, in] with values at flat row-major indices (duplicates add), by plain Python indexing."""
    out = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    for i, v in zip(index.tolist(), values.tolist()):
        out[i] += v
    return out.view(shape)


def base_weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "deltatune" not in k}


@torch.no_grad()
def fill(model: nn.Module, name: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, piece in pieces(model, name).values():
        for p in piece.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def sparse_dense(piece: nn.Module) -> Tensor:
    return scatter(piece.index, piece.values.detach(), tuple(int(s) for s in piece.shape))


def lora_dense(piece: nn.Module, cfg: dt.LoRA) -> Tensor:
    return (cfg.alpha / cfg.r) * piece.lora_B.detach() @ piece.lora_A.detach()


def reference(tiny: Tiny, updates: dict[str, Tensor]) -> nn.Module:
    """A plain copy of the base with W + ΔW (ΔW in the [out, in] view) at each path."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for path, dw in updates.items():
            mods[path].weight.add_(to_native(mods[path], dw))
    return ref


def add_updates(*maps: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for m in maps:
        for p, t in m.items():
            out[p] = out[p] + t if p in out else t.clone()
    return out


# === SparseDelta storage ==================================================================================
def test_sparse_files_store_int64_indices_with_k_per_tensor_and_roundtrip_exactly(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"a.q": (6, 5), "a.k": (4, 9), "b.v": (7, 3)}
    ks = {"a.q": 4, "a.k": 11, "b.v": 1}
    tensors = {p: dt.SparseDelta(torch.randperm(math.prod(s), generator=g)[: ks[p]],
                                 torch.randn(ks[p], generator=g), s) for p, s in shapes.items()}
    delta = dt.Delta.from_tensors("s", tensors, module_types={p: "Linear" for p in shapes})
    delta.write(tmp_path / "s")
    with safe_open(str(tmp_path / "s" / "delta.safetensors"), "pt") as f:
        for p in shapes:
            assert f.get_slice(f"{p}.index").get_dtype() == "I64"
            assert f.get_tensor(f"{p}.index").numel() == ks[p] == f.get_tensor(f"{p}.values").numel()
    back = dt.Delta.read(tmp_path / "s")
    assert {p: back.config.for_module(p).entries(p, math.prod(shapes[p])) for p in shapes} == ks
    for p, t in back.tensors().items():
        assert torch.equal(t.to_dense(), tensors[p].to_dense())  # bitwise
        assert torch.equal(t.to_dense(), scatter(tensors[p].index, tensors[p].values, shapes[p]))


def test_sparse_add_and_subtract_are_exact_with_overlapping_indices() -> None:
    shape = (5, 4)
    a = dt.SparseDelta(torch.tensor([1, 7, 8, 19]), torch.tensor([0.1, -2.5, 3.25, 1e-3]), shape)
    b = dt.SparseDelta(torch.tensor([19, 0, 7]), torch.tensor([0.7, 4.0, 2.5]), shape)
    da, db = scatter(a.index, a.values, shape), scatter(b.index, b.values, shape)
    s, d = a + b, a - b
    assert isinstance(s, dt.SparseDelta) and isinstance(d, dt.SparseDelta)
    assert torch.equal(s.to_dense(), da + db) and torch.equal(d.to_dense(), da - db)
    assert s.nnz == 5 and s.index.tolist() == [0, 1, 7, 8, 19]  # the union, overlaps stored once
    assert float(s.to_dense().view(-1)[7]) == 0.0  # -2.5 + 2.5 cancels exactly


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sparse_merge_is_exact_and_unmerge_restores(kind: str) -> None:
    tiny = build_tiny(kind)
    dt.attach(tiny.model, dt.Sparse(k=7, seed=3), "s")
    fill(tiny.model, "s", 1)
    w0 = base_weights(tiny.model)
    want = {p: sparse_dense(piece) for p, (_, piece) in pieces(tiny.model, "s").items()}
    y = tiny.logits()
    torch.testing.assert_close(y, tiny.logits(reference(tiny, want)), atol=1e-5, rtol=0)
    dt.merge(tiny.model, "s")
    for p, (module, _) in pieces(tiny.model, "s").items():
        assert torch.equal(weight_view(module), weight_view(tiny.fresh().get_submodule(p)) + want[p])
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)
    dt.unmerge(tiny.model)
    for k, v in base_weights(tiny.model).items():
        assert (v - w0[k]).abs().max() <= 1e-7, k


# === composition ==========================================================================================
def test_two_sparse_deltas_equal_their_sum_and_the_dense_reference(tmp_path) -> None:
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Sparse(density=0.2, seed=1), "s1")
    dt.attach(tiny.model, dt.Sparse(density=0.2, seed=2), "s2")
    fill(tiny.model, "s1", 10)
    fill(tiny.model, "s2", 11)
    p1, p2 = pieces(tiny.model, "s1"), pieces(tiny.model, "s2")
    assert any(len(set(p1[p][1].index.tolist()) & set(p2[p][1].index.tolist())) for p in p1)  # overlaps exist
    d1 = {p: sparse_dense(piece) for p, (_, piece) in p1.items()}
    d2 = {p: sparse_dense(piece) for p, (_, piece) in p2.items()}
    dt.activate(tiny.model, ["s1", "s2"])
    both = tiny.logits()
    want = tiny.logits(reference(tiny, add_updates(d1, d2)))
    torch.testing.assert_close(both, want, atol=1e-5, rtol=0)
    # one Sparse delta whose values are the sums (index union) gives the same function
    t1, t2 = dt.Delta.from_model(tiny.model, "s1").tensors(), dt.Delta.from_model(tiny.model, "s2").tensors()
    summed = dt.Delta.from_tensors("sum", {p: t1[p] + t2[p] for p in t1}, module_types={p: "Linear" for p in t1})
    summed.write(tmp_path / "sum")
    single = tiny.fresh()
    dt.load(single, tmp_path / "sum")
    torch.testing.assert_close(tiny.logits(single), want, atol=1e-5, rtol=0)
    for p, (_, piece) in pieces(single, "sum").items():
        assert torch.equal(sparse_dense(piece), d1[p] + d2[p])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_sparse_and_lora_together_add_and_merge_exactly(kind: str) -> None:
    tiny = build_tiny(kind)
    lcfg = dt.LoRA(r=2, alpha=6.0)
    dt.attach(tiny.model, lcfg, "lora")
    dt.attach(tiny.model, dt.Sparse(k=9, seed=5), "sp")
    fill(tiny.model, "lora", 20)
    fill(tiny.model, "sp", 21)
    w0 = base_weights(tiny.model)
    dl = {p: lora_dense(piece, lcfg) for p, (_, piece) in pieces(tiny.model, "lora").items()}
    ds = {p: sparse_dense(piece) for p, (_, piece) in pieces(tiny.model, "sp").items()}
    want = tiny.logits(reference(tiny, add_updates(dl, ds)))
    dt.activate(tiny.model, ["lora", "sp"])
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.logits(grad=True).detach(), want, atol=1e-5, rtol=0)  # autograd path
    dt.merge(tiny.model, ["lora", "sp"])
    torch.testing.assert_close(tiny.logits(), want, atol=1e-5, rtol=0)
    dt.unmerge(tiny.model)
    for k, v in base_weights(tiny.model).items():
        assert (v - w0[k]).abs().max() <= 1e-7, k


# === PaCA =================================================================================================
def _paca_linear(bias: bool, conv1d: bool = False) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    lin = Conv1D(6, 10) if conv1d else nn.Linear(10, 6)  # Conv1D(nf=out, nx=in)
    if conv1d:
        nn.init.normal_(lin.bias)
    model = nn.Sequential(lin)
    dt.attach(model, dt.PaCA(r=3, seed=4, bias=bias, targets=("0",)), "p")
    fill(model, "p", 2)
    return model, lin


@pytest.mark.parametrize("variant", ["linear", "linear-bias", "conv1d"])
def test_paca_forward_and_backward_match_a_dense_reference(variant: str) -> None:
    model, lin = _paca_linear(bias=variant == "linear-bias", conv1d=variant == "conv1d")
    piece = pieces(model, "p")["0"][1]
    cols = piece.cols
    assert cols.numel() == 3 and torch.equal(cols, torch.sort(cols).values) and len(set(cols.tolist())) == 3
    # the reference: W' = W + D with D[:, cols] = V, as a plain matmul with its own leaf tensors
    w = weight_view(lin).detach().clone()
    v = piece.block.detach().clone().requires_grad_(True)
    db = piece.bias.detach().clone().requires_grad_(True) if hasattr(piece, "bias") else None
    x = torch.randn(2, 5, 10, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    d = torch.zeros(6, 10).index_copy(1, cols, v)
    y_ref = x_ref @ (w + d).t() + lin.bias.detach() + (db if db is not None else 0)
    y = model(x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(piece.block.grad, v.grad, atol=1e-6, rtol=0)
    # V's gradient is the partial product gᵀ x[:, cols] by the formula
    torch.testing.assert_close(piece.block.grad, (g.reshape(-1, 6).t() @ x.detach().reshape(-1, 10))[:, cols],
                               atol=1e-5, rtol=0)
    if db is not None:
        torch.testing.assert_close(piece.bias.grad, db.grad, atol=1e-6, rtol=0)
    assert lin.weight.grad is None  # the base stays frozen
    with torch.no_grad():  # the in-place inference path gives the same output
        torch.testing.assert_close(model(x), y_ref, atol=1e-6, rtol=0)


def _saved_by(fn, *args) -> list[Tensor]:
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return saved


def test_paca_saves_only_the_partial_activation() -> None:
    n_tok, d_in, d_out, r = 64, 48, 32, 4
    lin = nn.Linear(d_in, d_out)
    model = nn.Sequential(lin)
    dt.attach(model, dt.PaCA(r=r, targets=("0",)), "p")
    piece = pieces(model, "p")["0"][1]
    x = torch.randn(n_tok, d_in, requires_grad=True)  # an activation from an earlier layer
    base_out = lin(x).detach()
    saved = _saved_by(piece, x, base_out, base_out.clone(), lin)
    params = {t.data_ptr() for t in (piece.block, piece.cols)}
    activations = [t for t in saved if t.data_ptr() not in params]
    assert max(t.numel() for t in activations) == n_tok * r  # the [N, r] partial input ...
    assert any(torch.equal(t, x.detach()[:, piece.cols]) for t in activations)
    assert sum(t.numel() for t in activations) == n_tok * r  # ... and nothing else of activation size
    # the same probe sees a LoRA branch keep the whole [N, in] input (so the check above can fail)
    lmodel = nn.Sequential(nn.Linear(d_in, d_out))
    dt.attach(lmodel, dt.LoRA(r=r, targets=("0",)), "l")
    lpiece = pieces(lmodel, "l")["0"][1]
    lsaved = _saved_by(lpiece, x, base_out, base_out.clone(), lmodel[0])
    assert max(t.numel() for t in lsaved) == n_tok * d_in


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_paca_merge_save_load_and_param_count(kind: str, tmp_path) -> None:
    tiny = build_tiny(kind)
    y0 = tiny.logits()
    cfg = dt.PaCA(r=3, seed=9)
    dt.attach(tiny.model, cfg, "p")
    torch.testing.assert_close(tiny.logits(), y0, atol=1e-6, rtol=0)  # zero block: the base function
    fill(tiny.model, "p", 3)
    ps = pieces(tiny.model, "p")
    assert dt.summary(tiny.model)["p"].params == sum(3 * weight_view(m).shape[0] for m, _ in ps.values())
    updates = {p: torch.zeros(weight_view(m).shape).index_copy(1, piece.cols, piece.block.detach())
               for p, (m, piece) in ps.items()}
    for p, (m, piece) in ps.items():
        assert torch.equal(piece.delta_weight(m).to_dense(), updates[p])
    y = tiny.logits()
    torch.testing.assert_close(y, tiny.logits(reference(tiny, updates)), atol=1e-5, rtol=0)
    w0 = base_weights(tiny.model)
    dt.merge(tiny.model, "p")
    torch.testing.assert_close(tiny.logits(), y, atol=1e-5, rtol=0)
    dt.unmerge(tiny.model)
    for k, v in base_weights(tiny.model).items():
        assert (v - w0[k]).abs().max() <= 1e-7, k
    dt.save(tiny.model, tmp_path / "p")
    other = tiny.fresh()
    dt.load(other, tmp_path / "p")
    torch.testing.assert_close(tiny.logits(other), y, atol=1e-6, rtol=0)
    for p, (_, piece) in pieces(other, "p").items():
        assert torch.equal(piece.cols, ps[p][1].cols) and torch.equal(piece.block, ps[p][1].block)
    # without a model: the file's tensors are the same updates, and tensors_to_state inverts update
    read = dt.Delta.read(tmp_path / "p")
    for p, t in read.tensors().items():
        assert torch.equal(t.to_dense(), updates[p])
        layout = layout_by_name(read.module_types[p])
        again = PaCAPiece.tensors_to_state(t, None, layout)
        assert all(torch.equal(again[k], read.state[p][k]) for k in ("cols", "block", "shape"))


def test_paca_fraction_and_errors() -> None:
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.PaCA(fraction=0.25), "f")
    for m, piece in pieces(tiny.model, "f").values():
        assert piece.r == round(0.25 * weight_view(m).shape[1])
    with pytest.raises(ConfigError, match="exactly one"):
        dt.PaCA(r=4, fraction=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        dt.PaCA(fraction=1.5)
    fresh = build_tiny("llama")
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(TargetError, match="exceeds"):
        dt.attach(fresh.model, dt.PaCA(r=17), "big")  # q_proj has 16 input columns
    assert not any("deltatune" in n for n, _ in fresh.model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    scattered = dt.SparseDelta(torch.tensor([0, 5]), torch.ones(2), (2, 4))  # not whole columns
    with pytest.raises(UnsupportedError, match="columns"):
        PaCAPiece.tensors_to_state(scattered, None, layout_by_name("Linear"))


# === SHiRA gradient mask ==================================================================================
def test_gradient_mask_picks_top_accumulated_abs_gradients_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    batches = [(torch.randn(5, 4), torch.randn(5, 3)) for _ in range(3)]

    def loss_fn(m: nn.Module, batch) -> Tensor:  # L = Σ c ⊙ (x W0ᵀ): ∂L/∂W0 = cᵀ x; W1 gets no gradient
        x, c = batch
        return (m[0](x) * c).sum()

    score = sum((c.t() @ x).abs() for x, c in batches)  # [3, 4], by the formula
    want = torch.sort(torch.argsort(score.reshape(-1), descending=True)[:5]).values
    flags = [p.requires_grad for p in model.parameters()]
    masks = gradient_mask(model, dt.Sparse(k=5, targets=("0",)), batches, loss_fn=loss_fn, progress=False)
    assert list(masks) == ["0"] and torch.equal(masks["0"], want)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    # global: one threshold over both weights; W1's scores are all zero, so all 5 come from W0
    both = gradient_mask(model, dt.Sparse(k=5, targets=("0", "1")), batches, loss_fn=loss_fn, selection="global",
                         progress=False)
    assert list(both) == ["0"] and torch.equal(both["0"], want)
    # and the mask becomes a Sparse delta training exactly those entries
    attach_sparse(model, dt.Sparse(k=1), masks, "shira")
    piece = pieces(model, "shira")["0"][1]
    assert torch.equal(piece.index, want) and torch.equal(piece.values, torch.zeros(5))


def test_gradient_mask_on_conv1d_uses_the_out_in_view() -> None:
    tiny = build_tiny("gpt2")
    ids = tiny.inputs["input_ids"]
    batches = [{"input_ids": ids, "labels": ids}, {"input_ids": ids.flip(1), "labels": ids.flip(1)}]
    cfg = dt.Sparse(k=6, targets=("c_attn",))
    masks = gradient_mask(tiny.model, cfg, batches, progress=False)
    ref = tiny.fresh()
    for p in ref.parameters():
        p.requires_grad_(False)
    paths = [p for p, m in ref.named_modules() if p.endswith("c_attn")]
    for p in paths:
        ref.get_submodule(p).weight.requires_grad_(True)
    score = {p: 0 for p in paths}
    for b in batches:  # Σ_b |∂L_b/∂W|: the magnitude of each batch's gradient, not of their sum
        ref(**b).loss.backward()
        for p in paths:
            w = ref.get_submodule(p).weight
            score[p] = score[p] + w.grad.abs().t()  # Conv1D stores [in, out]
            w.grad = None
    for p in paths:
        assert torch.equal(masks[p], torch.sort(torch.topk(score[p].reshape(-1), 6).indices).values)


def test_attach_sparse_rejects_bad_indices_and_leaves_the_model() -> None:
    tiny = build_tiny("llama")
    path = "model.layers.0.self_attn.q_proj"
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="unique positions"):
        attach_sparse(tiny.model, dt.Sparse(k=1), {path: torch.tensor([0, 256])}, "x")  # q_proj is 16x16
    with pytest.raises(ShapeMismatchError, match="unique positions"):
        attach_sparse(tiny.model, dt.Sparse(k=1), {path: torch.tensor([3, 3])}, "x")
    with pytest.raises(TargetError, match="no module"):
        attach_sparse(tiny.model, dt.Sparse(k=1), {"model.nope": torch.tensor([1])}, "x")
    assert not any("deltatune" in n for n, _ in tiny.model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


# === LT-SFT selection =====================================================================================
def _brute_topk(scores: dict[str, Tensor], k: int) -> dict[str, set[int]]:
    """Top-k over all tensors by sorting (path, flat index, score) triples in Python."""
    triples = [(float(v), p, i) for p, s in scores.items() for i, v in enumerate(s.reshape(-1).tolist())]
    triples.sort(key=lambda t: -t[0])
    out: dict[str, set[int]] = {}
    for _, p, i in triples[:k]:
        out.setdefault(p, set()).add(i)
    return out


def test_select_entries_global_and_per_tensor_count_and_density() -> None:
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(4, 5, generator=g) * 3, "b": torch.rand(2, 3, generator=g), "c": torch.rand(6, 2, generator=g)}
    as_sets = lambda d: {p: set(i.tolist()) for p, i in d.items()}  # noqa: E731
    assert as_sets(select_entries(scores, k=7)) == _brute_topk(scores, 7)
    total = sum(s.numel() for s in scores.values())
    assert as_sets(select_entries(scores, density=0.25)) == _brute_topk(scores, round(0.25 * total))
    per = select_entries(scores, k=3, selection="per_tensor")
    assert as_sets(per) == {p: _brute_topk({p: s}, 3)[p] for p, s in scores.items()}
    per_d = select_entries(scores, density=0.5, selection="per_tensor")
    assert as_sets(per_d) == {p: _brute_topk({p: s}, round(0.5 * s.numel()))[p] for p, s in scores.items()}
    assert all(i.dtype == torch.int64 and torch.equal(i, torch.sort(i).values) for i in per.values())
    with pytest.raises(ConfigError, match="exactly one"):
        select_entries(scores, k=3, density=0.1)
    with pytest.raises(ConfigError, match="exceeds"):
        select_entries(scores, k=total + 1)
    with pytest.raises(ConfigError, match="selection"):
        select_entries(scores, k=3, selection="layerwise")


def test_l1_pull_adds_lambda_sign_to_the_gradient() -> None:
    p = nn.Parameter(torch.tensor([0.5, -2.0, 0.0, 3.0]))
    handles = add_l1_pull([p], 0.25)
    (p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # ∂/∂p [Σ c p + 0.25 Σ|p|] = c + 0.25 sign(p) (subgradient 0 at p = 0)
    assert torch.equal(p.grad, torch.tensor([1.25, 1.75, 3.0, 4.25]))
    for h in handles:
        h.remove()


# === LT-SFT driver ========================================================================================
@pytest.fixture(scope="module")
def cls_splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("lt_data")
    write_jsonl(d / "train.jsonl", sentiment(96, 1))
    write_jsonl(d / "val.jsonl", sentiment(24, 2))
    return local_splits(str(d / "train.jsonl"), "classification", validation=str(d / "val.jsonl"),
                        test=str(d / "val.jsonl"))


BASE = {"batch_size": 8, "lr": 1e-2, "max_steps": 4, "eval_every": 100, "delta": {"kind": "dense"}, **QUIET}


@pytest.fixture(scope="module")
def phase1_dw(cls_splits, tmp_path_factory) -> dict[str, Tensor]:
    """|ΔW| of LT-SFT's phase 1, replayed with the ordinary loop (same config, seed and data order)."""
    model = tiny_bert()
    train({**BASE, "output_dir": str(tmp_path_factory.mktemp("replay"))}, model=model, tokenizer=word_tokenizer(),
          splits=cls_splits)
    return {p: piece.delta.detach().abs().clone() for p, (_, piece) in pieces(model, "default").items()
            if hasattr(piece, "delta")}


@pytest.mark.parametrize("lt", [{"k": 300}, {"density": 0.05}, {"k": 20, "selection": "per_tensor"},
                                {"density": 0.1, "selection": "per_tensor"}],
                         ids=["global-count", "global-density", "per-tensor-count", "per-tensor-density"])
def test_lt_sft_selects_top_dense_updates_and_trains_only_them(lt, phase1_dw, cls_splits, tmp_path) -> None:
    base = tiny_bert()
    r = train({**BASE, "output_dir": str(tmp_path), "procedure": {"kind": "lt_sft", **lt}}, model=copy.deepcopy(base),
              tokenizer=word_tokenizer(), splits=cls_splits)
    delta = dt.Delta.read(r.delta_path)
    assert delta.config.kind == "sparse"
    got = {p: set(st["index"].tolist()) for p, st in delta.state.items() if "index" in st}
    if lt.get("selection") == "per_tensor":
        k = lambda s: lt["k"] if "k" in lt else round(lt["density"] * s.numel())  # noqa: E731
        want = {p: _brute_topk({p: s}, k(s))[p] for p, s in phase1_dw.items()}
    else:
        total = sum(s.numel() for s in phase1_dw.values())
        want = _brute_topk(phase1_dw, lt.get("k") or round(lt["density"] * total))
    assert got == want
    assert r.metrics["selected_entries"] == sum(len(v) for v in want.values())
    record = json.loads((tmp_path / "lt_sft.json").read_text())
    assert record["selected_entries"] == r.metrics["selected_entries"]
    assert (tmp_path / "dense" / "metrics.jsonl").exists() and not (tmp_path / "dense" / "delta").exists()
    # phase 2 changed the selected entries only (and the head, trained in full and saved with the delta)
    model = copy.deepcopy(base)
    dt.load(model, r.delta_path)
    dt.merge(model)
    changed_any = False
    for p, idx in got.items():
        diff = (weight_view(model.get_submodule(p)) - weight_view(base.get_submodule(p))).reshape(-1)
        moved = set(torch.nonzero(diff).reshape(-1).tolist())
        assert moved <= idx, p
        changed_any |= bool(moved)
    assert changed_any
    untouched = [p for p, m in base.named_modules() if isinstance(m, nn.Linear) and p not in got and p != "classifier"]
    assert all(torch.equal(model.get_submodule(p).weight, base.get_submodule(p).weight) for p in untouched)
    assert not torch.equal(model.classifier.weight, base.classifier.weight)


def test_lt_sft_l1_pull_shrinks_values(cls_splits, tmp_path) -> None:
    def values(l1: float) -> Tensor:
        r = train({**BASE, "output_dir": str(tmp_path / str(l1)), "lr": 1e-3, "max_steps": 6,
                   "procedure": {"kind": "lt_sft", "density": 0.05, "l1": l1}}, model=tiny_bert(), tokenizer=word_tokenizer(),
                  splits=cls_splits)
        return torch.cat([st["values"] for st in dt.Delta.read(r.delta_path).state.values() if "values" in st])

    free, pulled = values(0.0), values(5.0)
    assert free.numel() == pulled.numel()
    assert pulled.abs().sum() < 0.5 * free.abs().sum()


def test_lt_sft_config_errors_before_any_training(cls_splits, tmp_path) -> None:
    with pytest.raises(ConfigError, match="kind: dense"):
        train({**BASE, "delta": {"kind": "lora"}, "procedure": {"kind": "lt_sft", "density": 0.1}, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown lt_sft"):
        train({**BASE, "procedure": {"kind": "lt_sft", "density": 0.1, "dense_steps": 3}, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="exactly one"):
        train({**BASE, "procedure": {"kind": "lt_sft", "density": 0.1, "k": 5}, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="checkpoint"):
        train({**BASE, "procedure": {"kind": "lt_sft", "density": 0.1}, "checkpoint_every": 2, "output_dir": str(tmp_path)})
    model = tiny_bert()
    with pytest.raises(TargetError, match="Embedding"):  # phase 2 could not hold it: refused before phase 1
        train({**BASE, "delta": {"kind": "dense", "targets": ["word_embeddings"]}, "procedure": {"kind": "lt_sft", "density": 0.1},
               "output_dir": str(tmp_path / "e")}, model=model, tokenizer=word_tokenizer(), splits=cls_splits)
    assert not (tmp_path / "e").exists() and not any("deltatune" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("cols", [[1, 99], [2, 2]])
def test_paca_file_with_bad_columns_is_refused_and_model_untouched(tmp_path, cols):
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.PaCA(r=2, targets=("q_proj",)), "p")
    dt.save(tiny.model, tmp_path / "p", name="p")
    delta = dt.Delta.read(tmp_path / "p")
    path = next(iter(delta.state))
    delta.state[path]["cols"] = torch.tensor(cols, dtype=torch.int64)
    fresh = build_tiny("llama").model
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match="PaCA delta"):
        apply(fresh, delta)
    assert dt.active_names(fresh) == () and all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("bad, match", [({"kind": "nope"}, "unknown training procedure 'nope'"),
                                        ("lt_sft", "procedure must be a mapping"),
                                        ({"density": 0.1}, "procedure must be a mapping with a 'kind'")])
def test_unknown_or_malformed_procedure_is_refused(bad, match) -> None:
    from deltatune.train.config import TrainConfig

    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({"procedure": bad, "delta": {"kind": "dense"}})


def test_lt_sft_budget_larger_than_the_weights_fails_before_phase_one(cls_splits, tmp_path) -> None:
    model = tiny_bert()
    with pytest.raises(ConfigError, match="exceeds"):
        train({**BASE, "procedure": {"kind": "lt_sft", "k": 10**9}, "output_dir": str(tmp_path)}, model=model,
              tokenizer=word_tokenizer(), splits=cls_splits)
    assert not (tmp_path / "dense").exists()  # phase 1 never ran
    assert dt.active_names(model) == ()
