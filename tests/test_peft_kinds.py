"""The PEFT codec for every peft adapter type with a mapping, with peft itself as the oracle, both ways:

* peft → deltatune: `get_peft_model` + random non-zero weights + `save_pretrained`, then `dt.load` into a fresh
  base gives peft's logits (fp32, atol 1e-5);
* deltatune → peft: the config read from that file attached to a fresh base + random non-zero weights +
  `dt.save(format="peft")`, then `PeftModel.from_pretrained` gives our logits.

Cases are (peft config, tiny model) pairs on tiny Llama (GQA), GPT-2 (Conv1D) and BERT where peft applies the method
(peft's LoHa, LoKr, SHiRA, BEFT and Poly adapt nn.Linear only, so not GPT-2's Conv1D; BEFT on Llama, whose linears
have no bias, and prefix tuning on GPT-2 and BERT, whose positions are absolute, are refused:
tests/test_peft_kinds_config.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.io.peft import peft_types  # noqa: E402

from conftest import Tiny, build_tiny_with_biases, pieces_of  # noqa: E402

ATOL = 1e-5
LLAMA_QV = ["q_proj", "v_proj"]
BERT_QV = ["query", "value"]
VIRTUAL = 3  # prompt tokens
TASK_IDS = torch.tensor([1, 0])  # Poly's per-example task ids (batch of 2)
STD = {"llama": 0.3, "gpt2": 0.3, "bert": 2.0}  # BERT's pooled logits move little otherwise


def _cases() -> dict[str, tuple[str, object]]:
    """case id -> (model kind, a function making peft's config)."""
    return {
        "ia3-llama": ("llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                      feedforward_modules=["down_proj"])),
        "ia3-gpt2": ("gpt2", lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                                    feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
        "ia3-bert": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                    feedforward_modules=["output.dense"])),
        "loha-llama": ("llama", lambda: peft.LoHaConfig(r=2, alpha=3.0, target_modules=["q_proj", "k_proj", "down_proj"])),
        "loha-bert": ("bert", lambda: peft.LoHaConfig(r=3, alpha=5.0, target_modules=BERT_QV)),
        "lokr-llama": ("llama", lambda: peft.LoKrConfig(r=2, alpha=3.0, target_modules=["q_proj", "k_proj", "up_proj"])),
        "lokr-lowrank-both-bert": ("bert", lambda: peft.LoKrConfig(r=1, alpha=1.5, decompose_factor=8,
                                                                   decompose_both=True, target_modules=BERT_QV)),
        "adalora-llama": ("llama", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10,
                                                              target_modules=LLAMA_QV + ["down_proj"])),
        "adalora-gpt2": ("gpt2", lambda: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=4, total_step=10,
                                                            target_modules=["c_attn"], fan_in_fan_out=True)),
        "adalora-bert": ("bert", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=BERT_QV)),
        "beft-bert": ("bert", lambda: peft.BeftConfig(target_modules=["query", "value", "intermediate.dense"])),
        "ln-llama": ("llama", lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "model.norm"])),
        "ln-gpt2": ("gpt2", lambda: peft.LNTuningConfig(target_modules=["ln_1", "ln_f"])),
        "ln-bert": ("bert", lambda: peft.LNTuningConfig(target_modules=["attention.output.LayerNorm"])),
        "shira-llama": ("llama", lambda: peft.ShiraConfig(r=2, target_modules=LLAMA_QV)),
        "shira-bert": ("bert", lambda: peft.ShiraConfig(r=1, target_modules=BERT_QV + ["output.dense"])),
        "vera-llama": ("llama", lambda: peft.VeraConfig(r=4, target_modules=LLAMA_QV + ["down_proj"])),
        "vera-seeded-llama": ("llama", lambda: peft.VeraConfig(r=4, target_modules=LLAMA_QV + ["down_proj"],
                                                               save_projection=False, projection_prng_key=7)),
        "vera-gpt2": ("gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        "vera-bert": ("bert", lambda: peft.VeraConfig(r=4, target_modules=BERT_QV + ["intermediate.dense"])),
        "randlora-llama": ("llama", lambda: peft.RandLoraConfig(r=5, randlora_alpha=3, target_modules=LLAMA_QV)),
        "randlora-gpt2": ("gpt2", lambda: peft.RandLoraConfig(r=4, randlora_alpha=2, target_modules=["c_attn", "c_fc"],
                                                              fan_in_fan_out=True)),
        "randlora-bert": ("bert", lambda: peft.RandLoraConfig(r=4, randlora_alpha=2, target_modules=BERT_QV)),
        "prefix-llama": ("llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)),
        "poly-llama": ("llama", lambda: peft.PolyConfig(r=2, n_tasks=3, n_skills=2, target_modules=LLAMA_QV)),
        "mhr-bert": ("bert", lambda: peft.PolyConfig(r=2, n_tasks=2, n_skills=3, n_splits=2, target_modules=BERT_QV)),
        "prompt-llama": ("llama", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)),
        "prompt-gpt2": ("gpt2", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)),
        "prompt-bert": ("bert", lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=VIRTUAL)),
    }


CASES = _cases()


def _randomize(model: torch.nn.Module, marker: str, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name and p.requires_grad or (marker == "peft" and p.requires_grad):
                p.add_(torch.randn(p.shape, generator=g) * std)


def logits(tiny: Tiny, model: torch.nn.Module, case: str, peft_side: bool = False) -> torch.Tensor:
    """The model's logits on the tiny inputs (with task ids for Poly); peft's causal-LM prompt-tuning logits
    without the virtual positions (ours have none)."""
    extra = {"task_ids": TASK_IDS} if case.startswith(("poly", "mhr")) else {}
    if extra and peft_side:
        model = model.base_model  # PolyModel takes task_ids; PeftModel's forward does not pass them on
    with torch.no_grad():
        out = _quiet(model, **tiny.inputs, **extra).logits
    if peft_side and case.startswith("prompt") and tiny.kind != "bert":
        out = out[:, VIRTUAL:]
    return out


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def peft_saved(case: str, path: Path) -> tuple[Tiny, torch.Tensor]:
    """A randomized peft adapter of `case` saved at `path`; the tiny model and peft's logits."""
    kind, make = CASES[case]
    tiny = build_tiny_with_biases(kind)
    pm = _quiet(get_peft_model, tiny.fresh(), make())
    _randomize(pm, "peft", std=3.0 if case.startswith(("prompt", "prefix")) else STD[kind])  # prompts: enough to change tokens
    pm.eval()
    ref = logits(tiny, pm, case, peft_side=True)
    assert (ref - tiny.logits(tiny.fresh())).abs().max() > 1e-3  # the adapter changes the logits
    _quiet(pm.save_pretrained, path)
    return tiny, ref


def test_every_case_is_a_mapped_type() -> None:
    assert {CASES[c][1]().peft_type.value for c in CASES} <= set(peft_types())


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_deltatune(case: str, tmp_path: Path) -> None:
    tiny, ref = peft_saved(case, tmp_path / "a")
    model = tiny.fresh()
    _quiet(dt.load, model, tmp_path / "a", name="p")
    torch.testing.assert_close(logits(tiny, model, case), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_deltatune_to_peft(case: str, tmp_path: Path) -> None:
    """Our delta of the structure read from peft's file (frozen parts, e.g. VeRA's projections, included), its
    trained tensors set to new random values, saved for peft."""
    tiny, _ = peft_saved(case, tmp_path / "a")
    model = tiny.fresh()
    _quiet(dt.load, model, tmp_path / "a", name="ours", trainable=True)
    _randomize(model, ".deltatune.ours.", seed=1, std=STD[tiny.kind])
    ours = logits(tiny, model, case)
    assert (ours - tiny.logits(tiny.fresh())).abs().max() > 1e-3
    dt.save(model, tmp_path / "b", "ours", format="peft")
    theirs = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp_path / "b").eval()
    torch.testing.assert_close(logits(tiny, theirs, case, peft_side=True), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["prompt-llama", "prefix-llama"])  # the tiny GPT-2 repeats one token whatever the prompt
def test_generation_matches_peft(case: str, tmp_path: Path) -> None:
    """Greedy generate() gives peft's tokens after loading its prompt adapter (and peft ours after saving)."""
    tiny, _ = peft_saved(case, tmp_path / "a")
    ids = tiny.inputs["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    theirs_model = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp_path / "a").eval()
    theirs = _quiet(theirs_model.generate, input_ids=ids, **kw)
    model = tiny.fresh()
    _quiet(dt.load, model, tmp_path / "a", name="p")
    ours = _quiet(model.generate, input_ids=ids, **kw)
    assert ours.shape == (ids.shape[0], ids.shape[1] + 5)
    assert torch.equal(ours[:, -theirs.shape[1]:], theirs[:, -ours.shape[1]:])
    assert not torch.equal(ours, _quiet(tiny.fresh().generate, input_ids=ids, **kw))  # the prompt changes them
    dt.save(model, tmp_path / "b", "p", format="peft")
    again = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp_path / "b").eval()
    assert torch.equal(_quiet(again.generate, input_ids=ids, **kw), theirs)


def test_adalora_pruned_ranks_both_ways(tmp_path: Path) -> None:
    """Pruned ranks: ours (rank_pattern: path -> rank) → peft (rank_pattern: `<path>.lora_E` -> mask, the kept
    triplets in the file) → peft's own save → ours again, logits equal at every step."""
    tiny = build_tiny_with_biases("llama")
    model = tiny.fresh()
    pruned = {r"model\.layers\.0\.self_attn\.q_proj": 1, r"model\.layers\.1\.self_attn\.v_proj": 3}
    dt.attach(model, dt.AdaLoRA(init_r=4, target_r=2, alpha=6.0, targets=tuple(LLAMA_QV), rank_pattern=pruned), "a")
    _randomize(model, ".deltatune.a.", seed=5)
    ours = tiny.logits(model)
    dt.save(model, tmp_path / "ours", "a", format="peft")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"model.layers.0.self_attn.q_proj.lora_E": [True, False, False, False],
                                       "model.layers.1.self_attn.v_proj.lora_E": [True, True, True, False]}
    theirs = _quiet(PeftModel.from_pretrained, tiny.fresh(), tmp_path / "ours").eval()
    torch.testing.assert_close(tiny.logits(theirs), ours, atol=ATOL, rtol=0)
    _quiet(theirs.save_pretrained, tmp_path / "theirs")
    back = tiny.fresh()
    _quiet(dt.load, back, tmp_path / "theirs", name="b")
    torch.testing.assert_close(tiny.logits(back), ours, atol=ATOL, rtol=0)
    ranks = {p: piece.rank for p, piece in pieces_of(back, "b").items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 1 and ranks["model.layers.1.self_attn.v_proj"] == 3
    assert ranks["model.layers.0.self_attn.v_proj"] == 4


@pytest.mark.parametrize("case", ["adalora-llama", "vera-llama", "randlora-llama", "shira-llama", "ln-bert",
                                  "prefix-llama", "prompt-gpt2", "poly-llama"])
def test_a_damaged_tensor_is_refused_and_the_model_untouched(case: str, tmp_path: Path) -> None:
    """The last tensor of the file (in key order) one row short: a typed error, and nothing attached."""
    from safetensors.torch import load_file, save_file

    from deltatune.core.errors import DeltaTuneError

    tiny, _ = peft_saved(case, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, file)
    model = tiny.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DeltaTuneError):
        _quiet(dt.load, model, tmp_path / "a", name="p")
    assert not any("deltatune" in n for n, _ in model.named_modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
