"""Route: one delta (or none) per example equals running each example alone with its delta — forward and
generate (every decode step with the KV cache), fast path (low-rank) and per-group path (DoRA, sparse, (IA)3)."""
from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.compose import route as routing
from deltatune.core.errors import ConfigError
from conftest import build_tiny, randomize_delta

ATOL = 1e-5


_randomize = randomize_delta


def _library(kind: str, configs: dict):
    tiny = build_tiny(kind)
    torch.manual_seed(0)  # the factors do not depend on which tests ran before
    for i, (name, cfg) in enumerate(configs.items()):
        dt.attach(tiny.model, cfg, name=name, activate=False)
        _randomize(tiny.model, name, i + 1)
    return tiny


def _ids(batch: int, seq: int = 7, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _alone(model, rows, ids):
    outs = []
    for b, name in enumerate(rows):
        with dt.active(model, name), torch.no_grad():
            outs.append(model(input_ids=ids[b:b + 1]).logits)
    return torch.cat(outs)


LORAS = {"r8": dt.LoRA(r=8), "r4": dt.LoRA(r=4, alpha=4), "r2": dt.LoRA(r=2, rslora=True)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("rows", [
    ["r8", "r4", None, "r2", "r8"],                   # mixed ranks, a bare row: gather path, one bmm pair per rank
    ["r8"] * 8 + ["r4"] * 4,                          # few deltas, many rows each: segment path
    ["r4", "r4"],                                     # every row the same delta, in order
])
def test_route_forward_equals_each_example_alone(kind, rows):
    tiny = _library(kind, LORAS)
    ids = _ids(len(rows))
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(out, _alone(tiny.model, rows, ids), atol=ATOL, rtol=0)
    assert dt.active_block(tiny.model) is None  # restored


def test_fast_path_is_taken_for_low_rank_and_not_for_others():
    tiny = _library("llama", {**LORAS, "dora": dt.LoRA(r=2, dora=True), "sp": dt.Sparse(density=0.1)})
    rows = ["r8", "dora", "sp", "r4", None, "r2"]
    ids = _ids(len(rows))
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model(input_ids=ids).logits
        slot = tiny.model.model.layers[0].self_attn.q_proj.deltatune
        plan = slot.current()[2][(dt.Route, "weight")]  # this thread's route: its own plan cache
        assert plan.fast and all(g.batched for g in plan.fast)
        assert sorted(g.At.shape[-1] for g in plan.fast) == [2, 4, 8]  # one group per rank, no padding
        assert sorted(n for n, _ in plan.slow) == ["dora", "sp"]
    torch.testing.assert_close(out, _alone(tiny.model, rows, ids), atol=ATOL, rtol=0)


def test_route_over_output_and_input_position_deltas_and_bias_deltas():
    ffn = r".*layer\.\d+\.output\.dense"  # (IA)3 on the FFN's input: an input-position piece
    tiny = _library("bert", {"ia3": dt.IA3(targets=rf".*\.(key|value)|{ffn}", feedforward=ffn),
                             "lb": dt.LoRA(r=2, bias="lora_only"), "l": dt.LoRA(r=4)})
    rows = ["ia3", "lb", None, "l", "lb", "ia3"]
    ids = _ids(len(rows))
    mask = torch.ones_like(ids)
    outs = []
    for b, name in enumerate(rows):
        with dt.active(tiny.model, name), torch.no_grad():
            outs.append(tiny.model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits)
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(out, torch.cat(outs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_route_generate_equals_each_example_alone(kind):
    tiny = _library(kind, {**LORAS, "dora": dt.LoRA(r=2, dora=True)})
    rows = ["r8", None, "r2", "dora", "r4"]
    ids = _ids(len(rows), seq=5)
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=0)
    for b, name in enumerate(rows):
        with dt.active(tiny.model, name), torch.no_grad():
            ref = tiny.model.generate(ids[b:b + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True, pad_token_id=0)
        assert torch.equal(out.sequences[b], ref.sequences[0])
        for step_scores, ref_scores in zip(out.scores, ref.scores):  # every decode step, through the KV cache
            torch.testing.assert_close(step_scores[b:b + 1], ref_scores, atol=ATOL, rtol=0)


def test_route_rows_repeat_for_num_return_sequences():
    tiny = _library("llama", LORAS)
    rows = ["r8", "r2"]
    ids = _ids(2, seq=4)
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model.generate(ids, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                                  pad_token_id=0)
    for b, name in enumerate(rows):
        with dt.active(tiny.model, name), torch.no_grad():
            ref = tiny.model.generate(ids[b:b + 1], max_new_tokens=3, do_sample=False, num_beams=2,
                                      num_return_sequences=2, pad_token_id=0)
        assert torch.equal(out[2 * b:2 * b + 2], ref)


def test_route_with_grad_matches_per_example_loss_and_gradients():
    tiny = _library("llama", {"a": dt.LoRA(r=2), "b": dt.LoRA(r=4)})
    rows = ["a", "b", None, "a"]
    ids = _ids(len(rows))
    params = {n: p for n, p in tiny.model.named_parameters() if p.requires_grad}
    with dt.route(tiny.model, rows):
        loss = sum(tiny.model(input_ids=ids).logits[b].square().mean() for b in range(len(rows)))
    routed = torch.autograd.grad(loss, list(params.values()))
    ref_loss = 0.0
    for b, name in enumerate(rows):
        with dt.active(tiny.model, name):
            ref_loss = ref_loss + tiny.model(input_ids=ids[b:b + 1]).logits[0].square().mean()
    ref = torch.autograd.grad(ref_loss, list(params.values()), allow_unused=True)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    for g, r in zip(routed, ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, atol=ATOL, rtol=0)


def test_route_stacked_with_a_shared_delta():
    """Stack(Route(rows), "shared"): each row gets its own delta plus the shared one."""
    tiny = _library("llama", {**LORAS, "shared": dt.LoRA(r=2, targets=("q_proj", "v_proj"))})
    rows = ["r8", None, "r4"]
    ids = _ids(len(rows))
    with dt.active(tiny.model, dt.Stack(dt.Route(rows), "shared")), torch.no_grad():
        out = tiny.model(input_ids=ids).logits
    ref = []
    for b, name in enumerate(rows):
        with dt.active(tiny.model, ["shared"] if name is None else [name, "shared"]), torch.no_grad():
            ref.append(tiny.model(input_ids=ids[b:b + 1]).logits)
    torch.testing.assert_close(out, torch.cat(ref), atol=ATOL, rtol=0)


def test_bank_follows_parameter_changes_and_plans_are_per_activation():
    tiny = _library("llama", LORAS)
    rows = ["r8", "r4", "r2"]
    ids = _ids(3)
    with dt.route(tiny.model, rows), torch.no_grad():
        tiny.model(input_ids=ids)
    _randomize(tiny.model, "r4", 99)  # in-place change after the bank was built
    with dt.route(tiny.model, rows), torch.no_grad():
        out = tiny.model(input_ids=ids).logits
    torch.testing.assert_close(out, _alone(tiny.model, rows, ids), atol=ATOL, rtol=0)


def test_route_errors():
    tiny = _library("llama", LORAS)
    with pytest.raises(ConfigError):
        with dt.route(tiny.model, ["r8", "r4", "r2"]), torch.no_grad():
            tiny.model(input_ids=_ids(2))  # 2 rows for 3 names
    with pytest.raises(dt.errors.DeltaNameError):
        with dt.route(tiny.model, ["r8", "unknown"]):
            pass
    assert dt.active_block(tiny.model) is None


def test_segment_threshold_constant_is_what_the_docs_say():
    assert routing.SEGMENT_ROWS_PER_DELTA == 4
