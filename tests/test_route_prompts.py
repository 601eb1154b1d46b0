"""Route over attention-position deltas (prompt and prefix tuning): a batch routed row by row equals every example run
alone with its delta — forward, loss and gradients, and generate (scores at every decode step through the KV cache).

Rows differ in prefix / prompt length (1, 2, 3, 5 tokens), include None (the bare model) and deltas of other positions
(LoRA). tiny_llama has grouped-query attention (2 query heads, 1 key/value head); tiny_gpt2 has absolute position
embeddings; tiny_bert is bidirectional and its classifier reads position 0 through the pooler.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

import deltatune as dt
from deltatune.core.errors import ConfigError, UnsupportedError
from conftest import Tiny, build_tiny

ATOL = 1e-5

PREFIXES = {"x1": dt.PrefixTuning(n_tokens=1), "x3": dt.PrefixTuning(n_tokens=3), "x5": dt.PrefixTuning(n_tokens=5)}
PROMPTS = {"p1": dt.PromptTuning(n_tokens=1), "p2": dt.PromptTuning(n_tokens=2), "p5": dt.PromptTuning(n_tokens=5)}
LORA = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}

CASES = {  # name: (deltas, rows)
    "prefix": (PREFIXES, ["x3", None, "x1", "x5", "x3", "x1"]),
    "prompt": (PROMPTS, ["p2", "p5", None, "p1", "p2"]),
    "prefix+lora": ({**PREFIXES, "lora": None}, ["x3", "lora", None, "x5", "lora"]),
    "prompt+lora": ({**PROMPTS, "lora": None}, ["lora", "p5", None, "p1", "lora"]),
    "prompt+prefix": ({**PROMPTS, **PREFIXES}, ["p2", "x5", None, "p5", "x1", "p2"]),
    # every row its own delta, all of one length: per-row blocks without padding
    "prefix-equal": ({"xa": dt.PrefixTuning(n_tokens=2), "xb": dt.PrefixTuning(n_tokens=2)}, ["xb", "xa", "xb"]),
    "prompt-equal": ({"pa": dt.PromptTuning(n_tokens=2), "pb": dt.PromptTuning(n_tokens=2)}, ["pa", "pb", "pb"]),
}


def library(kind: str, deltas: dict, attn: str = "eager") -> Tiny:
    """A tiny model with every delta attached (inactive), each parameter moved away from its initial value."""
    t = build_tiny(kind)
    t.model.set_attn_implementation(attn)
    for i, (name, cfg) in enumerate(deltas.items()):
        torch.manual_seed(i)
        dt.attach(t.model, cfg or dt.LoRA(r=2, targets=LORA[kind]), name=name, activate=False)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in t.model.named_parameters():
                if f".deltatune.{name}." in pname:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    if kind == "bert":  # HF initialises the classifier to std 0.02: logit differences would be too small to test
        with torch.no_grad():
            t.model.classifier.weight.mul_(50.0)
    return t


def ids_for(batch: int, seq: int = 6, seed: int = 3) -> Tensor:
    return torch.randint(1, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def observe(t: Tiny, model_inputs: dict) -> Tensor:
    """Logits, and for BERT also the last hidden states, per row."""
    with torch.no_grad():
        out = t.model(**model_inputs, output_hidden_states=True)
    if t.kind == "bert":
        return torch.cat([out.logits, out.hidden_states[-1].flatten(1)], 1)
    return out.logits


def each_alone(t: Tiny, rows: list, model_inputs: dict, block=lambda name: name) -> Tensor:
    """Row b run as a batch of one with composition block(rows[b]) active."""
    outs = []
    for b, name in enumerate(rows):
        with dt.active(t.model, block(name)):
            outs.append(observe(t, {k: v[b:b + 1] for k, v in model_inputs.items()}))
    return torch.cat(outs)


def bert_inputs(ids: Tensor) -> dict:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def assert_close(a: Tensor, b: Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# --- forward --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_each_example_alone(kind: str, case: str) -> None:
    deltas, rows = CASES[case]
    t = library(kind, deltas)
    ids = ids_for(len(rows))
    inputs = bert_inputs(ids) if kind == "bert" else {"input_ids": ids}
    want = each_alone(t, rows, inputs)
    with dt.route(t.model, rows):
        got = observe(t, inputs)
    assert_close(got, want)
    bare = each_alone(t, [None] * len(rows), inputs)
    assert all((want[b] - bare[b]).abs().max() > 1e-3 for b, r in enumerate(rows) if r is not None), \
        "every routed delta must change its row for this test to mean anything"
    assert dt.active_block(t.model) is None  # the route ends with the context


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_forward_sdpa_equals_each_example_alone(kind: str, case: str) -> None:
    """sdpa: transformers passes no mask when it can use is_causal (or, for BERT, when nothing is padded)."""
    deltas, rows = CASES[case]
    t = library(kind, deltas, attn="sdpa")
    assert t.model.config._attn_implementation == "sdpa"
    ids = ids_for(len(rows))
    inputs = bert_inputs(ids) if kind == "bert" else {"input_ids": ids}
    with dt.route(t.model, rows):
        got = observe(t, inputs)
    assert_close(got, each_alone(t, rows, inputs))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_prompt_insert_at_1(kind: str) -> None:
    """insert_at=1: [x_0; P; x_1..]; rows without virtual tokens and shorter ones still equal themselves alone."""
    deltas = {n: dt.PromptTuning(n_tokens=k, insert_at=1) for n, k in (("a", 1), ("b", 4))}
    t = library(kind, deltas)
    rows = ["b", None, "a", "b"]
    ids = ids_for(len(rows))
    inputs = bert_inputs(ids) if kind == "bert" else {"input_ids": ids}
    with dt.route(t.model, rows):
        got = observe(t, inputs)
    assert_close(got, each_alone(t, rows, inputs))


def test_padding_mask_and_position_ids_given_by_the_caller() -> None:
    """A caller's left-padded batch with its own mask and position ids: each row equals the unpadded row alone."""
    t = library("llama", PROMPTS | PREFIXES)
    rows = ["p5", "x3", None, "p1"]
    ids = ids_for(len(rows))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :1] = mask[3, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with dt.route(t.model, rows), torch.no_grad():
        got = t.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for b, name in enumerate(rows):
        keep = mask[b].bool()
        with dt.active(t.model, name), torch.no_grad():
            alone = t.model(input_ids=ids[b:b + 1, keep]).logits
        assert_close(got[b:b + 1, keep], alone)


# --- generate -------------------------------------------------------------------------------------------------
def _generate(model, ids: Tensor, steps: int = 5, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["prefix", "prompt", "prefix+lora", "prompt+prefix", "prompt-equal"])
def test_generate_equals_each_example_alone(kind: str, case: str) -> None:
    deltas, rows = CASES[case]
    t = library(kind, deltas)
    ids = ids_for(len(rows), seq=4)
    with dt.route(t.model, rows):
        out = _generate(t.model, ids)
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            ref = _generate(t.model, ids[b:b + 1])
        assert torch.equal(out.sequences[b], ref.sequences[0])
        for step, (got, want) in enumerate(zip(out.scores, ref.scores)):  # every decode step, through the KV cache
            assert_close(got[b:b + 1], want)


@pytest.mark.parametrize("case", ["prefix", "prompt+prefix"])
def test_generate_sdpa_equals_each_example_alone(case: str) -> None:
    """sdpa decode steps get no mask from transformers (one query, no padding): the routed prefix builds its own."""
    deltas, rows = CASES[case]
    t = library("llama", deltas, attn="sdpa")
    ids = ids_for(len(rows), seq=4)
    with dt.route(t.model, rows):
        out = _generate(t.model, ids)
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            ref = _generate(t.model, ids[b:b + 1])
        assert torch.equal(out.sequences[b], ref.sequences[0])
        for got, want in zip(out.scores, ref.scores):
            assert_close(got[b:b + 1], want)


@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_left_padded_generate_equals_each_example_alone(case: str) -> None:
    """Prompts of different real lengths, left padded: every row decodes as its unpadded self alone."""
    deltas, rows = CASES[case]
    t = library("llama", deltas)
    ids = ids_for(len(rows), seq=5)
    mask = torch.ones_like(ids)
    for b in range(len(rows)):
        mask[b, : b % 3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with dt.route(t.model, rows):
        out = _generate(t.model, ids, attention_mask=mask)
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            ref = _generate(t.model, ids[b:b + 1, b % 3:])
        assert torch.equal(out.sequences[b, 5:], ref.sequences[0, 5 - b % 3:])
        for got, want in zip(out.scores, ref.scores):
            assert_close(got[b:b + 1], want, atol=1e-4)  # padding changes the summation order a little


@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_rows_repeat_for_beams_and_num_return_sequences(case: str) -> None:
    deltas, _ = CASES[case]
    rows = ["x5", None, "x1"] if case == "prefix" else ["p5", None, "p1"]
    t = library("gpt2", deltas)
    ids = ids_for(len(rows), seq=4)
    kw = dict(num_beams=2, num_return_sequences=2)
    with dt.route(t.model, rows):
        out = _generate(t.model, ids, steps=3, **kw)
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            ref = _generate(t.model, ids[b:b + 1], steps=3, **kw)
        assert torch.equal(out.sequences[2 * b:2 * b + 2], ref.sequences)
        assert_close(out.sequences_scores[2 * b:2 * b + 2], ref.sequences_scores)


def test_decode_steps_without_position_ids() -> None:
    """A hand-written decode loop that passes neither mask nor positions: the model would count the cache (which holds
    the longest row's virtual tokens for every row); the hook gives each row its own positions and key mask."""
    t = library("llama", PROMPTS)
    rows = ["p5", None, "p1"]
    ids = ids_for(len(rows), seq=4)
    nxt = ids_for(len(rows), seq=2, seed=9)

    def run(model, ids, nxt):
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            steps = [out.logits]
            for i in range(nxt.shape[1]):
                out = model(input_ids=nxt[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
        return torch.cat(steps, 1)

    with dt.route(t.model, rows):
        got = run(t.model, ids, nxt)
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            assert_close(got[b:b + 1], run(t.model, ids[b:b + 1], nxt[b:b + 1]))


# --- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["prefix", "prompt", "prompt+prefix"])
@pytest.mark.parametrize("at", [0, 2])
def test_loss_and_gradients_equal_each_example_alone(case: str, at: int) -> None:
    """With labels: the routed batch scores the same tokens with the same losses as the rows alone (a row without
    virtual tokens does not score its first token), and every delta gets the gradient of its own rows."""
    deltas, rows = CASES[case]
    deltas = {n: (dt.PromptTuning(n_tokens=c.n_tokens, insert_at=at) if isinstance(c, dt.PromptTuning) else c)
              for n, c in deltas.items()}
    t = library("llama", deltas)
    t.model.train()
    ids = ids_for(len(rows))
    params = [p for p in t.model.parameters() if p.requires_grad]

    def token_loss_sum(model, ids):  # transformers divides the summed token losses by num_items_in_batch
        return model(input_ids=ids, labels=ids, num_items_in_batch=1).loss

    with dt.route(t.model, rows):
        total = token_loss_sum(t.model, ids)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    want = 0.0
    for b, name in enumerate(rows):
        with dt.active(t.model, name):
            want = want + token_loss_sum(t.model, ids[b:b + 1])
    want_grads = torch.autograd.grad(want, params, allow_unused=True)
    assert_close(total, want, atol=1e-4)
    for p, g, w in zip(params, grads, want_grads):
        assert_close(torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if w is None else w)
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) >= 2


# --- composition at the attention position ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("case", ["prefix", "prompt"])
@pytest.mark.parametrize("block", ["Stack", "Sum"])
def test_route_then_a_shared_delta(kind: str, case: str, block: str) -> None:
    """Stack(Route(rows), "shared") and Sum(...): each row's own prefix / virtual tokens, then the shared one's."""
    deltas, rows = CASES[case]
    shared = dt.PrefixTuning(n_tokens=2) if case == "prefix" else dt.PromptTuning(n_tokens=2)
    t = library(kind, {**deltas, "shared": shared})
    ids = ids_for(len(rows))
    cls = getattr(dt, block)
    with dt.active(t.model, cls(dt.Route(rows), "shared")):
        got = observe(t, {"input_ids": ids})
    want = each_alone(t, rows, {"input_ids": ids}, block=lambda n: "shared" if n is None else cls(n, "shared"))
    assert_close(got, want)
    if case == "prompt":  # the order matters for virtual tokens (they have positions): shared first is different
        with dt.active(t.model, cls("shared", dt.Route(rows))):
            other = observe(t, {"input_ids": ids})
        assert (other - got).abs().max() > 10 * ATOL


@pytest.mark.parametrize("block", [lambda a, b: dt.Average(a, b), lambda a, b: dt.Arrow(a, b),
                                   lambda a, b: dt.Fuse(a, b, fusion="fusion")], ids=["Average", "Arrow", "Fuse"])
@pytest.mark.parametrize("case", ["prefix", "prompt"])
def test_scaling_blocks_are_refused_at_activation(block, case: str) -> None:
    """Average, Fuse and Arrow have no meaning for extra keys or tokens: ConfigError, the composition unchanged. (A
    Fusion delta cannot be attached over attention deltas at all; the one here fuses two LoRAs, so that Fuse over
    prompts reaches the position check.)"""
    deltas, rows = CASES[case]
    t = library("llama", {**deltas, "l1": None, "l2": None})
    dt.attach(t.model, dt.Fusion(deltas=("l1", "l2")), name="fusion", activate=False)
    a, b = [r for r in dict.fromkeys(rows) if r is not None][:2]
    dt.activate(t.model, dt.Route(rows))
    with pytest.raises(ConfigError, match="attention-position"):
        dt.activate(t.model, block(a, b))
    assert dt.active_block(t.model) == dt.Route(rows)


# --- errors ---------------------------------------------------------------------------------------------------
def test_prompts_with_different_insert_at_in_one_batch_are_refused() -> None:
    t = library("llama", {"a": dt.PromptTuning(n_tokens=2), "b": dt.PromptTuning(n_tokens=3, insert_at=1)})
    ids = ids_for(2)
    with dt.route(t.model, ["a", "b"]), pytest.raises(ConfigError, match="insert_at"):
        observe(t, {"input_ids": ids})
    with dt.active(t.model, "a"):  # the failed call left nothing behind
        assert_close(observe(t, {"input_ids": ids}), each_alone(t, ["a", "a"], {"input_ids": ids}))


def test_batch_that_does_not_fit_the_rows_is_refused() -> None:
    t = library("llama", PREFIXES)
    with dt.route(t.model, ["x1", "x3", "x5"]), pytest.raises(ConfigError, match="3 rows"):
        observe(t, {"input_ids": ids_for(2)})


def test_flash_attention_with_prefixes_of_different_lengths_is_refused() -> None:
    """Flash attention takes no per-row key mask: refused before the attention runs (equal lengths need none)."""
    t = library("llama", PREFIXES)
    t.model.config._attn_implementation = "flash_attention_2"  # not installable here; the hook refuses first
    with dt.route(t.model, ["x1", "x3"]), pytest.raises(UnsupportedError, match="flash"):
        observe(t, {"input_ids": ids_for(2)})


def test_per_call_deltas_keyword() -> None:
    """model(ids, deltas=[...]) routes one call (batch.py), prompts included."""
    t = library("gpt2", {**PROMPTS, **PREFIXES})
    rows = ["p5", "x3", None]
    ids = ids_for(len(rows))
    with torch.no_grad():
        got = t.model(input_ids=ids, deltas=rows).logits
    assert_close(got, each_alone(t, rows, {"input_ids": ids}))
    assert dt.active_block(t.model) is None


def test_a_reused_route_follows_reattached_and_changed_deltas() -> None:
    """The per-row assignment is kept between calls (decode steps); it must not outlive the pieces it names."""
    t = library("llama", {**PREFIXES, **PROMPTS})
    rows = ["x3", "p2", "x1", None]
    route = dt.Route(rows)
    ids = ids_for(len(rows))
    dt.activate(t.model, route)
    before = observe(t, {"input_ids": ids})
    dt.detach(t.model, "x3")
    dt.attach(t.model, dt.LoRA(r=2, init="gaussian"), name="x3", activate=False)  # now a weight delta by that name
    with torch.no_grad():
        next(p for n, p in t.model.named_parameters() if ".deltatune.p2." in n).mul_(-1.0)  # changed in place
    dt.activate(t.model, route)
    got = observe(t, {"input_ids": ids})
    assert (got[:2] - before[:2]).abs().amax(dim=(1, 2)).min() > 1e-3
    dt.activate(t.model, None)
    assert_close(got, each_alone(t, rows, {"input_ids": ids}))


def test_prompts_of_different_lengths_need_a_position_ids_argument() -> None:
    """A model whose forward takes no position_ids cannot be given each row's positions: refused, not wrong; prompts of
    one length need none and still route."""

    class NoPositions(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self) -> torch.nn.Module:
            return self.inner.get_input_embeddings()

        def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
            return self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    model = NoPositions(build_tiny("llama").model)
    for name, n in (("a", 2), ("b", 2), ("c", 3)):
        torch.manual_seed(len(name) + n)
        dt.attach(model, dt.PromptTuning(n_tokens=n), name=name, activate=False)
    ids = ids_for(2)
    with dt.route(model, ["c", "a"]), pytest.raises(UnsupportedError, match="position_ids|position ids"), torch.no_grad():
        model(input_ids=ids)
    with torch.no_grad():
        with dt.route(model, ["b", "a"]):
            got = model(input_ids=ids).logits
        want = []
        for b, name in enumerate(["b", "a"]):
            with dt.active(model, name):
                want.append(model(input_ids=ids[b:b + 1]).logits)
    assert_close(got, torch.cat(want))
