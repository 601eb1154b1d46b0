"""PEFT interop, with peft as the oracle: the same weights give the same logits in both libraries, both ways.

peft → deltatune: get_peft_model + random non-zero weights + save_pretrained, then dt.load into a fresh base.
deltatune → peft: dt.attach + random weights + dt.save(format="peft"), then PeftModel.from_pretrained.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.core.errors import CorruptFileError, ShapeMismatchError, UnsupportedError  # noqa: E402
from deltatune.runtime import state_of  # noqa: E402

from conftest import Tiny, build_tiny, build_tiny_with_biases  # noqa: E402

ATOL = 1e-5
LLAMA_T = ["q_proj", "v_proj", "down_proj"]

# name -> (model kind, peft LoraConfig kwargs, equivalent deltatune LoRA kwargs)
CASES: dict[str, tuple[str, dict, dict]] = {
    "lora": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_T),
             dict(r=4, alpha=8, targets=tuple(LLAMA_T))),
    "rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=LLAMA_T),
               dict(r=4, alpha=8, rslora=True, targets=tuple(LLAMA_T))),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_T),
             dict(r=4, alpha=8, dora=True, targets=tuple(LLAMA_T))),
    "patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_T,
                               rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                               alpha_pattern={"down_proj": 3.0, "layers.0.self_attn.q_proj": 5}),
                 dict(r=4, alpha=8, targets=tuple(LLAMA_T), rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                      alpha_pattern={"down_proj": 3.0, "layers.0.self_attn.q_proj": 5})),
    "conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
               dict(r=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"))),
    "dora_conv1d": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                    dict(r=4, alpha=8, dora=True, targets=("c_attn", "c_fc"))),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
                  dict(r=4, alpha=8, targets=("embed_tokens", "q_proj"))),
    "bias_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                 bias="lora_only"),
                    dict(r=4, alpha=8, targets=("c_attn", "c_fc"), bias="lora_only")),
    "bias_head_bert": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="lora_only",
                                    modules_to_save=["classifier"]),
                       dict(r=4, alpha=8, targets=("query", "value"), bias="lora_only", modules_to_save=("classifier",))),
}
# PEFT adapters with no exact deltatune -> PEFT way back (DoRA with trained biases), read only
IMPORT_ONLY: dict[str, tuple[str, dict]] = {
    "dora_bias_conv1d": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"],
                                      fan_in_fan_out=True, bias="lora_only")),
}
# deltatune-only inits that export as a rank-2r PEFT LoRA
EXPORT_ONLY: dict[str, tuple[str, dict]] = {
    "pissa": ("llama", dict(r=4, alpha=8, init="pissa", targets=tuple(LLAMA_T))),
    "pissa_rslora_dora_patterns": ("llama", dict(r=4, alpha=8, init="pissa", rslora=True, dora=True,
                                                 targets=tuple(LLAMA_T), rank_pattern={"v_proj": 2},
                                                 alpha_pattern={"down_proj": 3.0})),
    "olora_conv1d": ("gpt2", dict(r=2, alpha=4, init="olora", targets=("c_attn", "c_fc"))),
}


_tiny = build_tiny_with_biases


def _randomize_peft(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
            elif "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "base_layer.bias" in name and p.requires_grad:  # bias="lora_only": the trained bias
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _randomize_ours(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deltatune." not in name:
                continue
            if name.endswith("magnitude"):
                p.copy_(p * (0.5 + torch.rand(p.shape, generator=g)))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=0)


def _peft_dir(tiny: Tiny, peft_kwargs: dict, path: Path, **save_kw) -> torch.Tensor:
    """Save a randomized PEFT adapter made on a fresh base to `path`; return its logits."""
    pm = get_peft_model(tiny.fresh(), LoraConfig(**peft_kwargs))
    _randomize_peft(pm)
    pm.eval()
    ref = tiny.logits(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(path, **save_kw)
    return ref


@pytest.mark.parametrize("case", sorted(CASES) + sorted(IMPORT_ONLY))
def test_peft_to_deltatune(case: str, tmp_path: Path) -> None:
    kind, peft_kwargs = CASES[case][:2] if case in CASES else IMPORT_ONLY[case]
    tiny = _tiny(kind)
    ref = _peft_dir(tiny, peft_kwargs, tmp_path / "adapter")
    assert not _close(ref, tiny.logits(tiny.fresh())), "random adapter weights must change the logits"
    model = tiny.fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt.load(model, tmp_path / "adapter", name="p")
    if case == "embedding":  # PEFT saves the base embedding table too; we ignore it, loudly
        assert any("base_layer.weight" in str(w.message) for w in caught)
    torch.testing.assert_close(tiny.logits(model), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES) + sorted(EXPORT_ONLY))
def test_deltatune_to_peft(case: str, tmp_path: Path) -> None:
    kind, ours = (CASES[case][0], CASES[case][2]) if case in CASES else EXPORT_ONLY[case]
    tiny = _tiny(kind)
    model = tiny.fresh()
    dt.attach(model, dt.LoRA(**ours), "x")
    _randomize_ours(model)
    ref = tiny.logits(model)
    assert not _close(ref, tiny.logits(tiny.fresh())), "random delta weights must change the logits"
    out = dt.save(model, tmp_path / "peft", "x", format="peft")
    # PEFT's two files and deltatune's integrity manifest, which PEFT ignores (it loads the directory below)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "deltatune_manifest.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(tiny.fresh(), out)
    pm.eval()
    torch.testing.assert_close(tiny.logits(pm), ref, atol=ATOL, rtol=0)
    back = tiny.fresh()  # and our reader takes back what our writer wrote
    dt.load(back, out)
    torch.testing.assert_close(tiny.logits(back), ref, atol=ATOL, rtol=0)


def test_read_matches_peft_delta_weight_and_config(tmp_path: Path) -> None:
    tiny = _tiny("llama")
    kind, peft_kwargs, _ = CASES["patterns"]
    pm = get_peft_model(tiny.fresh(), LoraConfig(**peft_kwargs))
    _randomize_peft(pm)
    pm.save_pretrained(tmp_path / "a")
    delta = dt.Delta.read(tmp_path / "a")
    wanted = {name: m.get_delta_weight("default") for name, m in pm.base_model.model.named_modules()
              if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}
    got = delta.tensors()
    assert set(got) == set(wanted) and len(got) == 6
    for path, dw in wanted.items():
        torch.testing.assert_close(got[path].to_dense(), dw, atol=1e-6, rtol=0)
    assert delta.config.resolve("model.layers.1.self_attn.q_proj").r == 2
    assert delta.config.resolve("model.layers.0.self_attn.q_proj").alpha == 5
    assert delta.config.resolve("model.layers.0.mlp.down_proj").alpha == 3
    assert delta.module_types["model.layers.0.self_attn.v_proj"] == "Linear"
    assert delta.base["model_class"] == "LlamaForCausalLM"


def test_written_config_uses_exact_paths_and_patterns(tmp_path: Path) -> None:
    tiny = _tiny("llama")
    model = tiny.fresh()
    dt.attach(model, dt.LoRA(r=4, alpha=8, init="pissa", targets=("q_proj",), rank_pattern={"layers.1.self_attn.q_proj": 2}))
    cfg = json.loads((dt.save(model, tmp_path / "p", format="peft") / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] is None
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    # PiSSA exports rank 2r with the scale unchanged: layer 0 r=4, s=8/4 -> rank 8; layer 1 r=2, s=8/2 -> rank 4
    q0, q1 = cfg["target_modules"]
    rank = {p: cfg["rank_pattern"].get(p, cfg["r"]) for p in (q0, q1)}
    alpha = {p: cfg["alpha_pattern"].get(p, cfg["lora_alpha"]) for p in (q0, q1)}
    assert rank == {q0: 8, q1: 4}
    assert alpha[q0] / rank[q0] == 2.0 and alpha[q1] / rank[q1] == 4.0


def test_bin_only_adapter_is_refused_and_model_unchanged(tmp_path: Path) -> None:
    tiny = _tiny("llama")
    _peft_dir(tiny, CASES["lora"][1], tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    model = tiny.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="safetensors"):
        dt.load(model, tmp_path / "bin")
    assert state_of(model) is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_peft_file_of_another_size_is_refused_and_model_unchanged(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _peft_dir(_tiny("llama"), CASES["lora"][1], tmp_path / "a")
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)).eval()
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(ShapeMismatchError):
        dt.load(big, tmp_path / "a")
    assert state_of(big) is None and set(before) == set(big.state_dict())
    assert all(torch.equal(before[k], v) for k, v in big.state_dict().items())


def test_lora_only_biases_need_the_base(tmp_path: Path) -> None:
    _peft_dir(_tiny("gpt2"), CASES["bias_conv1d"][1], tmp_path / "a")
    delta = dt.Delta.read(tmp_path / "a")
    assert delta.module_types["transformer.h.0.attn.c_attn"] == "Conv1D"
    delta.tensors()  # weight updates need no base
    with pytest.raises(UnsupportedError, match="lora_only"):
        delta.biases()
    with pytest.raises(UnsupportedError):
        delta.write(tmp_path / "native")


def test_bad_peft_files(tmp_path: Path) -> None:
    tiny = _tiny("llama")
    _peft_dir(tiny, CASES["lora"][1], tmp_path / "a")
    cfg_file, weights = tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "adapter_model.safetensors"
    good_cfg, good_weights = cfg_file.read_text(), weights.read_bytes()
    cfg_file.write_text("{not json")
    with pytest.raises(CorruptFileError):
        dt.Delta.read(tmp_path / "a")
    cfg = json.loads(good_cfg)
    for change in ({"bias": "all"}, {"peft_type": "BOFT"}, {"layer_replication": [[0, 1]]}):
        cfg_file.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UnsupportedError):
            dt.Delta.read(tmp_path / "a")
    cfg_file.write_text(good_cfg)
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CorruptFileError):
        dt.Delta.read(tmp_path / "a")


def test_unexpressible_deltas_are_refused(tmp_path: Path) -> None:
    tiny = _tiny("gpt2")
    model = tiny.fresh()
    dt.attach(model, dt.Full(targets=("lm_head",)), "full")
    with pytest.raises(UnsupportedError, match="'full'"):
        dt.save(model, tmp_path / "f", "full", format="peft")
    model = tiny.fresh()
    dt.attach(model, dt.LoRA(r=2, dora=True, bias="lora_only", targets=("c_attn",)), "db")
    with pytest.raises(UnsupportedError, match="DoRA"):
        dt.save(model, tmp_path / "d", "db", format="peft")
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
