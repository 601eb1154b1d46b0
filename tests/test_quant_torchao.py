"""torchao int8 weight-only bases (`quantize_(model, Int8WeightOnlyConfig())`, docs/quantization.md): deltas attach
through the QuantLinear layout, compute what they compute on the dequantised fp32 base, never change the stored int8
weight, save -> load, and merging requantises with the rounding reported; unload(dequantize=True) merges exactly."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import quant
from deltatune.core.errors import RoundingWarning, TargetError
from deltatune.core.layouts import QuantLinearLayout, layout_of

from conftest import assert_identity_where_plain, build_tiny, module_pieces, randomize_delta

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import Int8Tensor, Int8WeightOnlyConfig, quantize_
except ImportError as e:  # pragma: no cover - torchao is in the `quant` extra
    pytest.skip(f"torchao is not importable ({e}); pip install -e '.[quant]'", allow_module_level=True)


def not_head(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn != "lm_head"


def quantized():
    """(tiny, the int8 weight-only model's dequantised fp32 twin)."""
    tiny = build_tiny("llama")
    quantize_(tiny.model, Int8WeightOnlyConfig(), filter_fn=not_head)
    fp = copy.deepcopy(tiny.model)
    for path, m in list(fp.named_modules()):
        if quant.quant_kind(m) == "torchao":
            m.weight = nn.Parameter(m.weight.dequantize().detach().clone(), requires_grad=False)
    return tiny, fp


def stored(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {p: [m.weight.qdata.clone(), m.weight.scale.clone()] for p, m in model.named_modules()
            if quant.quant_kind(m) == "torchao"}


def same_stored(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_layout_of_a_torchao_linear() -> None:
    tiny, fp = quantized()
    mod = tiny.model.model.layers[0].mlp.up_proj
    assert isinstance(mod.weight, Int8Tensor) and quant.quant_kind(mod) == "torchao"
    lay = layout_of(mod, "up", ("Linear",))
    assert isinstance(lay, QuantLinearLayout) and not lay.writable and lay.saved_type == "Linear"
    assert lay.shape(mod) == (32, 16) and torch.equal(lay.weight(mod), fp.model.layers[0].mlp.up_proj.weight)
    assert quant.quant_kind(tiny.model.lm_head) is None
    assert torch.allclose(tiny.logits(), tiny.logits(fp), atol=1e-5)  # the twin is the same function
    with pytest.raises(TargetError, match="quantised"):
        layout_of(mod, "up", ("Linear",), quantized=False)


CONFIGS = {
    "lora": lambda: dt.LoRA(r=2, targets="all-linear"),
    "dora": lambda: dt.LoRA(r=2, dora=True, targets="all-linear"),
    "ia3": lambda: dt.IA3(),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_delta_on_a_torchao_base(kind: str, tmp_path) -> None:
    tiny, fp = quantized()
    model = tiny.model
    before = stored(model)
    base = tiny.logits()
    dt.attach(model, CONFIGS[kind](), name="d")
    assert torch.equal(tiny.logits(), base)  # identity at init
    assert {type(p.layout) for _, (_, p) in module_pieces(model, "d").items()} == {QuantLinearLayout}
    randomize_delta(model, "d", std=0.1)
    model.train()
    tiny.logits(grad=True).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltatune.d." in n for n in grads)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()  # a training step
    model.eval()
    want = tiny.logits()
    assert not torch.allclose(want, base, atol=1e-4)
    out = dt.save(model, tmp_path / "d", "d")
    assert same_stored(stored(model), before)  # attach, training and save left the int8 weights alone

    dt.load(fp, out)  # the same delta on the dequantised fp32 base computes the same function
    assert torch.allclose(tiny.logits(fp), want, atol=1e-5), float((tiny.logits(fp) - want).abs().max())
    again, _ = quantized()
    dt.load(again.model, out)
    assert torch.equal(again.logits(), want)


def test_merge_reports_rounding_and_unmerge_restores_exactly() -> None:
    tiny, _ = quantized()
    model = tiny.model
    before = stored(model)
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same delta whatever ran before
    dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="a")
    randomize_delta(model, "a", std=0.1)
    unmerged = tiny.logits()
    exact = {p: m.weight.dequantize() + piece.delta_weight(m).to_dense()
             for p, (m, piece) in module_pieces(model, "a").items()}
    with pytest.warns(RoundingWarning) as rec:
        dt.merge(model, "a")
    report = rec[0].message.report
    assert set(report) == set(exact) and report == dt.rounding_report(model)
    for p, r in report.items():
        m = model.get_submodule(p)
        assert isinstance(m.weight, Int8Tensor) and m.weight.qdata.dtype == torch.int8  # requantised
        err = m.weight.dequantize() - exact[p]
        assert 0 < r["max_abs"] == pytest.approx(float(err.abs().max()), rel=1e-4, abs=1e-7)
        assert r["relative"] == pytest.approx(float(err.norm() / exact[p].norm()), rel=1e-4, abs=1e-7)
        assert r["relative_to_update"] < 0.05
    assert (tiny.logits() - unmerged).abs().max() < 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundingWarning)
        dt.unmerge(model, "a")
    assert same_stored(stored(model), before) and torch.equal(tiny.logits(), unmerged)


def test_unload_dequantize_equals_the_exact_fp32_merge() -> None:
    tiny, fp = quantized()
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="a")
    randomize_delta(model, "a", std=0.1)
    want = tiny.logits()
    expected = {p: m.weight.dequantize() + piece.delta_weight(m).to_dense()
                for p, (m, piece) in module_pieces(model, "a").items()}
    with pytest.warns(RoundingWarning):
        dt.merge(model)
    out = dt.unload(model, merge_active=True, dequantize=True)
    assert out is model and not any(quant.quant_kind(m) for m in model.modules())
    for p, w in expected.items():
        assert torch.allclose(model.get_submodule(p).weight, w, atol=1e-6), p
    assert torch.allclose(tiny.logits(), want, atol=1e-5)


def test_other_torchao_weights_are_refused_clearly() -> None:
    class Odd(Int8Tensor):  # any other torchao tensor class
        pass
    Odd.__module__ = "torchao.other"
    lin = nn.Linear(4, 4)
    quantize_(lin, Int8WeightOnlyConfig())
    w = lin.weight
    lin.weight = nn.Parameter(Odd(w.qdata, w.scale, w.block_size, w.dtype), requires_grad=False)
    with pytest.raises(TargetError, match="Int8WeightOnlyConfig"):
        quant.quant_kind(lin)


def test_every_linear_kind_attaches_or_refuses_clearly() -> None:
    """Every registered kind attaches to the int8 weight-only Llama (identity at init for the input / weight / output
    positions), or refuses with a TargetError naming the quantised module (pieces with quantized_hosts = False)."""
    from deltatune.core.config import _REGISTRY

    attached = []
    for kind, cls in sorted(_REGISTRY.items()):
        make = getattr(cls, "example", None)
        cfg = make() if make is not None else cls()
        if cfg.follows():  # a fusion layer goes on other deltas' modules
            continue
        tiny, _ = quantized()
        base = tiny.logits()
        try:
            dt.attach(tiny.model, cfg, name="d")
        except TargetError as e:
            if "quantised" in str(e):
                assert not cfg.piece_class(None).quantized_hosts, kind
            assert not any(".deltatune." in n for n, _ in tiny.model.named_parameters())  # untouched
            continue
        attached.append(kind)
        assert_identity_where_plain(tiny.model, tiny.logits, base, kind)
        assert all(isinstance(m.weight, Int8Tensor) for m in tiny.model.modules() if quant.quant_kind(m)), kind
    assert {"lora", "ia3", "sparse"} <= set(attached)
