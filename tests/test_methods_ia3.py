"""(IA)3: capability tests on tiny Llama / GPT-2 / BERT and peft's IA3 as the oracle."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.errors import StateError, TargetError
from conftest import build_tiny, pieces_of

ATOL = 1e-5
CASES = {  # model kind -> (targets, feedforward) as (IA)3 places them: keys, values and the FFN's second linear
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt2": (r".*attn\.c_attn|.*mlp\.c_proj", r".*mlp\.c_proj"),  # c_attn: queries too (one module)
    "bert": (r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense"),
}


def _attach(kind, seed=1, name="ia3"):
    tiny = build_tiny(kind)
    targets, ffn = CASES[kind]
    dt.attach(tiny.model, dt.IA3(targets=targets, feedforward=ffn), name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tiny.model.named_parameters():
            if f".deltatune.{name}." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return tiny



def _pieces(model, name="ia3"):
    return pieces_of(model, name)


def _by_hand(tiny, name="ia3", extra=None):
    """A fresh base with every targeted weight rescaled: W diag(l) (FFN input) or diag(l) W, b ⊙ l (outputs)."""
    ref = tiny.fresh()
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for path, piece in _pieces(tiny.model, name).items():
            mod, l = mods[path], piece.ia3_l.detach()
            conv1d = type(mod).__name__ == "Conv1D"
            w = mod.weight.t() if conv1d else mod.weight  # [out, in] view
            if extra is not None:
                w += extra[path]
            if piece.position == "input":
                w.mul_(l[None, :])
            else:
                w.mul_(l[:, None])
                if mod.bias is not None:
                    mod.bias.mul_(l)
    return ref


@pytest.mark.parametrize("kind", list(CASES))
def test_identity_at_init_and_formula(kind):
    tiny = build_tiny(kind)
    targets, ffn = CASES[kind]
    dt.attach(tiny.model, dt.IA3(targets=targets, feedforward=ffn), name="ia3")
    torch.testing.assert_close(tiny.logits(), tiny.logits(tiny.fresh()), atol=0, rtol=0)
    tiny = _attach(kind)
    positions = {p.position for p in _pieces(tiny.model).values()}
    assert positions == {"input", "output"}
    torch.testing.assert_close(tiny.logits(), tiny.logits(_by_hand(tiny)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_merge_unmerge_save_load(kind, tmp_path):
    tiny = _attach(kind)
    before = tiny.logits()
    weights = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    dt.merge(tiny.model)
    torch.testing.assert_close(tiny.logits(), before, atol=ATOL, rtol=0)
    dt.unmerge(tiny.model)
    for n, p in tiny.model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    dt.save(tiny.model, tmp_path / "ia3", name="ia3")
    other = tiny.fresh()
    dt.load(other, tmp_path / "ia3", name="ia3")
    torch.testing.assert_close(tiny.logits(other), before, atol=0, rtol=0)
    d = dt.Delta.read(tmp_path / "ia3")
    mods = dict(tiny.fresh().named_modules())
    for path, piece in _pieces(tiny.model).items():  # the file's ΔW against the base equals the piece's
        dw, _ = d.update(path, base=tiny.fresh())
        torch.testing.assert_close(dw.to_dense(), piece.delta_weight(mods[path]).to_dense(), atol=1e-6, rtol=0)


def test_grads_only_on_ia3_and_sum_with_lora():
    tiny = _attach("llama")
    tiny.logits(grad=True).square().mean().backward()
    assert all((p.grad is not None) == (".deltatune.ia3." in n) for n, p in tiny.model.named_parameters())
    dt.attach(tiny.model, dt.LoRA(r=2, targets=("k_proj", "down_proj")), name="lora", activate=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in tiny.model.named_parameters():
            if ".deltatune.lora." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    mods = dict(tiny.model.named_modules())
    dws = {p: pc.delta_weight(mods[p]).to_dense() for p, pc in _pieces(tiny.model, "lora").items()}
    dt.activate(tiny.model, ["lora", "ia3"])
    # outputs: l ⊙ ((W + ΔW) x); FFN input: (W + ΔW)(l ⊙ x): (IA)3 rescales whatever the module computes
    ref = _by_hand(tiny, extra={p: dws.get(p, 0) for p in _pieces(tiny.model)})
    with torch.no_grad():
        for p, m in ref.named_modules():
            if p in dws and p not in _pieces(tiny.model):
                m.weight += dws[p]
    torch.testing.assert_close(tiny.logits(), tiny.logits(ref), atol=ATOL, rtol=0)
    with pytest.raises(StateError):  # merged, it would no longer rescale LoRA's contribution
        dt.merge(tiny.model, "ia3")


@pytest.mark.parametrize("kind", list(CASES))
def test_parameter_count_and_peft_oracle(kind):
    from peft import IA3Config, get_peft_model

    tiny = _attach(kind)
    targets, ffn = CASES[kind]
    mods = dict(tiny.model.named_modules())
    # the paper's count: one vector per rescaled activation, d_out for keys/values, d_in for the FFN input
    expect = 0
    for path, piece in _pieces(tiny.model).items():
        w = mods[path].weight
        d_out, d_in = (w.shape[1], w.shape[0]) if type(mods[path]).__name__ == "Conv1D" else w.shape
        expect += d_in if piece.position == "input" else d_out
    assert dt.summary(tiny.model)["ia3"].trainable == expect
    peft_targets = list(targets) if isinstance(targets, tuple) else targets
    peft_ffn = list(ffn) if isinstance(ffn, tuple) else ffn
    theirs = get_peft_model(tiny.fresh(), IA3Config(target_modules=peft_targets, feedforward_modules=peft_ffn)).eval()
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, piece in _pieces(tiny.model).items():
            p = params[f"base_model.model.{path}.ia3_l.default"]
            p.copy_(piece.ia3_l.view(p.shape))
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == expect
    torch.testing.assert_close(tiny.logits(), tiny.logits(theirs), atol=ATOL, rtol=0)


def test_bad_targets_leave_the_model_untouched():
    tiny = build_tiny("llama")
    before = copy.deepcopy(tiny.model.state_dict())
    with pytest.raises(TargetError):
        dt.attach(tiny.model, dt.IA3(targets=("embed_tokens",)), name="x")
    assert not hasattr(tiny.model, "_deltatune_state")
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, before[k])
