"""Quantised bases (bitsandbytes NF4 / FP4 / int8, docs/quantization.md): dt.quantize, the QuantLinear layout, deltas
on quantised linears (identity, gradients, the stored weight untouched, save -> load onto the quantised and the
full-precision base), merging into quantised weights (rounding report, exact restore) and the typed errors."""
from __future__ import annotations

import builtins
import copy
import json
import warnings

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core import quant
from deltatune.core.errors import (ConfigError, MissingDependencyError, RoundingWarning, TargetError,
                                   UnsupportedError)
from deltatune.core.layouts import LinearLayout, QuantLinearLayout, layout_of

from conftest import assert_identity_where_plain, build_tiny, module_pieces, randomize_delta

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")

SCHEMES = ("nf4", "fp4", "int8")


def quantized(scheme: str = "nf4", **kw):
    tiny = build_tiny("llama")
    fp = copy.deepcopy(tiny.model)
    dt.quantize(tiny.model, scheme, **kw)
    return tiny, fp


def stored(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every quantised module's stored tensors (weight bytes, scales), cloned."""
    out = {}
    for path, m in model.named_modules():
        if quant.quant_kind(m) == "4bit":
            qs = m.weight.quant_state
            out[path] = [m.weight.data.clone(), qs.absmax.clone()] + ([qs.state2.absmax.clone()] if qs.nested else [])
        elif quant.quant_kind(m) == "8bit":
            out[path] = [m.weight.data.clone(), quant._scb(m).clone()]
    return out


def same_stored(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                        for k in a)


# --- dt.quantize and the layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_replaces_linears_but_not_the_head(scheme: str, double_quant: bool) -> None:
    tiny, fp = quantized(scheme, double_quant=double_quant)
    m = tiny.model
    want = bnb.nn.Linear8bitLt if scheme == "int8" else bnb.nn.Linear4bit
    linears = [p for p, mod in fp.named_modules() if type(mod) is nn.Linear and p != "lm_head"]
    assert linears and all(isinstance(m.get_submodule(p), want) for p in linears)
    assert type(m.lm_head) is nn.Linear and torch.equal(m.lm_head.weight, fp.lm_head.weight)
    for p in linears:
        w = fp.get_submodule(p).weight.detach()
        deq = quant.dequantized(m.get_submodule(p))
        assert deq.shape == w.shape
        if scheme == "int8":
            assert (deq - w).norm() / w.norm() < 0.02
        else:  # exactly bitsandbytes' own quantisation of the weight
            q, state = bnb.functional.quantize_4bit(w, quant_type=scheme, compress_statistics=double_quant)
            assert torch.equal(deq, bnb.functional.dequantize_4bit(q, state))
    assert torch.isfinite(tiny.logits()).all()


def test_quantize_exclude_and_compute_dtype() -> None:
    tiny, _ = quantized("nf4", exclude=("down_proj",), compute_dtype=torch.bfloat16)
    m = tiny.model
    assert type(m.model.layers[0].mlp.down_proj) is nn.Linear
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.compute_dtype == torch.bfloat16
    assert torch.isfinite(tiny.logits()).all()
    tiny, _ = quantized("fp4", exclude=r".*\.self_attn\..*")
    assert type(tiny.model.model.layers[1].self_attn.k_proj) is nn.Linear
    assert isinstance(tiny.model.model.layers[1].mlp.up_proj, bnb.nn.Linear4bit)


def test_layout_is_a_read_only_linear_view() -> None:
    tiny, fp = quantized("nf4")
    mod = tiny.model.model.layers[0].mlp.up_proj
    lay = layout_of(mod, "up", ("Linear",))
    assert isinstance(lay, QuantLinearLayout) and lay.module_type == "QuantLinear" and not lay.writable
    assert lay.saved_type == "Linear" and lay.native_shape(mod) == (32, 16) and lay.shape(mod) == (32, 16)
    assert isinstance(layout_of(fp.model.layers[0].mlp.up_proj), LinearLayout)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(mod(x), x @ lay.weight(mod).t(), atol=1e-5)
    with pytest.raises(TargetError, match="quantised"):
        layout_of(mod, "up", ("Linear",), quantized=False)
    with pytest.raises(TargetError):
        layout_of(mod, "up", ("Embedding",))


# --- deltas on a quantised base ------------------------------------------------------------------------------------
CONFIGS = {
    "lora": lambda: dt.LoRA(r=2, targets="all-linear"),
    "dora": lambda: dt.LoRA(r=2, dora=True, targets="all-linear"),
    "ia3": lambda: dt.IA3(),
    "sparse": lambda: dt.Sparse(density=0.1),
}


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_delta_on_a_quantised_base(kind: str, scheme: str, tmp_path) -> None:
    tiny, fp = quantized(scheme)
    model = tiny.model
    before = stored(model)
    base_logits = tiny.logits()
    dt.attach(model, CONFIGS[kind](), name="d")
    assert torch.allclose(tiny.logits(), base_logits, atol=1e-6)  # identity at init
    assert {type(p.layout) for _, (_, p) in module_pieces(model, "d").items()} == {QuantLinearLayout}
    randomize_delta(model, "d")
    model.train()
    tiny.logits(grad=True).float().pow(2).mean().backward()
    model.eval()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".deltatune.d." in n for n in grads)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in dict(model.named_parameters()) if ".deltatune.d." in n}
    want = tiny.logits()
    assert not torch.allclose(want, base_logits, atol=1e-4)
    out = dt.save(model, tmp_path / "d", "d")
    assert same_stored(stored(model), before)  # attach, training and save left the stored weights alone
    saved = json.loads((out / "delta.json").read_text())
    assert set(t["type"] for t in saved["modules"].values()) <= {"Linear"}  # an ordinary delta
    assert all(len(s) == 2 for s in saved["base"]["weight_shapes"].values())
    assert (out / "delta.safetensors").stat().st_size < 200_000  # the base weights are not in it

    again = dt.quantize(copy.deepcopy(fp), scheme)
    dt.load(again, out)
    assert torch.allclose(tiny.logits(again), want, atol=1e-5)

    dt.load(fp, out)  # the same delta on the full-precision base
    loaded = {p: piece.saved_state() for p, (_, piece) in module_pieces(fp, "d").items()}
    for p, (_, piece) in module_pieces(model, "d").items():
        assert all(torch.equal(v, loaded[p][k]) for k, v in piece.saved_state().items())
    assert torch.isfinite(tiny.logits(fp)).all()


def test_every_linear_kind_attaches_or_refuses_clearly() -> None:
    """Every registered kind whose pieces adapt Linear modules attaches to a quantised Llama with the identity at
    init, or refuses with a TargetError (the ones that declare quantized_hosts = False)."""
    from deltatune.core.config import _REGISTRY

    attached, refused = [], []
    for kind, cls in sorted(_REGISTRY.items()):
        make = getattr(cls, "example", None)
        cfg = make() if make is not None else cls()
        if cfg.follows():  # a fusion layer goes on other deltas' modules (covered through them)
            continue
        tiny, _ = quantized("nf4")
        base = tiny.logits()
        try:
            dt.attach(tiny.model, cfg, name="d")
        except TargetError as e:  # e.g. BitFit: Llama has no biases, quantised or not
            if "quantised" in str(e):
                refused.append(kind)
            assert not any(".deltatune." in n for n, _ in tiny.model.named_parameters())  # untouched
            continue
        attached.append(kind)
        assert_identity_where_plain(tiny.model, tiny.logits, base, kind)
    assert {"lora", "ia3", "sparse"} <= set(attached)
    assert all(not piece.quantized_hosts for kind in refused for piece in _piece_classes(_REGISTRY[kind])), refused


def _piece_classes(cls) -> list:
    make = getattr(cls, "example", None)
    cfg = make() if make is not None else cls()
    return [cfg.piece_class(None)]


# --- merging into quantised weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_requantises_reports_and_unmerge_restores_exactly(scheme: str) -> None:
    tiny, _ = quantized(scheme)
    model = tiny.model
    before = stored(model)
    dt.attach(model, dt.LoRA(r=2, targets="all-linear", alpha=1.0), name="a")
    dt.attach(model, dt.LoRA(r=2, targets=("q_proj", "v_proj"), alpha=1.0), name="b")
    randomize_delta(model, "a", std=0.1)
    randomize_delta(model, "b", seed=1, std=0.1)
    dt.activate(model, ["a", "b"])
    unmerged = tiny.logits()
    # the exact merged weights: dequantised base + ΔW, for the rounding report to be checked against
    exact = {p: quant.dequantized(m) + piece.delta_weight(m).to_dense()
             for p, (m, piece) in module_pieces(model, "a").items()}
    with pytest.warns(RoundingWarning) as rec:
        dt.merge(model, "a")
    report = rec[0].message.report
    assert report == dt.rounding_report(model) and set(report) == set(exact)
    for p, r in report.items():
        err = quant.dequantized(model.get_submodule(p)) - exact[p]
        assert r["max_abs"] == pytest.approx(float(err.abs().max()), rel=1e-4, abs=1e-7)
        assert r["relative"] == pytest.approx(float(err.norm() / exact[p].norm()), rel=1e-4, abs=1e-7)
        assert 0 <= r["relative_to_update"] < (0.05 if scheme == "int8" else 1.5)
    merged = tiny.logits()
    assert torch.isfinite(merged).all() and (merged - unmerged).abs().max() < (0.05 if scheme == "int8" else 1.0)
    with pytest.warns(RoundingWarning):
        dt.merge(model, "b")
    with pytest.warns(RoundingWarning):  # q_proj, v_proj still hold "b": requantised again, reported
        dt.unmerge(model, "a")
    assert set(dt.rounding_report(model)) == {p for p in exact if p.endswith(("q_proj", "v_proj"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundingWarning)
        dt.unmerge(model, "b")  # the last merged delta: the stored weights come back bit for bit, no rounding
    assert dt.rounding_report(model) == {}
    assert same_stored(stored(model), before)
    assert torch.equal(tiny.logits(), unmerged)


def test_merge_on_a_quantised_base_needs_base_kinds() -> None:
    """DoRA's update depends on the base: it is computed from the dequantised stored weight."""
    tiny, _ = quantized("nf4")
    model = tiny.model
    before = stored(model)
    dt.attach(model, dt.LoRA(r=2, dora=True, targets=("q_proj",)), name="d")
    randomize_delta(model, "d", std=0.05)
    unmerged = tiny.logits()
    with pytest.warns(RoundingWarning):
        dt.merge(model)
    assert (tiny.logits() - unmerged).abs().max() < 0.5
    dt.unmerge(model)
    assert same_stored(stored(model), before) and torch.equal(tiny.logits(), unmerged)


def test_merge_failure_leaves_the_quantised_model_untouched(monkeypatch) -> None:
    tiny, _ = quantized("nf4")
    model = tiny.model
    before = stored(model)
    dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="a")
    randomize_delta(model, "a")
    want = tiny.logits()
    calls = {"n": 0}
    real = quant.requantize

    def flaky(module, weight):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(module, weight)

    monkeypatch.setattr(quant, "requantize", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RoundingWarning)
        dt.merge(model)
    assert same_stored(stored(model), before) and torch.equal(tiny.logits(), want)
    monkeypatch.undo()
    with pytest.warns(RoundingWarning):
        dt.merge(model)
    dt.unmerge(model)
    assert same_stored(stored(model), before) and torch.equal(tiny.logits(), want)


# --- bad input ------------------------------------------------------------------------------------------------------
def test_quantize_bad_arguments_leave_the_model_untouched() -> None:
    tiny = build_tiny("llama")
    ref = copy.deepcopy(tiny.model.state_dict())

    def untouched() -> bool:
        sd = tiny.model.state_dict()
        return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)

    with pytest.raises(ConfigError, match="scheme"):
        dt.quantize(tiny.model, "int4")
    with pytest.raises(ConfigError, match="compute_dtype"):
        dt.quantize(tiny.model, "nf4", compute_dtype=torch.int8)
    with pytest.raises(ConfigError, match="compute_dtype"):
        dt.quantize(tiny.model, "int8", compute_dtype=torch.bfloat16)
    with pytest.raises(TargetError, match="no nn.Linear"):
        dt.quantize(tiny.model, "nf4", exclude=".*")
    assert untouched()
    dt.attach(tiny.model, dt.LoRA(r=2), name="a")
    with pytest.raises(UnsupportedError, match="before attaching"):
        dt.quantize(tiny.model, "nf4")


def test_quantize_without_bitsandbytes_names_the_install(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    tiny = build_tiny("llama")
    with pytest.raises(MissingDependencyError) as e:
        dt.quantize(tiny.model, "nf4")
    assert "pip install" in str(e.value) and "make" in str(e.value) and "bitsandbytes==0.50.2" in str(e.value)
    assert isinstance(e.value, ImportError) and type(tiny.model.model.layers[0].mlp.up_proj) is nn.Linear


def test_full_copy_of_a_quantised_layer_is_refused() -> None:
    """A trained full copy would put the quantised base's weights into the delta: refused, model untouched."""
    tiny, _ = quantized("nf4")
    with pytest.raises(TargetError, match="quantised"):
        dt.attach(tiny.model, dt.Full(targets=("q_proj",)), name="f")
    assert not any(".deltatune" in n for n, _ in tiny.model.named_modules())


def test_core_does_not_import_bitsandbytes() -> None:
    import subprocess
    import sys

    code = "import sys, deltatune; assert 'bitsandbytes' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- transformers' own 4-bit loading on CPU -----------------------------------------------------------------------
def test_transformers_bitsandbytes_config_on_cpu(tmp_path) -> None:
    """BitsAndBytesConfig(load_in_4bit=True) with device_map="cpu" loads; bitsandbytes' CPU inference kernel needs
    out_features % 32 == 0, so the model here is 32-aligned. Deltas attach like on dt.quantize's modules."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)).eval()
    assert isinstance(q.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    ids = torch.randint(1, 64, (2, 5))
    dt.attach(q, dt.LoRA(r=2, targets="all-linear"), name="l")
    with torch.no_grad():
        attached = q(ids).logits
        dt.detach(q, "l")
        base = q(ids).logits
    # identity at init against the bare model in the same bitsandbytes state: on an AVX512-BF16 CPU, bitsandbytes
    # 0.50's 4-bit CPU forward gave other numerics after a delta had been attached (which reads the dequantised
    # weight) and detached again — 1.6e-2 in these logits — so the model before attaching is not the reference
    assert attached.abs().max() > 1e-2 and torch.allclose(attached, base, atol=1e-6)


# --- docs -----------------------------------------------------------------------------------------------------------
def test_docs_example_runs(tmp_path) -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "quantization.md").read_text()
    code = text.split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"/tmp/qlora-example"', repr(str(tmp_path / "qlora-example")))
    namespace: dict = {}
    exec(compile(code, "quantization.md", "exec"), namespace)
    assert namespace["report"] and (tmp_path / "qlora-example" / "delta.json").exists()


# --- training -------------------------------------------------------------------------------------------------------
def test_cli_train_with_quantize_nf4(tmp_path) -> None:
    """`deltatune train --set quantize=nf4`: QLoRA on a tiny BERT classifier learns, reports the base's memory, and
    saves an ordinary delta that loads onto the full-precision base; a bad scheme is a config error."""
    import os
    import subprocess
    import sys

    from train_fixtures import save_bert_dir, sentiment, write_jsonl
    from transformers import BertForSequenceClassification

    model_dir = save_bert_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment(200, 5))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "deltatune.cli.main", "train", "--model", str(model_dir), "--data", str(data),
           "--max-steps", "30", "--batch-size", "8", "--lr", "0.01", "-o", str(out), "--set", "quantize=nf4",
           "--set", "progress=false", "--set", "plot=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quantize=nf4: base weights" in res.stderr
    assert json.loads(res.stdout[: res.stdout.rindex("}") + 1])["test_accuracy"] >= 0.9
    full = BertForSequenceClassification.from_pretrained(model_dir)
    dt.load(full, out / "delta")  # the delta loads onto the full-precision base
    bad = subprocess.run([*cmd[:-4], "--set", "quantize=int3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "quantize must be one of" in bad.stderr


# --- LoftQ ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_loftq_beats_plain_quantisation(scheme: str) -> None:
    """Q + s·BA is closer to W than plain quantisation, per module and in total, and so are the model's logits."""
    tiny = build_tiny("llama")
    fp_logits = tiny.logits()
    plain, _ = quantized(scheme)
    report = dt.init.loftq(tiny.model, dt.LoRA(r=4, targets="all-linear"), "q", scheme=scheme, iters=3)
    assert set(report["modules"]) == set(module_pieces(tiny.model, "q"))
    for path, r in report["modules"].items():
        assert r["loftq"] < r["plain"], path
    assert report["total"]["loftq"] < report["total"]["plain"]
    assert isinstance(tiny.model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt if scheme == "int8" else
                      bnb.nn.Linear4bit)
    # the report is what the model holds: dequantised base + the delta's update against W
    for path, (m, piece) in module_pieces(tiny.model, "q").items():
        w = build_tiny("llama").model.get_submodule(path).weight
        err = (w - quant.dequantized(m) - piece.delta_weight(m).to_dense()).norm() / w.norm()
        assert float(err) == pytest.approx(report["modules"][path]["loftq"], rel=1e-3, abs=1e-6)
    assert (tiny.logits() - fp_logits).norm() < (plain.logits() - fp_logits).norm()


def test_loftq_bad_input_leaves_the_model_untouched() -> None:
    tiny = build_tiny("llama")
    ref = copy.deepcopy(tiny.model.state_dict())
    for kwargs, cfg in [({"iters": 0}, dt.LoRA(r=2)), ({"scheme": "q3"}, dt.LoRA(r=2)), ({}, dt.LoRA(r=2, dora=True)),
                        ({}, dt.LoRA(r=2, init="pissa")), ({}, dt.LoRA(r=99))]:
        with pytest.raises((ConfigError, TargetError)):
            dt.init.loftq(tiny.model, cfg, "q", **kwargs)
    sd = tiny.model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert all(type(m) is not bnb.nn.Linear4bit for m in tiny.model.modules())


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_unload_dequantize_merges_exactly_into_a_full_precision_model(scheme: str) -> None:
    tiny, _ = quantized(scheme)
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="a")
    dt.attach(model, dt.LoRA(r=2, dora=True, targets=("q_proj", "v_proj")), name="d")
    randomize_delta(model, "a", std=0.1)
    randomize_delta(model, "d", seed=1, std=0.1)
    dt.activate(model, ["a", "d"])
    want = tiny.logits()
    expected = {p: quant.dequantized(m) for p, m in model.named_modules() if quant.quant_kind(m)}
    for p, (m, piece) in module_pieces(model, "a").items():
        expected[p] = expected[p] + piece.delta_weight(m).to_dense()
    with pytest.warns(RoundingWarning):
        dt.merge(model)  # merged (requantised) first: unload unmerges exactly, then merges in full precision
    out = dt.unload(model, merge_active=True, dequantize=True)
    assert out is model and not any(quant.quant_kind(m) for m in model.modules())
    assert not any(".deltatune" in n for n, _ in model.named_modules())
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight, expected["model.layers.0.mlp.up_proj"], atol=1e-6)
    got = tiny.logits()
    assert torch.allclose(got, want, atol=1e-5 if scheme == "nf4" else 0.05), float((got - want).abs().max())


def test_detached_updates_read_the_dequantised_base() -> None:
    """Merging of many deltas and Delta.tensors(base=) take the quantised base's dequantised weights (DoRA)."""
    from deltatune.io.delta import Delta

    tiny, _ = quantized("nf4")
    model = tiny.model
    dt.attach(model, dt.LoRA(r=2, dora=True, targets=("q_proj", "down_proj")), name="d")
    randomize_delta(model, "d", std=0.1)
    detached = Delta.from_model(model, "d").tensors(base=model)
    for path, (m, piece) in module_pieces(model, "d").items():
        assert torch.allclose(detached[path].to_dense(), piece.delta_weight(m).to_dense(), atol=1e-6), path


def test_resume_on_a_quantised_base_gives_the_same_losses(tmp_path) -> None:
    from deltatune.train import train
    from deltatune.train.data import local_splits
    from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", sentiment(120, 1))
    write_jsonl(tmp_path / "val.jsonl", sentiment(24, 2))
    splits = local_splits(str(tmp_path / "train.jsonl"), "classification", validation=str(tmp_path / "val.jsonl"),
                          test=str(tmp_path / "val.jsonl"))
    base = dt.quantize(tiny_bert(), "nf4")
    before = stored(base)
    common = {"max_steps": 16, "batch_size": 8, "lr": 5e-3, "log_every": 1, "eval_every": 8, "progress": False,
              "plot": False, "delta": {"kind": "lora", "r": 4}}
    straight = train({**common, "output_dir": str(tmp_path / "a")}, model=copy.deepcopy(base),
                     tokenizer=word_tokenizer(), splits=splits)
    train({**common, "output_dir": str(tmp_path / "b"), "checkpoint_every": 8, "max_steps": 8},
          model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=splits)
    resumed = train({**common, "output_dir": str(tmp_path / "b"), "resume": True}, model=copy.deepcopy(base),
                    tokenizer=word_tokenizer(), splits=splits)
    la = [h["loss"] for h in straight.history if "loss" in h]
    lb = [h["loss"] for h in resumed.history if "loss" in h]
    assert len(la) == len(lb) == 16
    assert la == pytest.approx(lb, abs=1e-5)
    assert same_stored(stored(base), before)


def test_gradient_checkpointing_on_a_quantised_base() -> None:
    """With transformers' gradient checkpointing the delta's gradients equal those without it."""
    grads = []
    for checkpointing in (False, True):
        tiny, _ = quantized("nf4")
        model = tiny.model
        torch.manual_seed(0)
        dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="a")
        randomize_delta(model, "a")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(**tiny.inputs, labels=tiny.inputs["input_ids"])
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
