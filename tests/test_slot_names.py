"""A delta name can never collide with the runtime's per-module state: the slot's keys are delta names, and
everything else lives in one object (`slot.internal`); names that are attributes of the slot are refused."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaNameError
from deltatune.runtime import slot_of

from conftest import build_tiny, randomize_delta


def _two_loras(names: tuple[str, str]):
    tiny = build_tiny("llama")
    torch.manual_seed(0)  # the same factors under either pair of names
    for i, name in enumerate(names):
        dt.attach(tiny.model, dt.LoRA(r=2, targets=("q_proj", "up_proj")), name, activate=False)
        randomize_delta(tiny.model, name, seed=i)
    return tiny


def test_a_delta_named_like_a_block_cache_works_under_that_block() -> None:
    """Regression: a delta named `arrow_cache` plus dt.Arrow raised "'LoRAPiece' object is not subscriptable"."""
    plain = _two_loras(("a", "b"))
    clash = _two_loras(("arrow_cache", "route_bank"))
    dt.activate(plain.model, dt.Arrow("a", "b", top_k=1))
    dt.activate(clash.model, dt.Arrow("arrow_cache", "route_bank", top_k=1))
    expected = plain.logits()
    torch.testing.assert_close(clash.logits(), expected, atol=0, rtol=0)
    torch.testing.assert_close(clash.logits(), expected, atol=0, rtol=0)  # the cached prototypes, second forward
    with dt.route(clash.model, ["route_bank", "arrow_cache"]), dt.route(plain.model, ["b", "a"]):
        torch.testing.assert_close(clash.logits(), plain.logits(), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["internal", "keys", "training", "layout", "set_plan", "merge_pieces", "_modules"])
def test_names_of_slot_attributes_are_refused_and_nothing_changes(name: str) -> None:
    tiny = build_tiny("llama")
    dt.attach(tiny.model, dt.LoRA(r=2), "a")
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    with pytest.raises(DeltaNameError, match="reserved"):
        dt.attach(tiny.model, dt.LoRA(r=2), name)
    assert set(tiny.model.state_dict()) == set(before)
    assert dt.active_names(tiny.model) == ("a",)
    slot = slot_of(tiny.model.model.layers[0].self_attn.q_proj)
    assert list(slot.keys()) == ["a"] and slot.internal.active == ("a",)
