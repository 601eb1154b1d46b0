"""Composition blocks × positions against the formulas of docs/composition.md.

References are computed without deltatune's hooks: a fresh copy of the base model whose weights are changed
by hand (for blocks whose result is a weight change) or plain forward hooks that implement the formula
directly (Fuse, Route, Arrow). Delta parameters are random (non-zero) so every test can fail.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import ConfigError, DeltaNameError, StateError
from conftest import build_tiny, pieces_of, randomize_delta

ATOL = 1e-5
KV = ("k_proj", "v_proj")


_randomize = randomize_delta


def _attach(model, cfg, name, seed):
    dt.attach(model, cfg, name=name, activate=False)
    _randomize(model, name, seed=seed)


_pieces = pieces_of


def _lora_dw(model, name):
    mods = dict(model.named_modules())
    return {p: pc.delta_weight(mods[p]).to_dense() for p, pc in _pieces(model, name).items()}


def _ia3(model, name):
    return {p: pc.ia3_l.detach().clone() for p, pc in _pieces(model, name).items()}


def _ref_model(tiny, weight_fn):
    """A fresh base whose Linear weights are replaced by weight_fn(path, W) (no deltatune involved)."""
    ref = tiny.fresh()
    with torch.no_grad():
        for path, mod in ref.named_modules():
            if isinstance(mod, nn.Linear):
                new = weight_fn(path, mod.weight.clone())
                if new is not None:
                    mod.weight.copy_(new)
    return ref


@pytest.fixture
def lora_pair():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.LoRA(r=4, alpha=8), "a", 1)
    _attach(tiny.model, dt.LoRA(r=2, alpha=2), "b", 2)
    return tiny


@pytest.fixture
def ia3_pair():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "a", 1)
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "b", 2)
    return tiny


@pytest.fixture
def ia3_input_pair():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.IA3(targets=("down_proj",), feedforward=("down_proj",)), "a", 1)
    _attach(tiny.model, dt.IA3(targets=("down_proj",), feedforward=("down_proj",)), "b", 2)
    return tiny


# --- weight position: every block is a weight change W + Σ c_i ΔW_i --------------------------------------------
@pytest.mark.parametrize("block,coef", [
    (dt.Sum("a", "b"), (1.0, 1.0)), (dt.Stack("a", "b"), (1.0, 1.0)), (["a", "b"], (1.0, 1.0)),
    (dt.Average("a", "b"), (0.5, 0.5)), (dt.Average("a", "b", weights=[0.3, -1.2]), (0.3, -1.2)),
    (dt.Stack(dt.Sum("a"), dt.Average("b", weights=[2.0])), (1.0, 2.0)),
])
def test_weight_position_blocks(lora_pair, block, coef):
    tiny = lora_pair
    dwa, dwb = _lora_dw(tiny.model, "a"), _lora_dw(tiny.model, "b")
    ref = _ref_model(tiny, lambda p, w: w + coef[0] * dwa[p] + coef[1] * dwb[p] if p in dwa else None)
    dt.activate(tiny.model, block)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


# --- output position ((IA)3 on keys/values): h -> l ⊙ h -------------------------------------------------------
@pytest.mark.parametrize("block,combine", [
    (dt.Sum("a", "b"), lambda la, lb: la + lb - 1),
    (dt.Stack("a", "b"), lambda la, lb: la * lb),
    (dt.Average("a", "b", weights=[0.25, 0.5]), lambda la, lb: 1 + 0.25 * (la - 1) + 0.5 * (lb - 1)),
    (dt.Sum(dt.Stack("a", "b"), "a_copy"), None),  # nested: checked separately below
])
def test_output_position_blocks(ia3_pair, block, combine):
    tiny = ia3_pair
    if combine is None:
        _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "a_copy", 3)
        la, lb, lc = _ia3(tiny.model, "a"), _ia3(tiny.model, "b"), _ia3(tiny.model, "a_copy")
        scale = {p: la[p] * lb[p] + lc[p] - 1 for p in la}
    else:
        la, lb = _ia3(tiny.model, "a"), _ia3(tiny.model, "b")
        scale = {p: combine(la[p], lb[p]) for p in la}
    ref = _ref_model(tiny, lambda p, w: scale[p][:, None] * w if p in scale else None)
    dt.activate(tiny.model, block)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


@pytest.mark.parametrize("block,combine", [
    (dt.Sum("a", "b"), lambda la, lb: la + lb - 1),
    (dt.Stack("a", "b"), lambda la, lb: la * lb),
    (dt.Average("a", "b", weights=[0.7, 0.1]), lambda la, lb: 1 + 0.7 * (la - 1) + 0.1 * (lb - 1)),
])
def test_input_position_blocks(ia3_input_pair, block, combine):
    tiny = ia3_input_pair
    la, lb = _ia3(tiny.model, "a"), _ia3(tiny.model, "b")
    ref = _ref_model(tiny, lambda p, w: w * combine(la[p], lb[p])[None, :] if p in la else None)
    dt.activate(tiny.model, block)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


@pytest.mark.parametrize("order", ["lora-then-ia3", "ia3-then-lora"])
def test_positions_at_one_module_apply_input_weight_output(order):
    """At one module the order is input -> weight -> output whatever the block order: l ⊙ ((W + ΔW) x)."""
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.LoRA(r=2, targets=KV), "lora", 1)
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "ia3", 2)
    dw, l = _lora_dw(tiny.model, "lora"), _ia3(tiny.model, "ia3")
    ref = _ref_model(tiny, lambda p, w: l[p][:, None] * (w + dw[p]) if p in l else None)
    names = ("lora", "ia3") if order == "lora-then-ia3" else ("ia3", "lora")
    dt.activate(tiny.model, dt.Stack(*names))
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


# --- Fuse: the AdapterFusion formula, by hand with plain hooks -------------------------------------------------
def _fused_reference(tiny, fusion_pieces, value_fns, position="weight"):
    """Hooks on a fresh base computing Σ softmax(q·k_i/T) v_i over candidates value_fns[i](path, x, y)."""
    ref = tiny.fresh()
    handles = []
    for path, mod in ref.named_modules():
        if path not in fusion_pieces:
            continue
        fp = fusion_pieces[path]

        def hook(module, args, out, fp=fp, path=path):
            x = args[0]
            cands = [fn(path, x, out) for fn in value_fns]
            wq, bq, wk, bk, wv, bv = (t.detach() for t in (fp.wq, fp.bq, fp.wk, fp.bk, fp.wv, fp.bv))
            q = out @ wq.T + bq
            scores = torch.stack([(q * (c @ wk.T + bk)).sum(-1) for c in cands], -1) / fp.temperature
            alpha = torch.softmax(scores, -1)
            return sum(alpha[..., i:i + 1] * (c @ wv.T + bv) for i, c in enumerate(cands))

        handles.append(mod.register_forward_hook(hook))
    return ref


def _perturb_fusion(model, name):
    _randomize(model, name, std=0.2, seed=7)


def test_fuse_weight_position_formula(lora_pair):
    tiny = lora_pair
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b")), name="ab", activate=False)
    _perturb_fusion(tiny.model, "ab")
    dwa, dwb = _lora_dw(tiny.model, "a"), _lora_dw(tiny.model, "b")
    fps = _pieces(tiny.model, "ab")
    ref = _fused_reference(tiny, fps, [lambda p, x, y: y + x @ dwa[p].T, lambda p, x, y: y + x @ dwb[p].T])
    dt.activate(tiny.model, dt.Fuse("a", "b", fusion="ab"))
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def test_fuse_output_position_formula(ia3_pair):
    tiny = ia3_pair
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b"), temperature=0.5), name="ab", activate=False)
    _perturb_fusion(tiny.model, "ab")
    la, lb = _ia3(tiny.model, "a"), _ia3(tiny.model, "b")
    ref = _fused_reference(tiny, _pieces(tiny.model, "ab"), [lambda p, x, y: y * la[p], lambda p, x, y: y * lb[p]])
    dt.activate(tiny.model, dt.Fuse("a", "b", fusion="ab"))
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def test_fuse_input_position_formula(ia3_input_pair):
    tiny = ia3_input_pair
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b")), name="ab", activate=False)
    _perturb_fusion(tiny.model, "ab")
    la, lb = _ia3(tiny.model, "a"), _ia3(tiny.model, "b")
    fps = _pieces(tiny.model, "ab")
    ref = tiny.fresh()
    for path, mod in ref.named_modules():
        if path in fps:
            fp = fps[path]

            def pre(module, args, fp=fp, path=path):
                x = args[0]
                cands = [x * la[path], x * lb[path]]
                q = x @ fp.wq.T + fp.bq
                scores = torch.stack([(q * (c @ fp.wk.T + fp.bk)).sum(-1) for c in cands], -1)
                alpha = torch.softmax(scores / fp.temperature, -1)
                return (sum(alpha[..., i:i + 1] * (c @ fp.wv.T + fp.bv) for i, c in enumerate(cands)),)

            mod.register_forward_pre_hook(pre)
    dt.activate(tiny.model, dt.Fuse("a", "b", fusion="ab"))
    with torch.no_grad():
        torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def test_fusion_at_init_is_close_to_the_mean_and_trains_alone(lora_pair, tmp_path):
    tiny = lora_pair
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b"), init_std=1e-4), name="ab", activate=False)
    dt.activate(tiny.model, dt.Fuse("a", "b", fusion="ab"))
    fused = tiny.logits()
    with dt.active(tiny.model, dt.Average("a", "b")):
        torch.testing.assert_close(fused, tiny.logits(), atol=1e-4, rtol=0)
    # train the fusion only: gradients reach only its parameters, the loss goes down
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    params = [p for n, p in tiny.model.named_parameters() if ".deltatune.ab." in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = tiny.inputs["input_ids"]
    losses = []
    for _ in range(15):
        loss = tiny.model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in tiny.model.named_parameters() if ".deltatune.ab." not in n)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 1e-3
    before = tiny.logits()
    dt.save(tiny.model, tmp_path / "ab", name="ab")
    other = build_tiny("llama").model
    for name in ("a", "b"):
        dt.save(tiny.model, tmp_path / name, name=name)
        dt.load(other, tmp_path / name, name=name)
    dt.load(other, tmp_path / "ab", name="ab")
    dt.activate(other, dt.Fuse("a", "b", fusion="ab"))
    torch.testing.assert_close(tiny.logits(other), before, atol=ATOL, rtol=0)
    assert dt.summary(other)["ab"].params == sum(3 * (d * d + d) for d in
                                                 (pc.features for pc in _pieces(other, "ab").values()))


# --- nesting and bad compositions: clear errors, nothing changes ------------------------------------------------
@pytest.mark.parametrize("block,err", [
    (lambda: dt.Average(dt.Route(["a", "b"]), "c"), ConfigError),
    (lambda: dt.Fuse(dt.Sum("a", "b"), "c", fusion="f"), ConfigError),
    (lambda: dt.Fuse("a", "b", fusion="missing"), DeltaNameError),
    (lambda: dt.Stack("a", "a"), ConfigError),
    (lambda: dt.Sum("a", "nope"), DeltaNameError),
    (lambda: dt.Arrow("a", "ia3", top_k=1), ConfigError),
    (lambda: dt.Route([dt.Sum("a")]), ConfigError),
])
def test_bad_compositions_raise_at_activation_and_change_nothing(block, err):
    tiny = build_tiny("llama")
    for n, s in (("a", 1), ("b", 2), ("c", 3)):
        _attach(tiny.model, dt.LoRA(r=2), n, s)
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "ia3", 4)
    dt.activate(tiny.model, dt.Sum("a", "b"))
    before = tiny.logits()
    with pytest.raises(err):
        dt.activate(tiny.model, block())
    assert dt.active_block(tiny.model) == dt.Sum("a", "b")
    torch.testing.assert_close(tiny.logits(), before, atol=0, rtol=0)


def test_block_constructors_validate():
    with pytest.raises(ConfigError):
        dt.Average("a", "b", weights=[1.0])
    with pytest.raises(ConfigError):
        dt.Fuse("a", fusion="f")
    with pytest.raises(ConfigError):
        dt.Arrow("a", "b", top_k=3)
    with pytest.raises(ConfigError):
        dt.Route([])
    with pytest.raises(ConfigError):
        dt.Stack()


def test_merge_refused_under_average_and_average_unmerges(lora_pair):
    tiny = lora_pair
    dt.activate(tiny.model, ["a", "b"])
    dt.merge(tiny.model)
    dt.activate(tiny.model, dt.Average("a", "b", weights=[0.5, 0.25]))
    assert tiny.model._deltatune_state.merged == []  # unmerged: an Average cannot act through merged weights
    dwa, dwb = _lora_dw(tiny.model, "a"), _lora_dw(tiny.model, "b")
    ref = _ref_model(tiny, lambda p, w: w + 0.5 * dwa[p] + 0.25 * dwb[p] if p in dwa else None)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)
    with pytest.raises(StateError):
        dt.merge(tiny.model, "a")


def test_merged_ia3_next_to_another_delta_is_unmerged_first():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.LoRA(r=2, targets=KV), "lora", 1)
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "ia3", 2)
    dt.activate(tiny.model, "ia3")
    alone = tiny.logits()
    dt.merge(tiny.model)
    torch.testing.assert_close(tiny.logits(), alone, atol=ATOL, rtol=0)
    dt.activate(tiny.model, dt.Stack("lora", "ia3"))
    assert tiny.model._deltatune_state.merged == []
    dw, l = _lora_dw(tiny.model, "lora"), _ia3(tiny.model, "ia3")
    ref = _ref_model(tiny, lambda p, w: l[p][:, None] * (w + dw[p]) if p in l else None)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)
    with pytest.raises(StateError):
        dt.merge(tiny.model, "ia3")


def test_detach_removes_the_delta_from_the_composition(lora_pair):
    tiny = lora_pair
    dt.activate(tiny.model, dt.Average("a", "b", weights=[0.5, 2.0]))
    dt.detach(tiny.model, "a")
    assert dt.active_block(tiny.model) == dt.Average("b", weights=[2.0])
    dwb = _lora_dw(tiny.model, "b")
    ref = _ref_model(tiny, lambda p, w: w + 2.0 * dwb[p] if p in dwb else None)
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)


def test_fusion_over_attention_position_deltas_is_refused_at_attach():
    tiny = build_tiny("llama")
    for n in ("p1", "p2"):
        dt.attach(tiny.model, dt.PrefixTuning(n_tokens=2), name=n, activate=False)
    with pytest.raises(dt.errors.TargetError, match="attention position"):
        dt.attach(tiny.model, dt.Fusion(deltas=("p1", "p2")), name="f")
    assert set(tiny.model._deltatune_state.deltas) == {"p1", "p2"}


# --- regressions found in review --------------------------------------------------------------------------------
@pytest.fixture
def mixed_trio():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.LoRA(r=2), "a", 1)                          # every linear
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "b", 2)   # k/v outputs only
    _attach(tiny.model, dt.LoRA(r=3), "c", 3)
    return tiny


def test_average_over_a_block_whose_child_is_absent_at_some_modules(mixed_trio):
    tiny = mixed_trio
    dwa, dwc, lb = _lora_dw(tiny.model, "a"), _lora_dw(tiny.model, "c"), _ia3(tiny.model, "b")
    # weight position: W + 0.5 ΔW_a + 0.25 ΔW_c; output position (k/v): h + 0.5 (l ⊙ h - h)
    ref = _ref_model(tiny, lambda p, w: (1 + 0.5 * (lb[p] - 1))[:, None] * (w + 0.5 * dwa[p] + 0.25 * dwc[p]) if p in lb
                     else w + 0.5 * dwa[p] + 0.25 * dwc[p] if p in dwa else None)
    dt.activate(tiny.model, dt.Average(dt.Stack("a", "b"), "c", weights=[0.5, 0.25]))
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)
    dt.detach(tiny.model, "a")  # the nested child goes, the weights stay paired with their children
    assert dt.active_block(tiny.model) == dt.Average("b", "c", weights=[0.5, 0.25])


def test_sum_with_a_fuse_child_does_not_depend_on_order(lora_pair):
    tiny = lora_pair
    _attach(tiny.model, dt.LoRA(r=3), "c", 3)
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b")), name="ab", activate=False)
    _perturb_fusion(tiny.model, "ab")
    fuse = dt.Fuse("a", "b", fusion="ab")
    with dt.active(tiny.model, dt.Sum("c", fuse)):
        one = tiny.logits()
    with dt.active(tiny.model, dt.Sum(fuse, "c")):
        two = tiny.logits()
    with dt.active(tiny.model, dt.Average(fuse, "c", weights=[1.0, 1.0])):  # h + (Fuse(h) - h) + c(x)
        ref = tiny.logits()
    torch.testing.assert_close(one, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(two, ref, atol=ATOL, rtol=0)


def test_route_at_the_input_position_leaves_a_shared_input_alone():
    """gate_proj and up_proj read the same tensor: rescaling gate_proj's input per row must not touch up_proj's."""
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.IA3(targets=("gate_proj",), feedforward=("gate_proj",)), "a", 1)
    ids = tiny.inputs["input_ids"]
    with dt.active(tiny.model, "a"), torch.no_grad():
        alone = tiny.model(input_ids=ids[:1]).logits
    with dt.route(tiny.model, ["a", None]), torch.no_grad():
        out = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(out[:1], alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1:], tiny.logits(tiny.fresh())[1:], atol=ATOL, rtol=0)


def test_active_block_restore_forgets_deltas_detached_inside(lora_pair):
    tiny = lora_pair
    dt.activate(tiny.model, ["a", "b"])
    with dt.active(tiny.model, "b"):
        dt.detach(tiny.model, "a")
    assert dt.active_block(tiny.model) == "b"
    dt.merge(tiny.model)  # works: nothing stale left in the composition


def test_fuse_over_deltas_the_fusion_was_not_built_for_is_refused(lora_pair):
    tiny = lora_pair
    _attach(tiny.model, dt.LoRA(r=3), "c", 3)
    dt.attach(tiny.model, dt.Fusion(deltas=("a", "b")), name="ab", activate=False)
    with pytest.raises(ConfigError, match="built over"):
        dt.activate(tiny.model, dt.Fuse("a", "c", fusion="ab"))


def test_fusion_over_two_positions_of_one_module_is_refused():
    tiny = build_tiny("llama")
    _attach(tiny.model, dt.LoRA(r=2, targets=KV), "lora", 1)
    _attach(tiny.model, dt.IA3(targets=KV, feedforward=()), "ia3", 2)
    with pytest.raises(dt.errors.TargetError, match="different positions"):
        dt.attach(tiny.model, dt.Fusion(deltas=("lora", "ia3")), name="f")


def test_merge_works_when_a_weightless_piece_came_first_on_the_module():
    """A series adapter (no weight view) creates the slot; a LoRA added later on the same module still merges."""
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.Pfeiffer(targets=r".*mlp\.down_proj"), name="ad", activate=False)
    _attach(tiny.model, dt.LoRA(r=2, targets=("down_proj",)), "lo", 1)
    dt.activate(tiny.model, "lo")
    before = tiny.logits()
    dt.merge(tiny.model, "lo")
    torch.testing.assert_close(tiny.logits(), before, atol=ATOL, rtol=0)
    dt.unmerge(tiny.model)
    torch.testing.assert_close(tiny.logits(), before, atol=ATOL, rtol=0)


def test_regularization_defaults_to_active_trainable_deltas():
    from deltatune.runtime.step_hooks import regularization

    tiny = build_tiny("llama")
    _attach(tiny.model, dt.SORSA(r=2, gamma=1.0, targets=("q_proj",)), "s", 1)  # random change: a non-zero penalty
    _attach(tiny.model, dt.LoRA(r=2), "lo", 2)
    dt.activate(tiny.model, "s")
    assert float(regularization(tiny.model)) > 0
    dt.activate(tiny.model, "lo")
    assert float(regularization(tiny.model)) == 0.0
    assert float(regularization(tiny.model, ["s"])) > 0  # named explicitly: still counted
