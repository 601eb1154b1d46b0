"""The PEFT codec's config coverage and refusals, with peft as the oracle where a file loads: peft's module
selection options (target_modules as a list or a regex, exclude_modules, layers_to_transform + layers_pattern),
rank/alpha patterns, modules_to_save, fan_in_fan_out, inits that change the stored tensors, the recorded base
name (never fetched), unknown config keys (warned by name), and every kind or option without an exact mapping
(refused by name, the model untouched)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.core.errors import TargetError, UnsupportedError  # noqa: E402
from deltatune.io.peft import peft_types  # noqa: E402

from conftest import Tiny, build_tiny_with_biases  # noqa: E402

ATOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _saved(kind: str, config: object, path: Path, std: float = 0.3) -> tuple[Tiny, torch.Tensor, torch.nn.Module]:
    tiny = build_tiny_with_biases(kind)
    pm = _quiet(get_peft_model, tiny.fresh(), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    pm.eval()
    _quiet(pm.save_pretrained, path)
    return tiny, tiny.logits(pm), pm


def _both_ways(tiny: Tiny, ref: torch.Tensor, path: Path, tmp: Path) -> dt.Delta:
    """dt.load gives peft's logits; saved again, peft gives ours. Returns the read delta."""
    model = tiny.fresh()
    _quiet(dt.load, model, path, name="p")
    torch.testing.assert_close(tiny.logits(model), ref, atol=ATOL, rtol=0)
    dt.save(model, tmp / "back", "p", format="peft")
    theirs = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp / "back").eval()
    torch.testing.assert_close(tiny.logits(theirs), ref, atol=ATOL, rtol=0)
    return _quiet(dt.Delta.read, path)


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SELECTIONS = {  # id -> (peft LoraConfig selection kwargs, the module paths it adapts)
    "list": (dict(target_modules=["q_proj", "down_proj"]),
             {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")}),
    "regex": (dict(target_modules=r".*layers\.1\.self_attn\.(q|v)_proj"),
              {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    "exclude": (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
                {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    "layers": (dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
               {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"}),
}


@pytest.mark.parametrize("case", sorted(SELECTIONS))
def test_module_selection_options(case: str, tmp_path: Path) -> None:
    kwargs, paths = SELECTIONS[case]
    tiny, ref, _ = _saved("llama", peft.LoraConfig(r=2, lora_alpha=4, **kwargs), tmp_path / "a")
    delta = _both_ways(tiny, ref, tmp_path / "a", tmp_path)
    assert set(delta.state) == paths
    written = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert set(written["target_modules"]) == paths  # written back as exact paths


def test_patterns_on_other_kinds_are_refused_and_lora_patterns_kept(tmp_path: Path) -> None:
    tiny, ref, _ = _saved("llama", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
                          tmp_path / "a")
    delta = _both_ways(tiny, ref, tmp_path / "a", tmp_path)
    assert delta.config.resolve("model.layers.0.self_attn.v_proj").r == 2
    assert delta.config.resolve("model.layers.1.self_attn.q_proj").alpha == 3
    _saved("llama", peft.LoHaConfig(r=2, alpha=2, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 1}),
           tmp_path / "h")
    model = tiny.fresh()
    with pytest.raises(UnsupportedError, match="rank_pattern"):
        dt.load(model, tmp_path / "h")
    assert not any("deltatune" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_inits_that_change_the_stored_tensors(init: object, tmp_path: Path) -> None:
    """init_lora_weights=False / "gaussian" store non-zero B (False) or other A: the file, not the init, counts."""
    tiny = build_tiny_with_biases("llama")
    pm = _quiet(get_peft_model, tiny.fresh(), peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)).eval()
    ref = tiny.logits(pm)
    if init is False:
        assert (ref - tiny.logits(tiny.fresh())).abs().max() > 1e-4  # untrained, yet not the identity
    _quiet(pm.save_pretrained, tmp_path / "a")
    _both_ways(tiny, ref, tmp_path / "a", tmp_path)


def test_base_modifying_init_is_warned_about(tmp_path: Path) -> None:
    tiny, _, _ = _saved("llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    with pytest.warns(UserWarning, match="modifies the base weights"):
        dt.Delta.read(tmp_path / "a")


def test_modules_to_save_and_fan_in_fan_out(tmp_path: Path) -> None:
    tiny, ref, _ = _saved(
        "bert", peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                               modules_to_save=["classifier"]), tmp_path / "a", std=2.0)
    delta = _both_ways(tiny, ref, tmp_path / "a", tmp_path / "x")
    assert delta.config.modules_to_save == ("classifier",) and set(delta.state["classifier"]) == {"weight", "bias"}
    tiny, ref, _ = _saved("gpt2", peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                                 fan_in_fan_out=True), tmp_path / "b")
    delta = _both_ways(tiny, ref, tmp_path / "b", tmp_path / "y")
    assert delta.module_types["transformer.h.0.attn.c_attn"] == "Conv1D"


def test_base_name_recorded_never_fetched(tmp_path: Path) -> None:
    tiny, ref, pm = _saved("llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    name = "no-such-org/no-such-model-offline"  # nothing may look it up: there is no network, and no cache holds it
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": name}))
    delta = dt.Delta.read(tmp_path / "a")
    assert delta.base["model_name"] == name
    model = tiny.fresh()
    dt.load(model, tmp_path / "a", name="p")
    torch.testing.assert_close(tiny.logits(model), ref, atol=ATOL, rtol=0)
    model.config._name_or_path = name
    dt.save(model, tmp_path / "b", "p", format="peft")
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == name


def test_unknown_config_keys_are_warned_about_by_name(tmp_path: Path) -> None:
    _saved("llama", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
           tmp_path / "a")
    file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(file.read_text())
    file.write_text(json.dumps({**cfg, "future_knob": 3, "future_default": None}))
    with pytest.warns(UserWarning, match="future_knob") as record:
        dt.Delta.read(tmp_path / "a")
    assert not any("future_default" in str(w.message) for w in record)  # a newer option left at its default
    file.write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dt.Delta.read(tmp_path / "a")


def test_pickle_only_adapter_is_refused_unopened(tmp_path: Path) -> None:
    _saved("llama", peft.LoHaConfig(r=2, alpha=2, target_modules=["q_proj"]), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    with pytest.raises(UnsupportedError, match="never unpickles"):
        dt.Delta.read(tmp_path / "a")


# --- refusals by name -----------------------------------------------------------------------------------------------
def test_unmapped_peft_type_is_refused_listing_the_mapped(tmp_path: Path) -> None:
    _saved("llama", peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]), tmp_path / "a")
    with pytest.raises(UnsupportedError, match="OFT") as info:
        dt.Delta.read(tmp_path / "a")
    for mapped in ("LORA", "IA3", "VERA", "PREFIX_TUNING"):
        assert mapped in str(info.value)
    assert set(peft_types()) >= {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "VERA", "RANDLORA", "PROMPT_TUNING",
                                 "PREFIX_TUNING", "LN_TUNING", "BEFT", "POLY", "SHIRA"}


def test_kind_without_mapping_is_refused_listing_those_with_one(tmp_path: Path) -> None:
    tiny = build_tiny_with_biases("llama")
    model = tiny.fresh()
    dt.attach(model, dt.SSF(targets=("q_proj",)), "s")
    with pytest.raises(UnsupportedError, match="'ssf'") as info:
        dt.save(model, tmp_path / "s", "s", format="peft")
    assert "lora" in str(info.value) and "vera" in str(info.value)
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_prefix_on_absolute_positions_is_refused_both_ways(kind: str, tmp_path: Path) -> None:
    task = {"gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}[kind]
    tiny, _, _ = _saved(kind, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=2), tmp_path / "a")
    model = tiny.fresh()
    with pytest.raises(UnsupportedError, match="absolute position"):
        _quiet(dt.load, model, tmp_path / "a")
    assert not any("deltatune" in n for n, _ in model.named_modules())
    dt.attach(model, dt.PrefixTuning(n_tokens=2), "p")
    with pytest.raises(UnsupportedError, match="absolute position"):
        dt.save(model, tmp_path / "b", "p", format="peft")


def test_random_bases_that_peft_cannot_hold_are_refused(tmp_path: Path) -> None:
    tiny = build_tiny_with_biases("llama")
    model = tiny.fresh()
    dt.attach(model, dt.RandLoRA(r=4, targets=("q_proj",)), "r")  # our float32 bases: peft would round them
    with pytest.raises(UnsupportedError, match="bfloat16"):
        dt.save(model, tmp_path / "r", "r", format="peft")
    _saved("llama", peft.RandLoraConfig(r=4, target_modules=["q_proj"], save_projection=False), tmp_path / "a")
    with pytest.raises(UnsupportedError, match="save_projection"):
        _quiet(dt.Delta.read, tmp_path / "a")
    model = tiny.fresh()
    dt.attach(model, dt.VeRA(r=4, targets=("q_proj", "down_proj")), "v")  # A of in=16 and in=32 are not one's slices
    with pytest.raises(UnsupportedError, match="down_proj|q_proj"):
        dt.save(model, tmp_path / "v", "v", format="peft")


def test_vera_of_our_seed_goes_to_peft(tmp_path: Path) -> None:
    """Our own seeded projections (not read from peft) written as peft's shared ones: peft gives our logits."""
    tiny = build_tiny_with_biases("llama")
    model = tiny.fresh()
    dt.attach(model, dt.VeRA(r=4, targets=("q_proj", "v_proj", "o_proj")), "v")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltatune.v." in n:
                p.add_(torch.randn(p.shape, generator=g))
    ours = tiny.logits(model)
    assert (ours - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    dt.save(model, tmp_path / "v", "v", format="peft")
    theirs = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp_path / "v").eval()
    torch.testing.assert_close(tiny.logits(theirs), ours, atol=ATOL, rtol=0)


def test_shira_counts_peft_cannot_hold_and_bias_free_beft_are_refused(tmp_path: Path) -> None:
    tiny = build_tiny_with_biases("llama")
    model = tiny.fresh()
    dt.attach(model, dt.Sparse(k=10, targets=("q_proj",)), "s")  # peft: r·(in + out) = 32·r entries
    with pytest.raises(UnsupportedError, match="r·\\(in \\+ out\\)"):
        dt.save(model, tmp_path / "s", "s", format="peft")
    _saved("llama", peft.BeftConfig(target_modules=["q_proj"]), tmp_path / "b")  # Llama's linears have no bias
    model = tiny.fresh()
    with pytest.raises(TargetError, match="no bias"):
        _quiet(dt.load, model, tmp_path / "b")
    assert not any("deltatune" in n for n, _ in model.named_modules())


def test_ln_tuning_needs_the_base_to_be_written(tmp_path: Path) -> None:
    tiny = build_tiny_with_biases("bert")
    model = tiny.fresh()
    dt.attach(model, dt.LNTuning(targets=("attention.output.LayerNorm",)), "ln")
    delta = dt.Delta.from_model(model, "ln")  # no live base attached to it
    from deltatune.io.peft import write_peft

    with pytest.raises(UnsupportedError, match="base model"):
        write_peft(delta, tmp_path / "x")


def test_shared_projections_with_a_head_kept_whole(tmp_path: Path) -> None:
    """VeRA regenerated from peft's seed, next to a classification head kept whole (modules_to_save)."""
    tiny, ref, _ = _saved("bert", peft.VeraConfig(r=4, target_modules=["query", "value"], save_projection=False,
                                                  projection_prng_key=3, modules_to_save=["classifier"]),
                          tmp_path / "a", std=2.0)
    delta = _both_ways(tiny, ref, tmp_path / "a", tmp_path)
    assert "classifier" in delta.state and delta.config.modules_to_save == ("classifier",)
