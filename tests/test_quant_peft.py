"""QLoRA against peft as the oracle: the same quantised weights (one dt.quantize, deep-copied) and the same LoRA
weights give equal logits, equal loss and equal gradients after one training step, and PEFT files travel both ways
between the libraries on the quantised base."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402

import deltatune as dt  # noqa: E402

from conftest import build_tiny, module_pieces, randomize_delta  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt:UserWarning")
ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def quantised_pair(scheme: str):
    tiny = build_tiny("llama")
    dt.quantize(tiny.model, scheme)
    return tiny, copy.deepcopy(tiny.model)


def peft_lora(peft_model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """{module path in the base model: (lora_A weight, lora_B weight)} of peft's adapter "default"."""
    out = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            out[path] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("dora", [False, True])
def test_qlora_equals_peft(scheme: str, dora: bool) -> None:
    tiny, theirs = quantised_pair(scheme)
    ours = tiny.model
    dt.attach(ours, dt.LoRA(r=4, alpha=8, dora=dora, targets=tuple(TARGETS)), name="q")
    randomize_delta(ours, "q", std=0.2)
    theirs = prepare_model_for_kbit_training(theirs, use_gradient_checkpointing=False)
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, use_dora=dora, target_modules=TARGETS,
                                               lora_dropout=0.0))
    pairs = peft_lora(theirs)
    pieces = module_pieces(ours, "q")
    assert set(pairs) == set(pieces)
    with torch.no_grad():
        for path, (a, b) in pairs.items():
            piece = pieces[path][1]
            a.copy_(piece.lora_A)
            b.copy_(piece.lora_B)
        if dora:
            for name, module in theirs.named_modules():
                path = name.removeprefix("base_model.model.")
                if path in pieces and hasattr(module, "lora_magnitude_vector"):
                    module.lora_magnitude_vector["default"].weight.copy_(pieces[path][1].magnitude)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.allclose(tiny.logits(ours), tiny.logits(theirs), atol=ATOL)

    if dora and scheme == "int8":  # peft 0.21.2's 8-bit DoRA fails in a training forward that follows an inference
        return  # forward, without deltatune too (bitsandbytes MatMul8bitLt: state.SCB is None); inference compared above
    # one training step: the same loss and the same gradients on every factor
    ours.train(), theirs.train()
    labels = tiny.inputs["input_ids"]
    loss_ours = ours(**tiny.inputs, labels=labels).loss
    loss_theirs = theirs(**tiny.inputs, labels=labels).loss
    assert torch.allclose(loss_ours, loss_theirs, atol=ATOL)
    loss_ours.backward()
    loss_theirs.backward()
    for path, (a, b) in pairs.items():
        piece = pieces[path][1]
        assert torch.allclose(piece.lora_A.grad, a.grad, atol=ATOL), path
        assert torch.allclose(piece.lora_B.grad, b.grad, atol=ATOL), path


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_peft_files_both_ways_on_the_quantised_base(scheme: str, tmp_path) -> None:
    tiny, spare = quantised_pair(scheme)
    ours = tiny.model
    dt.attach(ours, dt.LoRA(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")), name="q")
    randomize_delta(ours, "q", std=0.2)
    want = tiny.logits(ours)
    dt.save(ours, tmp_path / "ours", "q", format="peft")
    theirs = PeftModel.from_pretrained(copy.deepcopy(spare), tmp_path / "ours").eval()
    assert torch.allclose(tiny.logits(theirs), want, atol=ATOL)

    # peft -> deltatune
    theirs = get_peft_model(copy.deepcopy(spare), LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"],
                                                             init_lora_weights=False)).eval()
    expected = tiny.logits(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    back = copy.deepcopy(spare)
    dt.load(back, tmp_path / "theirs", "p")
    assert torch.allclose(tiny.logits(back), expected, atol=ATOL)
