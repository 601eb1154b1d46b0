"""Deltas that are incomplete until placed on a model (`Delta.needs_model`: a PEFT file's absolute LayerNorm values,
VeRA's shared projections sized by the model, peft's prefixes) are refused by every writer, `deltatune convert`
included; `convert --base` places them on the model (in the class they were saved from) and writes them; the
AdapterHub writer's model_type and leave_out come from the model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core.errors import UnsupportedError
from deltatune.io.adapterhub import AdapterHubDelta
from deltatune.io.delta import Delta
from deltatune.io.formats import format_named

from conftest import build_llama, build_tiny_with_biases, randomize_delta

X = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=X).logits


def convert(*args: str):
    return CliRunner().invoke(app, ["convert", *map(str, args)])


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    build_llama().save_pretrained(tmp_path / "base", safe_serialization=True)
    return tmp_path / "base"


def _trained(config: dt.DeltaConfig, name: str) -> torch.nn.Module:
    model = build_llama()
    dt.attach(model, config, name)
    randomize_delta(model, name, std=1.0)
    return model


@pytest.mark.parametrize("config", [dt.LNTuning(), dt.VeRA(targets=("q_proj",), r=4)], ids=["ln_tuning", "vera"])
def test_convert_refuses_a_peft_file_that_needs_the_model_then_does_it_with_base(tmp_path, base_dir, config):
    model = _trained(config, "d")
    dt.save(model, tmp_path / "peft", "d", format="peft")
    assert Delta.read(tmp_path / "peft").needs_model
    refused = convert(tmp_path / "peft", tmp_path / "native", "--to", "native")
    assert refused.exit_code == 2 and "--base" in refused.output and not (tmp_path / "native").exists()
    for fmt in ("native", "adapters"):  # every writer refuses it, called directly too
        with pytest.raises(UnsupportedError, match="load it onto the model"):
            format_named(fmt).write(Delta.read(tmp_path / "peft"), tmp_path / "direct")
    assert not (tmp_path / "direct").exists()
    done = convert(tmp_path / "peft", tmp_path / "native", "--to", "native", "--base", base_dir)
    assert done.exit_code == 0, done.output
    want = logits(model)
    assert (want - logits(build_llama())).abs().max() > 1e-3  # the delta changes the output: the test can fail
    torch.testing.assert_close(logits(dt.load(build_llama(), tmp_path / "native")), want, atol=1e-5, rtol=0)


def test_convert_refuses_peft_prefixes_without_the_model(tmp_path):
    model = _trained(dt.PrefixTuning(n_tokens=3), "p")
    dt.save(model, tmp_path / "peft", "p", format="peft")
    refused = convert(tmp_path / "peft", tmp_path / "native", "--to", "native")
    assert refused.exit_code == 2 and "--base" in refused.output and not (tmp_path / "native").exists()


def test_convert_with_base_builds_the_saved_class_and_gives_the_writer_the_model(tmp_path, base_dir):
    """A native LN-tuning delta of a LlamaForCausalLM (paths model.layers...) to PEFT, which stores absolute values:
    --base must build the class with the head (AutoModel's paths lack `model.`) and hand the writer the model."""
    model = _trained(dt.LNTuning(), "ln")
    dt.save(model, tmp_path / "native", "ln")
    done = convert(tmp_path / "native", tmp_path / "peft", "--to", "peft", "--base", base_dir)
    assert done.exit_code == 0, done.output
    torch.testing.assert_close(logits(dt.load(build_llama(), tmp_path / "peft")), logits(model), atol=1e-5, rtol=0)


def test_ln_tuning_without_bias_writes_no_bias_and_reads_back_the_same_config(tmp_path):
    tiny = build_tiny_with_biases("bert")
    model = tiny.fresh()
    dt.attach(model, dt.LNTuning(targets=("attention.output.LayerNorm",), bias=False), "ln")
    randomize_delta(model, "ln")
    dt.save(model, tmp_path / "p", "ln", format="peft")
    assert not any(k.endswith("ln_tuning_layers.bias") for k in load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert Delta.read(tmp_path / "p").config.bias is False
    torch.testing.assert_close(tiny.logits(dt.load(tiny.fresh(), tmp_path / "p")), tiny.logits(model), atol=1e-5, rtol=0)


def test_peft_writer_refuses_a_delta_of_whole_modules_only(tmp_path):
    delta = Delta("w", dt.LoRA(targets=("q_proj",), modules_to_save=("lm_head",)),
                  {"lm_head": {"weight": torch.zeros(64, 16)}}, {"lm_head": "Linear"})
    with pytest.raises(UnsupportedError, match="adapts no module with lora"):
        format_named("peft").write(delta, tmp_path / "x")


def test_sized_delta_is_completed_once_per_model(tmp_path, monkeypatch):
    model = _trained(dt.VeRA(targets=("q_proj", "v_proj"), r=4), "v")
    dt.save(model, tmp_path / "p", "v", format="peft")
    delta = Delta.read(tmp_path / "p")
    calls = []
    original = type(delta).complete
    monkeypatch.setattr(type(delta), "complete", lambda self, sizes: calls.append(1) or original(self, sizes))
    base = build_llama()
    for path in delta.state:
        delta.update(path, base)
    assert len(delta.state) == 4 and len(calls) == 1
    delta.update(next(iter(delta.state)), build_llama())  # another model: completed for that one
    assert len(calls) == 2


# --- AdapterHub writer ---------------------------------------------------------------------------------------------
def test_adapterhub_writer_refuses_a_model_class_it_does_not_map(tmp_path):
    model = _trained(dt.Houlsby(targets=("o_proj", "down_proj")), "h")
    delta = Delta.from_model(model, "h")
    delta.source = model
    delta.base["model_class"] = "MistralForCausalLM"  # Llama's module layout, another AdapterHub model_type
    with pytest.raises(UnsupportedError, match="'mistral'"):
        format_named("adapters").write(delta, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_adapterhub_leave_out_counts_the_model_layers(tmp_path):
    model = _trained(dt.Houlsby(targets=("o_proj", "down_proj"), layers=[0]), "h")
    dt.save(model, tmp_path / "a", "h", format="adapters")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["model_type"] == "llama" and meta["config"]["leave_out"] == [1]
    torch.testing.assert_close(logits(dt.load(build_llama(), tmp_path / "a")), logits(model), atol=1e-5, rtol=0)
    # the same delta without its model: the layer count is unknown, so it is refused rather than guessed
    with pytest.raises(UnsupportedError, match="layer count"):
        format_named("adapters").write(Delta.from_model(model, "h"), tmp_path / "b")
    # from a native file, with the model given to convert
    dt.save(model, tmp_path / "n", "h")
    assert convert(tmp_path / "n", tmp_path / "c", "--to", "adapters").exit_code == 2
    build_llama().save_pretrained(tmp_path / "base", safe_serialization=True)
    done = convert(tmp_path / "n", tmp_path / "c", "--to", "adapters", "--base", tmp_path / "base")
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["config"]["leave_out"] == [1]


def test_adapterhub_deltas_do_not_share_their_hub_record():
    a = AdapterHubDelta("a", dt.LoRA(targets=("q",)), {}, {})
    b = AdapterHubDelta("b", dt.LoRA(targets=("q",)), {}, {})
    a.hub["arch"] = "x"
    assert b.hub == {}
