"""Configs (frozen, validated, JSON round-trip) and targeting (all-linear, regex, suffixes, exclude, layers, patterns)."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.config import DeltaConfig
from deltatune.core.errors import ConfigError, DeltaTuneError, TargetError
from deltatune.runtime import slot_of, state_of


# --- tiny models ----------------------------------------------------------------------------------------
def tiny_llama(layers: int = 3, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def targeted(model: nn.Module, name: str = "d") -> list[str]:
    """Paths (model order) where delta `name` has a piece."""
    return [p for p, m in model.named_modules() if slot_of(m) is not None and name in slot_of(m)]


def pieces(model: nn.Module, name: str = "d") -> dict[str, nn.Module]:
    return {p: slot_of(m)[name] for p, m in model.named_modules() if slot_of(m) is not None and name in slot_of(m)}


def linear_paths(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


LLAMA_LAYER = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"]


# ======================================================================================================
# configs
# ======================================================================================================
def test_config_is_frozen():
    cfg = dt.LoRA(r=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.targets = ("q_proj",)  # type: ignore[misc]
    assert cfg.r == 4
    new = cfg.replace(r=8)
    assert new.r == 8 and cfg.r == 4 and new is not cfg


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "LoRA.r"), (dict(r=-3), "LoRA.r"), (dict(r=2.5), "LoRA.r"), (dict(r="eight"), "LoRA.r"),
    (dict(r=True), "LoRA.r"),
    (dict(alpha=0), "LoRA.alpha"), (dict(alpha=float("nan")), "LoRA.alpha"), (dict(alpha=float("inf")), "LoRA.alpha"),
    (dict(alpha="big"), "LoRA.alpha"),
    (dict(dropout=-0.1), "LoRA.dropout"), (dict(dropout=1.0), "LoRA.dropout"), (dict(dropout="tenth"), "LoRA.dropout"),
    (dict(init="xavier"), "LoRA.init"), (dict(init=None), "LoRA.init"),
    (dict(bias="all"), "LoRA.bias"), (dict(bias=True), "LoRA.bias"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern"),
    (dict(rank_pattern=[("q_proj", 2)]), "rank_pattern"), (dict(rank_pattern={"(q": 2}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 0}), "alpha_pattern"), (dict(alpha_pattern={"q_proj": "x"}), "alpha_pattern"),
    (dict(targets=()), "targets"), (dict(targets=5), "targets"), (dict(targets="(["), "targets"),
    (dict(targets=("q_proj", 3)), "targets"), (dict(exclude="*bad"), "exclude"),
    (dict(layers=(-1,)), "layers"), (dict(layers=("one",)), "layers"), (dict(layers=1.5), "layers"),
    (dict(layers=True), "layers"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError) as info:
        dt.LoRA(**kwargs)
    msg = str(info.value)
    assert field in msg, msg
    value = next(iter(kwargs.values()))
    if isinstance(value, (int, float, str)) and not isinstance(value, bool) and value == value:
        assert repr(value) in msg, msg


def test_validation_names_allowed_values():
    with pytest.raises(ConfigError, match=r"'default'.*'pissa'"):
        dt.LoRA(init="xavier")
    with pytest.raises(ConfigError, match=r"'none'.*'lora_only'"):
        dt.LoRA(bias="all")
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        dt.LoRA(dropout=2)


def test_valid_edge_values():
    assert dt.LoRA(r=1, alpha=-2.0, dropout=0.0).scale == -2.0
    assert dt.LoRA(dropout=0.999).dropout == 0.999
    assert dt.LoRA(layers=2).layers == (2,)
    assert dt.LoRA(targets=["q_proj"]) == dt.LoRA(targets=("q_proj",))
    assert dt.LoRA(r=16, alpha=32).scale == 2.0
    assert math.isclose(dt.LoRA(r=16, alpha=32, rslora=True).scale, 8.0)


CONFIGS = [
    dt.LoRA(),
    dt.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj"), exclude=r".*\.layers\.0\..*", layers=(1, 2)),
    dt.LoRA(r=2, alpha=3.5, dropout=0.1, rslora=True, dora=True, bias="lora_only", init="pissa",
            targets=r"model\.layers\.\d+\.mlp\..*", exclude=("down_proj",),
            rank_pattern={"q_proj": 3, r"layers\.1\.mlp\.up_proj": 5}, alpha_pattern={"v_proj": 7.0}),
    dt.LoRA(targets="all-linear", modules_to_save=("classifier",), layers=0),
    dt.Full(targets=("lm_head",)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=range(len(CONFIGS)))
def test_config_json_round_trip(cfg):
    text = cfg.to_json()
    back = DeltaConfig.from_json(text)
    assert back == cfg and type(back) is type(cfg)
    assert back.to_json() == text
    data = json.loads(text)
    assert data["kind"] == cfg.kind
    assert DeltaConfig.from_dict(cfg.to_dict()) == cfg
    for f in dataclasses.fields(cfg):  # tuples stay tuples, dicts stay dicts
        assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        dt.LoRA(rank=4)
    msg = str(info.value)
    assert "'rank'" in msg and "known keys" in msg
    for known in ("r", "alpha", "dropout", "targets", "exclude", "layers", "rank_pattern"):
        assert repr(known) in msg, msg
    with pytest.raises(ConfigError, match=r"unknown key.*'lora_alpha'.*known keys.*'alpha'"):
        DeltaConfig.from_dict({"kind": "lora", "lora_alpha": 16})
    with pytest.raises(ConfigError, match=r"'rank'.*known keys"):
        dt.LoRA(r=4).replace(rank=8)


def test_from_json_errors():
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeltaConfig.from_json("{r: 4")
    with pytest.raises(ConfigError, match="'kind'"):
        DeltaConfig.from_json('{"r": 4}')
    with pytest.raises(ConfigError, match=r"unknown delta kind 'qlora'.*'lora'"):
        DeltaConfig.from_json('{"kind": "qlora"}')
    with pytest.raises(ConfigError, match="LoRA.r"):
        DeltaConfig.from_json('{"kind": "lora", "r": -1}')


def test_errors_are_one_hierarchy():
    for exc in (ConfigError, TargetError, dt.errors.ShapeMismatchError, dt.errors.CorruptFileError,
                dt.errors.NonFiniteError, dt.errors.DeltaNotFoundError, dt.errors.StateError,
                dt.errors.UnsupportedError, dt.errors.DeltaNameError):
        assert issubclass(exc, DeltaTuneError)


# ======================================================================================================
# targeting
# ======================================================================================================
def test_all_linear_llama_excludes_lm_head():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2), "d")
    expected = [f"model.layers.{i}.{s}" for i in range(3) for s in LLAMA_LAYER]
    assert sorted(targeted(m)) == sorted(expected)
    assert "lm_head" not in targeted(m)
    assert set(linear_paths(m)) - set(targeted(m)) == {"lm_head"}


def test_all_linear_llama_tied_embeddings():
    m = tiny_llama(tie=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    dt.attach(m, dt.LoRA(r=2), "d")
    assert "lm_head" not in targeted(m) and "model.embed_tokens" not in targeted(m)
    assert len(targeted(m)) == 3 * len(LLAMA_LAYER)


def test_all_linear_gpt2_conv1d_without_head():
    m = tiny_gpt2()
    dt.attach(m, dt.LoRA(r=2), "d")
    expected = [f"transformer.h.{i}.{s}" for i in range(3)
                for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert targeted(m) == expected
    assert all(isinstance(m.get_submodule(p), Conv1D) for p in targeted(m))
    # the Conv1D pieces see W in the [out, in] view: c_attn maps 32 -> 96
    p = pieces(m)["transformer.h.0.attn.c_attn"]
    assert tuple(p.lora_A.shape) == (2, 32) and tuple(p.lora_B.shape) == (96, 2)


def test_all_linear_bert_excludes_classifier():
    m = tiny_bert()
    dt.attach(m, dt.LoRA(r=2), "d")
    assert "classifier" not in targeted(m)
    assert set(linear_paths(m)) - set(targeted(m)) == {"classifier"}
    assert "bert.pooler.dense" in targeted(m)


def test_all_linear_custom_head_via_get_output_embeddings():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
            self.readout = nn.Linear(8, 4)

        def get_output_embeddings(self):
            return self.readout

        def forward(self, x):
            return self.readout(self.body(x))

    m = Net()
    dt.attach(m, dt.LoRA(r=2), "d")
    assert targeted(m) == ["body.0", "body.2"]


def test_regex_is_full_match():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=r"model\.layers\.[02]\.self_attn\.(q|v)_proj"), "d")
    assert targeted(m) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]
    # a bare name as a string is a regex that must match the whole path: nothing matches
    with pytest.raises(TargetError, match="match no module"):
        dt.attach(tiny_llama(), dt.LoRA(r=2, targets="q_proj"), "d")


def test_suffix_list():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=["q_proj", "mlp.down_proj"]), "d")
    assert targeted(m) == [f"model.layers.{i}.{s}" for i in range(3) for s in ("self_attn.q_proj", "mlp.down_proj")]
    # suffixes match at a dot boundary only: "proj" is no suffix of "q_proj"
    with pytest.raises(TargetError):
        dt.attach(tiny_llama(), dt.LoRA(r=2, targets=["proj"]), "d")
    # a full path is a suffix of itself; head modules can be targeted explicitly
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=["model.layers.1.self_attn.o_proj", "lm_head"]), "d")
    assert targeted(m) == ["model.layers.1.self_attn.o_proj", "lm_head"]


def test_exclude_regex_and_list():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, exclude=r"model\.layers\.0\..*"), "d")
    assert targeted(m) == [f"model.layers.{i}.{s}" for i in (1, 2) for s in LLAMA_LAYER]
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=("q_proj", "k_proj", "v_proj"), exclude=["k_proj", "layers.2.self_attn.v_proj"]),
              "d")
    assert targeted(m) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                           "model.layers.2.self_attn.q_proj"]


def test_layers_llama():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, layers=(1,)), "d")
    assert targeted(m) == [f"model.layers.1.{s}" for s in LLAMA_LAYER]
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=("q_proj",), layers=[0, 2]), "d")
    assert targeted(m) == ["model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]


def test_layers_gpt2_and_bert():
    m = tiny_gpt2()
    dt.attach(m, dt.LoRA(r=2, layers=(2,)), "d")
    assert targeted(m) == [f"transformer.h.2.{s}" for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    m = tiny_bert()
    dt.attach(m, dt.LoRA(r=2, layers=(0,)), "d")  # the pooler belongs to no layer: not targeted
    assert all(p.startswith("bert.encoder.layer.0.") for p in targeted(m)) and len(targeted(m)) == 6


def test_layers_out_of_range():
    with pytest.raises(TargetError, match=r"layers \[7\]"):
        dt.attach(tiny_llama(), dt.LoRA(r=2, layers=(7,)), "d")


def test_combined_targets_exclude_layers():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2, targets=r".*\.mlp\..*_proj", exclude=("gate_proj",), layers=(0, 2)), "d")
    assert targeted(m) == [f"model.layers.{i}.mlp.{s}" for i in (0, 2) for s in ("up_proj", "down_proj")]


def test_nothing_matches_mentions_example_paths():
    m = tiny_llama()
    with pytest.raises(TargetError) as info:
        dt.attach(m, dt.LoRA(r=2, targets=("query", "value")), "d")
    msg = str(info.value)
    assert "match no module" in msg and "LlamaForCausalLM" in msg
    assert "'model.embed_tokens'" in msg and "'model.layers.0.self_attn'" in msg
    assert "('query', 'value')" in msg
    assert state_of(m) is None


def test_rank_and_alpha_patterns():
    m = tiny_llama()
    cfg = dt.LoRA(r=4, alpha=8, rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                  alpha_pattern={"v_proj": 32, r"model\.layers\.2\..*": 1.0})
    dt.attach(m, cfg, "d")
    ps = pieces(m)
    assert len(ps) == 21
    for path, p in ps.items():
        r = 2 if path.endswith("q_proj") else 6 if path == "model.layers.1.mlp.down_proj" else 4
        alpha = 32 if path.endswith("v_proj") else 1.0 if path.startswith("model.layers.2.") else 8
        assert p.lora_A.shape[0] == r and p.lora_B.shape[1] == r, path
        assert p.cfg.r == r and p.cfg.alpha == alpha, path
        assert math.isclose(p.scale, alpha / r), path
    # the scale acts numerically: the delta's output contribution is scale * x A^T B^T
    q = m.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        ps["model.layers.1.self_attn.q_proj"].lora_B.normal_()
        x = torch.randn(3, 32)
        with dt.active(m, None):
            base = q(x)
        got = q(x) - base
        p = ps["model.layers.1.self_attn.q_proj"]
        want = 4.0 * (x @ p.lora_A.t() @ p.lora_B.t())
    assert torch.allclose(got, want, atol=1e-5)


def test_rank_pattern_matches_at_dot_boundary():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, targets=("q_proj", "v_proj"), rank_pattern={"proj": 1, "_proj": 1}), "d")
    assert all(p.lora_A.shape[0] == 4 for p in pieces(m).values())


def test_rslora_pattern_scale():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, alpha=8, rslora=True, targets=("q_proj",), rank_pattern={r"layers\.0\.self_attn\.q_proj": 16}),
              "d")
    ps = pieces(m)
    assert math.isclose(ps["model.layers.0.self_attn.q_proj"].scale, 8 / 4.0)  # sqrt(16)
    assert math.isclose(ps["model.layers.1.self_attn.q_proj"].scale, 8 / 2.0)  # sqrt(4)


def test_patterns_survive_save_and_load(tmp_path):
    m = tiny_llama()
    cfg = dt.LoRA(r=4, alpha=8, targets=("q_proj", "down_proj"), rank_pattern={"down_proj": 8},
                  alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2})
    dt.attach(m, cfg, "d")
    with torch.no_grad():
        for p in pieces(m).values():
            p.lora_B.normal_()
    dt.save(m, tmp_path / "d", "d")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "d")
    assert state_of(fresh).deltas["d"].config == cfg
    got = {p: (x.lora_A.shape[0], x.scale) for p, x in pieces(fresh).items()}
    want = {p: (x.lora_A.shape[0], x.scale) for p, x in pieces(m).items()}
    assert got == want and got["model.layers.0.mlp.down_proj"] == (8, 1.0)
    assert got["model.layers.0.self_attn.q_proj"] == (4, 0.5)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, m(ids).logits, atol=1e-5)


def test_targets_never_include_pieces_of_other_deltas():
    """A second all-linear delta targets the base modules only, not the first delta's submodules."""
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=2), "a")
    dt.attach(m, dt.LoRA(r=3), "b")
    assert targeted(m, "a") == targeted(m, "b")
    assert not any("deltatune" in p for p in targeted(m, "b"))
    with pytest.raises(TargetError):  # a regex that reaches into 'deltatune' submodules matches nothing
        dt.attach(m, dt.LoRA(r=2, targets=r".*deltatune.*"), "c")


def test_unsupported_module_type_in_targets():
    with pytest.raises(TargetError, match=r"'model\.norm' is a LlamaRMSNorm.*exclude"):
        dt.attach(tiny_llama(), dt.LoRA(r=2, targets=("norm",)), "d")


def test_tied_head_targeted_explicitly_cannot_be_merged():
    """LoRA on a tied lm_head works unmerged; merging would also change the input embedding, so it is refused."""
    m = tiny_llama(tie=True)
    dt.attach(m, dt.LoRA(r=2, targets=("lm_head",)), "d")
    with torch.no_grad():
        pieces(m)["lm_head"].lora_B.normal_()
    ids = torch.randint(0, 64, (2, 5))
    emb = m.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        before = m(ids).logits
        with dt.active(m, None):
            bare = m(ids).logits
    assert not torch.allclose(before, bare)  # the delta acts on the head
    for call in (lambda: dt.merge(m, "d"), lambda: dt.unload(m, merge_active=True)):
        with pytest.raises(dt.errors.UnsupportedError, match=r"'lm_head'.*model\.embed_tokens\.weight.*tied"):
            call()
        assert torch.equal(m.model.embed_tokens.weight, emb)
        assert state_of(m).merged == []
        with torch.no_grad():
            assert torch.equal(m(ids).logits, before)


def test_string_target_that_is_a_suffix_suggests_a_list():
    from deltatune.core.errors import TargetError
    from conftest import build_tiny

    tiny = build_tiny("llama")
    with pytest.raises(TargetError, match=r"did you mean targets=\['q_proj'\]"):
        dt.attach(tiny.model, dt.LoRA(targets="q_proj"))


def test_layers_out_of_range_is_an_error():
    from deltatune.core.errors import TargetError
    from conftest import build_tiny

    tiny = build_tiny("llama")
    with pytest.raises(TargetError, match=r"layers \[7\]"):
        dt.attach(tiny.model, dt.LoRA(layers=(1, 7)))
