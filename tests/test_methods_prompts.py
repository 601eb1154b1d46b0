"""Prompt tuning and prefix tuning (the attention position), every assertion numeric (fp32, tiny random models).

Oracles that do not use deltatune's mechanism:
* prompt tuning: the untouched base run on inputs_embeds = [P; embed(ids)] with the mask extended by ones, the
  virtual positions removed from the output by hand;
* prefix tuning: the untouched base run with a transformers DynamicCache pre-filled with each layer's prefix keys
  and values, the mask extended by ones and position_ids = 0..L-1 given (real tokens keep their positions);
* greedy generate (KV cache) against a token-by-token loop that recomputes the full forward without a cache;
* peft 0.21.2's PromptTuning / PrefixTuning with the same tensors.
tiny_llama has grouped-query attention (2 heads, 1 key/value head), so its prefixes have one head.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import deltatune as dt
from deltatune.core.errors import ConfigError, StateError, TargetError, UnsupportedError

from conftest import Tiny, build_tiny, module_pieces

N = 3  # virtual tokens
KINDS = ["llama", "gpt2", "bert"]
LM_KINDS = ["llama", "gpt2"]
METHODS = {"prompt": lambda **kw: dt.PromptTuning(n_tokens=N, **kw), "prefix": lambda **kw: dt.PrefixTuning(n_tokens=N, **kw)}
ATOL = 1e-5


# --- helpers that do not use the code under test -------------------------------------------------------------
def tiny(kind: str) -> Tiny:
    """A tiny model whose biases and BERT classifier are non-trivial (HF initialises biases to 0, the classifier to
    std 0.02, which would make logit differences too small to test)."""
    t = build_tiny(kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in t.model.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if name.startswith("classifier"):
                p.mul_(50.0)
    return Tiny(kind, t.model, t.inputs)


def attach(t: Tiny, method: str, name: str = "p", seed: int = 0, **kw) -> None:
    torch.manual_seed(seed)
    dt.attach(t.model, METHODS[method](**kw), name)


def prompt_of(model: nn.Module, name: str) -> Tensor:
    (_, piece), = module_pieces(model, name).values()
    return piece.prompt.detach().clone()


def prefixes_of(model: nn.Module, name: str) -> list[tuple[Tensor, Tensor]]:
    """(K, V) [kv_heads, n, head_dim] per layer, in layer order."""
    return [(p.prefix_keys.detach().clone(), p.prefix_values.detach().clone())
            for _, (_, p) in sorted(module_pieces(model, name).items(), key=lambda kv: _layer(kv[0]))]


def _layer(path: str) -> int:
    return next(int(s) for s in path.split(".") if s.isdigit())


def observe(t: Tiny, model: nn.Module | None = None, **inputs) -> Tensor:
    """Logits (and for BERT also the last hidden states) on the tiny inputs, or on `inputs`."""
    model = t.model if model is None else model
    with torch.no_grad():
        out = model(**(inputs or t.inputs), output_hidden_states=True)
    if t.kind == "bert":
        return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])
    return out.logits


def prompt_oracle(t: Tiny, ref: nn.Module, prompt: Tensor, at: int = 0, mask: Tensor | None = None) -> Tensor:
    """The base on [x_<at; P; x_>=at] embeddings, virtual positions cut out of logits and hidden states."""
    ids = t.inputs["input_ids"]
    batch, n = ids.shape[0], prompt.shape[0]
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        e = ref.get_input_embeddings()(ids)
        embeds = torch.cat([e[:, :at], prompt[None].expand(batch, -1, -1), e[:, at:]], 1)
        full_mask = torch.cat([mask[:, :at], torch.ones(batch, n, dtype=mask.dtype), mask[:, at:]], 1)
        out = ref(inputs_embeds=embeds, attention_mask=full_mask, output_hidden_states=True)
    cut = lambda x: torch.cat([x[:, :at], x[:, at + n:]], 1)  # noqa: E731
    if t.kind == "bert":
        return torch.cat([out.logits.flatten(), cut(out.hidden_states[-1]).flatten()])
    return cut(out.logits)


def prefix_oracle(t: Tiny, ref: nn.Module, kvs: list[tuple[Tensor, Tensor]], mask: Tensor | None = None) -> Tensor:
    """The base with a DynamicCache holding the prefixes, the mask extended by ones, positions 0..L-1."""
    from transformers import DynamicCache

    ids = t.inputs["input_ids"]
    batch, length = ids.shape
    n = kvs[0][0].shape[1]
    cache = DynamicCache(config=ref.config)
    for i, (k, v) in enumerate(kvs):
        cache.update(k[None].expand(batch, -1, -1, -1).clone(), v[None].expand(batch, -1, -1, -1).clone(), i)
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=torch.cat([torch.ones(batch, n, dtype=mask.dtype), mask], 1),
                  position_ids=torch.arange(length)[None].expand(batch, -1), past_key_values=cache,
                  output_hidden_states=True)
    if t.kind == "bert":
        return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])
    return out.logits


def oracle(t: Tiny, method: str, model: nn.Module, names: list[str], ref: nn.Module | None = None,
           mask: Tensor | None = None, at: int = 0) -> Tensor:
    """The formula for deltas `names` of `method` (concatenated in that order) on `ref` (default: a fresh base)."""
    ref = t.fresh() if ref is None else ref
    if method == "prompt":
        return prompt_oracle(t, ref, torch.cat([prompt_of(model, n) for n in names]), at, mask)
    per_delta = [prefixes_of(model, n) for n in names]
    kvs = [(torch.cat([d[i][0] for d in per_delta], 1), torch.cat([d[i][1] for d in per_delta], 1))
           for i in range(len(per_delta[0]))]
    return prefix_oracle(t, ref, kvs, mask)


def padded(t: Tiny) -> Tensor:
    """A padding mask: left padding for causal LMs (as in generation), right padding for BERT."""
    mask = torch.ones_like(t.inputs["input_ids"])
    if t.kind == "bert":
        mask[0, -2:] = 0
    else:
        mask[0, :2] = 0
    return mask


def greedy_by_recompute(model: nn.Module, ids: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Greedy decoding that reruns the whole sequence every step, without a cache: (sequences, logits per step)."""
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=seq, use_cache=False).logits[:, -1]
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq, torch.stack(logits, 1)


def generate(model: nn.Module, ids: Tensor, steps: int, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None,
                              output_logits=True, return_dict_in_generate=True, **kw)


def hooks(model: nn.Module) -> dict[str, tuple]:
    """Every module's hooks and deltatune state (transformers adds output-capturing hooks on first use). batch.py's
    per-call stack `_deltatune_call` may stay behind empty after unload (reported to its owner); anything in it fails."""
    assert not model.__dict__.get("_deltatune_call")
    return {path: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
                   sorted(k for k in m.__dict__ if "deltatune" in k and k != "_deltatune_call"))
            for path, m in model.named_modules()}


def close(a: Tensor, b: Tensor, atol: float = ATOL) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


# --- the formula, per model ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_forward_equals_formula(kind: str, method: str) -> None:
    t = tiny(kind)
    base = observe(t)
    attach(t, method)
    ours = observe(t)
    assert close(ours, oracle(t, method, t.model, ["p"]))
    assert not close(ours, base, atol=1e-3), "the delta must change the output for this test to mean anything"
    if kind != "bert":
        with torch.no_grad():
            assert close(t.model(t.inputs["input_ids"]).logits, ours)  # input_ids given positionally
    mask = padded(t)  # padding: the mask is extended, padded keys stay masked
    inputs = {**t.inputs, "attention_mask": mask}
    assert close(observe(t, **inputs), oracle(t, method, t.model, ["p"], mask=mask))


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_prompt_insert_at(kind: str) -> None:
    """insert_at=1 keeps the first token (BERT's [CLS], read by the pooler) in front of the virtual tokens."""
    t = tiny(kind)
    attach(t, "prompt", insert_at=1)
    assert close(observe(t), oracle(t, "prompt", t.model, ["p"], at=1))
    assert not close(observe(t), oracle(t, "prompt", t.model, ["p"], at=0), atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_sdpa_equals_eager(kind: str) -> None:
    """With sdpa, transformers passes no mask when it can use is_causal; the prefix then needs its own mask."""
    t = tiny(kind)
    attach(t, "prefix")
    want = oracle(t, "prefix", t.model, ["p"])  # eager base
    t.model.set_attn_implementation("sdpa")
    assert t.model.config._attn_implementation == "sdpa"
    assert close(observe(t), want)


def test_prefix_has_the_key_value_head_count() -> None:
    """Grouped-query attention: tiny_llama has 2 query heads and 1 key/value head of size 8."""
    t = tiny("llama")
    attach(t, "prefix")
    shapes = {p.prefix_keys.shape for _, (_, p) in module_pieces(t.model, "p").items()}
    assert shapes == {(1, N, 8)}


# --- generate with the KV cache ------------------------------------------------------------------------------
GEN_CASES = [("prompt", {}), ("prefix", {}), ("prompt", {"insert_at": 2})]


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method,kw", GEN_CASES, ids=["prompt", "prefix", "prompt-insert2"])
def test_generate_equals_full_recompute(kind: str, method: str, kw: dict) -> None:
    t = tiny(kind)
    ids = t.inputs["input_ids"]
    plain = generate(t.model, ids, 6)
    attach(t, method, **kw)
    gen = generate(t.model, ids, 6)
    seq, logits = greedy_by_recompute(t.model, ids, 6)
    assert torch.equal(gen.sequences, seq)
    assert close(torch.stack(gen.logits, 1), logits)
    assert not close(torch.stack(gen.logits, 1), torch.stack(plain.logits, 1), atol=1e-3)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_left_padded_generate_row_equals_the_row_alone(method: str) -> None:
    """Batched generation with left padding: a padded row decodes exactly as it does alone."""
    t = tiny("llama")
    attach(t, method)
    ids = t.inputs["input_ids"].clone()
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0
    batch = generate(t.model, ids, 5, attention_mask=mask)
    alone = generate(t.model, ids[:1, 2:], 5)
    assert torch.equal(batch.sequences[0, 6:], alone.sequences[0, 4:])
    assert close(torch.stack(batch.logits, 1)[0], torch.stack(alone.logits, 1)[0], atol=1e-4)


# --- detach, unload, deactivate -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("how", ["detach", "unload"])
def test_detach_and_unload_restore_the_model(kind: str, method: str, how: str) -> None:
    t = tiny(kind)
    ids = t.inputs["input_ids"]
    base_logits, base_gen = observe(t), generate(t.model, ids, 4)
    keys, before = set(t.model.state_dict()), hooks(t.model)
    attach(t, method)
    assert not close(observe(t), base_logits, atol=1e-3)
    dt.detach(t.model, "p") if how == "detach" else dt.unload(t.model)
    assert torch.equal(observe(t), base_logits)
    gen = generate(t.model, ids, 4)
    assert torch.equal(gen.sequences, base_gen.sequences)
    assert torch.equal(torch.stack(gen.logits), torch.stack(base_gen.logits))
    assert hooks(t.model) == before and set(t.model.state_dict()) == keys
    assert all(p.requires_grad for p in t.model.parameters())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deactivating_turns_it_off(method: str) -> None:
    t = tiny("gpt2")
    base = observe(t)
    attach(t, method)
    on = observe(t)
    dt.activate(t.model, None)
    assert torch.equal(observe(t), base)
    with dt.active(t.model, "p"):
        assert torch.equal(observe(t), on)
    assert torch.equal(observe(t), base)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_deep_copy_is_independent(method: str) -> None:
    """copy.deepcopy of a model with the delta: the copy carries its own hooks and state."""
    import copy

    t = tiny("llama")
    base = observe(t)
    attach(t, method)
    on = observe(t)
    twin = copy.deepcopy(t.model)
    dt.activate(t.model, None)
    assert torch.equal(observe(t, twin), on) and torch.equal(observe(t), base)
    dt.unload(twin)
    assert torch.equal(observe(t, twin), base)
    dt.activate(t.model, "p")
    assert torch.equal(observe(t), on)


# --- save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_equal_outputs(kind: str, method: str, tmp_path: Path) -> None:
    t = tiny(kind)
    attach(t, method)
    want = observe(t)
    dt.save(t.model, tmp_path / "d", name="p")
    fresh = t.fresh()
    dt.load(fresh, tmp_path / "d")
    assert torch.equal(observe(t, fresh), want)
    saved = dt.Delta.read(tmp_path / "d")
    assert saved.num_params == dt.summary(t.model)["p"].params
    if kind != "bert":
        ids = t.inputs["input_ids"]
        a, b = generate(t.model, ids, 4), generate(fresh, ids, 4)
        assert torch.equal(a.sequences, b.sequences) and torch.equal(torch.stack(a.logits), torch.stack(b.logits))


# --- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradients_only_on_the_prompt(kind: str, method: str) -> None:
    t = tiny(kind)
    attach(t, method)
    t.model.train()
    ids = t.inputs["input_ids"]
    labels = ids if kind != "bert" else torch.tensor([0, 2])
    loss = t.model(**t.inputs, labels=labels).loss
    loss.backward()
    delta = {n for n, _ in t.model.named_parameters() if ".deltatune." in n}
    assert delta
    for n, p in t.model.named_parameters():
        if n in delta:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_prompt_labels_are_extended() -> None:
    """The loss with labels equals the causal-LM loss on [P; x] with the virtual positions labelled -100."""
    t = tiny("llama")
    attach(t, "prompt")
    ids = t.inputs["input_ids"]
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        ours = t.model(input_ids=ids, labels=labels).loss
        ref = t.fresh()
        embeds = torch.cat([prompt_of(t.model, "p")[None].expand(ids.shape[0], -1, -1), ref.get_input_embeddings()(ids)], 1)
        logits = ref(inputs_embeds=embeds).logits
    full = torch.cat([torch.full((ids.shape[0], N), -100), labels], 1)
    want = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), full[:, 1:].reshape(-1))
    assert torch.allclose(ours, want, atol=1e-6, rtol=0)


# --- composition ----------------------------------------------------------------------------------------------
def _lora_reference(t: Tiny, name: str) -> nn.Module:
    """A fresh base whose weights hold W + (alpha/r)·B·A of delta `name`, from the formula ([out, in] view)."""
    from transformers.pytorch_utils import Conv1D

    ref = t.fresh()
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for path, (_, piece) in module_pieces(t.model, name).items():
            dw = (16.0 / 4) * piece.lora_B.detach() @ piece.lora_A.detach()
            target = modules[path]
            target.weight.add_(dw.t() if isinstance(target, Conv1D) else dw)
    return ref


LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "bert": ("query", "value")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_with_an_active_lora(kind: str, method: str) -> None:
    """Both active: the LoRA update is in the weights the prompt/prefix model runs on."""
    t = tiny(kind)
    dt.attach(t.model, dt.LoRA(r=4, alpha=16, targets=LORA_TARGETS[kind]), "l")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, (_, piece) in module_pieces(t.model, "l").items():
            piece.lora_B.normal_(0, 0.3, generator=g)
    attach(t, method)
    dt.activate(t.model, ["l", "p"])
    want = oracle(t, method, t.model, ["p"], ref=_lora_reference(t, "l"))
    assert close(observe(t), want)
    assert not close(want, oracle(t, method, t.model, ["p"]), atol=1e-3), "LoRA must matter for this test"


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_several_active_deltas_concatenate(kind: str, method: str) -> None:
    """Sum = Stack = [P1; P2] in the composition's order (for prefixes the order cannot matter: attention does not
    see the order of key/value pairs that carry no position)."""
    t = tiny(kind)
    attach(t, method, "a", seed=1)
    attach(t, method, "b", seed=2)
    alone = observe(t)
    dt.activate(t.model, ["a", "b"])
    ab = observe(t)
    assert close(ab, oracle(t, method, t.model, ["a", "b"]))
    assert not close(ab, alone, atol=1e-3)
    dt.activate(t.model, dt.Stack("b", "a"))
    assert close(observe(t), oracle(t, method, t.model, ["b", "a"]))
    assert close(observe(t), ab) == (method == "prefix")


def test_prompt_and_prefix_together() -> None:
    t = tiny("llama")
    attach(t, "prompt", "q")
    attach(t, "prefix", "k")
    dt.activate(t.model, ["q", "k"])
    ids = t.inputs["input_ids"]
    batch = ids.shape[0]
    from transformers import DynamicCache

    ref = t.fresh()
    cache = DynamicCache(config=ref.config)
    for i, (k, v) in enumerate(prefixes_of(t.model, "k")):
        cache.update(k[None].expand(batch, -1, -1, -1).clone(), v[None].expand(batch, -1, -1, -1).clone(), i)
    with torch.no_grad():
        embeds = torch.cat([prompt_of(t.model, "q")[None].expand(batch, -1, -1), ref.get_input_embeddings()(ids)], 1)
        want = ref(inputs_embeds=embeds, attention_mask=torch.ones(batch, 2 * N + ids.shape[1], dtype=torch.long),
                   position_ids=torch.arange(N + ids.shape[1])[None], past_key_values=cache).logits[:, N:]
    assert close(observe(t), want)
    seq, logits = greedy_by_recompute(t.model, ids, 4)
    gen = generate(t.model, ids, 4)
    assert torch.equal(gen.sequences, seq) and close(torch.stack(gen.logits, 1), logits)


# --- parameter counts (the papers' formulas) ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_param_count(kind: str) -> None:
    """Lester et al. 2021: a prompt of n tokens trains n·d_model parameters."""
    t = tiny(kind)
    attach(t, "prompt")
    d_model = t.model.config.hidden_size
    assert dt.summary(t.model)["p"].trainable == N * d_model


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_param_count(kind: str) -> None:
    """Li & Liang 2021, without reparameterisation: per layer n keys and n values of size d_kv = kv_heads·head_dim,
    2·n·d_kv per layer."""
    t = tiny(kind)
    attach(t, "prefix")
    c = t.model.config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d_kv = kv_heads * (c.hidden_size // c.num_attention_heads)
    assert dt.summary(t.model)["p"].trainable == c.num_hidden_layers * 2 * N * d_kv
    if kind == "llama":
        assert d_kv == 8 < c.hidden_size  # GQA: the formula uses the key/value width, not d_model


def test_reparameterised_prefix(tmp_path: Path) -> None:
    """projection=h: [K; V] = tanh(E W1ᵀ + b1) W2ᵀ + b2 per layer; n·d + (d·h + h) + (h·2d_kv + 2d_kv) trainable per
    layer; files hold the plain prefixes, which load into an equal model."""
    t = tiny("llama")
    h = 5
    attach(t, "prefix", projection=h)
    c = t.model.config
    d, d_kv = c.hidden_size, 8
    assert dt.summary(t.model)["p"].trainable == c.num_hidden_layers * (N * d + d * h + h + h * 2 * d_kv + 2 * d_kv)
    kvs = []
    for _, (_, p) in sorted(module_pieces(t.model, "p").items(), key=lambda kv: _layer(kv[0])):
        kv = torch.tanh(p.embedding @ p.w1.t() + p.b1) @ p.w2.t() + p.b2  # [n, 2·d_kv]: keys then values
        kvs.append((kv[:, :d_kv].detach().reshape(N, 1, 8).transpose(0, 1), kv[:, d_kv:].detach().reshape(N, 1, 8).transpose(0, 1)))
    assert close(observe(t), prefix_oracle(t, t.fresh(), kvs))
    path = tmp_path / "d"
    dt.save(t.model, path, name="p")
    saved = dt.Delta.read(path)
    assert {k for st in saved.state.values() for k in st} == {"prefix_keys", "prefix_values"}
    assert saved.num_params == c.num_hidden_layers * 2 * N * d_kv
    fresh = t.fresh()
    dt.load(fresh, path)
    assert close(observe(t, fresh), observe(t))


def test_loaded_reparameterised_prefix_refuses_a_stale_optimizer(tmp_path: Path) -> None:
    """Loading plain prefixes into a training MLP piece (a resumed run) must not silently train nothing."""
    t = tiny("llama")
    attach(t, "prefix", projection=5)
    opt = torch.optim.AdamW([p for p in t.model.parameters() if p.requires_grad])
    path = tmp_path / "d"
    dt.save(t.model, path, name="p")
    saved = dt.Delta.read(path)
    for p, (_, piece) in module_pieces(t.model, "p").items():
        piece.load_state_dict(saved.state[p])
    from deltatune.runtime.step_hooks import after_optimizer_step

    with pytest.raises(StateError, match="projection"):
        after_optimizer_step(t.model, opt, 1)


# --- peft as the oracle ---------------------------------------------------------------------------------------
peft_task = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def _peft(t: Tiny, config: object) -> nn.Module:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(t.fresh(), config).eval()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_prompt_tuning_oracle(kind: str) -> None:
    """peft's PromptTuning with our prompt: the same outputs at the real tokens (peft keeps the virtual positions)."""
    pytest.importorskip("peft")
    from peft import PromptTuningConfig

    t = tiny(kind)
    attach(t, "prompt")
    pm = _peft(t, PromptTuningConfig(task_type=peft_task[kind], num_virtual_tokens=N))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(prompt_of(t.model, "p"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pm(**t.inputs, output_hidden_states=True)
    theirs = (torch.cat([out.logits.flatten(), out.hidden_states[-1][:, N:].flatten()]) if kind == "bert"
              else out.logits[:, N:])
    assert close(observe(t), theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_prefix_tuning_oracle(kind: str) -> None:
    """peft's PrefixTuning with our keys/values. peft moves the real tokens to positions n.. (its prefix sits in the
    cache); deltatune keeps them at 0.. — passing peft position_ids = arange(L) - n undoes its shift."""
    pytest.importorskip("peft")
    from peft import PrefixTuningConfig

    t = tiny(kind)
    attach(t, "prefix")
    pm = _peft(t, PrefixTuningConfig(task_type=peft_task[kind], num_virtual_tokens=N))
    kvs = prefixes_of(t.model, "p")
    heads, _, head_dim = kvs[0][0].shape
    with torch.no_grad():
        w = pm.prompt_encoder["default"].embedding.weight.view(N, 2 * len(kvs), heads, head_dim)
        for i, (k, v) in enumerate(kvs):  # peft's layout: [n, layer·2 + (0 key | 1 value), head, head_dim]
            w[:, 2 * i] = k.transpose(0, 1)
            w[:, 2 * i + 1] = v.transpose(0, 1)
        length = t.inputs["input_ids"].shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pm(**t.inputs, position_ids=torch.arange(length)[None] - N, output_hidden_states=True)
    theirs = torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()]) if kind == "bert" else out.logits
    assert close(observe(t), theirs)


# --- bad input ------------------------------------------------------------------------------------------------
def _untouched(t: Tiny, before: dict[str, Tensor]) -> None:
    assert not any("deltatune" in n for n, _ in t.model.named_modules())
    assert hooks(t.model) == hooks(t.fresh())
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert all(p.requires_grad for p in t.model.parameters())


@pytest.mark.parametrize("cfg,match", [
    (dt.PrefixTuning(targets=("q_proj",)), "self-attention"),
    (dt.PromptTuning(targets=("lm_head",)), "Embedding"),
], ids=["prefix-on-linear", "prompt-on-linear"])
def test_wrong_targets_leave_the_model_untouched(cfg: dt.DeltaConfig, match: str) -> None:
    t = tiny("llama")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(TargetError, match=match):
        dt.attach(t.model, cfg, "p")
    _untouched(t, before)


def test_prompt_on_another_embedding_is_refused_and_rolled_back() -> None:
    """GPT-2's position table is an Embedding, but not the input embedding: refused at install, rolled back."""
    t = tiny("gpt2")
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(TargetError, match="input embedding"):
        dt.attach(t.model, dt.PromptTuning(n_tokens=2, targets=("wpe",)), "p")
    _untouched(t, before)


@pytest.mark.parametrize("kw", [dict(n_tokens=0), dict(n_tokens=2.5), dict(init="zeros"), dict(insert_at=-1)])
def test_prompt_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError, match="PromptTuning"):
        dt.PromptTuning(**kw)


@pytest.mark.parametrize("kw", [dict(n_tokens=0), dict(projection=-1), dict(projection=True)])
def test_prefix_config_errors(kw: dict) -> None:
    with pytest.raises(ConfigError, match="PrefixTuning"):
        dt.PrefixTuning(**kw)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_not_mergeable(method: str) -> None:
    t = tiny("llama")
    attach(t, method)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    with pytest.raises(UnsupportedError, match="not a weight update"):
        dt.merge(t.model)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_route_rows_equal_the_formula(kind: str, method: str) -> None:
    """Route: each row equals the formula for its own delta, also when the rows' deltas differ in length
    (tests/test_route_prompts.py compares with each example run alone, in depth); Average stays refused."""
    t = tiny(kind)
    attach(t, method, "a", seed=1)
    torch.manual_seed(2)
    dt.attach(t.model, (dt.PromptTuning if method == "prompt" else dt.PrefixTuning)(n_tokens=N + 2), "b")
    for rows in (["a", "b"], ["b", "a"]):
        dt.activate(t.model, dt.Route(rows))
        want = torch.cat([oracle(t, method, t.model, [name])[i:i + 1] for i, name in enumerate(rows)])
        assert close(observe(t), want)
    assert not close(oracle(t, method, t.model, ["a"]), oracle(t, method, t.model, ["b"]), atol=1e-3)
    with pytest.raises(ConfigError, match="attention-position"):
        dt.activate(t.model, dt.Average("a", "b"))


def test_prompt_refuses_a_4d_mask() -> None:
    t = tiny("llama")
    attach(t, "prompt")
    ids = t.inputs["input_ids"]
    with pytest.raises(UnsupportedError, match="2-D attention_mask"):
        t.model(input_ids=ids, attention_mask=torch.zeros(ids.shape[0], 1, ids.shape[1], ids.shape[1]))
    assert close(observe(t), oracle(t, "prompt", t.model, ["p"]))  # the failed call left nothing behind


def test_dtype_fp16_model_keeps_its_dtype() -> None:
    """Half-precision models: pieces train in float32, the inserted tensors take the model's dtype."""
    t = tiny("gpt2")
    t.model.half()
    attach(t, "prefix")
    piece = next(iter(module_pieces(t.model, "p").values()))[1]
    assert piece.prefix_keys.dtype == torch.float32
    with torch.no_grad():
        out = t.model(**t.inputs).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --- dt.train: BERT classification (the [CLS] pooling position) ----------------------------------------------
@pytest.mark.parametrize("delta", [{"kind": "prompt", "n_tokens": 4}, {"kind": "prompt", "n_tokens": 4, "insert_at": 1},
                                   {"kind": "prefix", "n_tokens": 4}], ids=["prompt", "prompt-after-cls", "prefix"])
def test_dt_train_classification(delta: dict, tmp_path: Path) -> None:
    """dt.train with a prompt/prefix delta and a trained head; the saved delta reproduces the test accuracy on a
    fresh base with another head."""
    from deltatune.train import train
    from deltatune.train.data import local_splits
    from deltatune.train.evaluate import evaluate_classification

    from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

    for split, (n, seed) in {"train": (96, 1), "val": (16, 2), "test": (32, 3)}.items():
        write_jsonl(tmp_path / f"{split}.jsonl", sentiment(n, seed))
    splits = local_splits(str(tmp_path / "train.jsonl"), "classification", validation=str(tmp_path / "val.jsonl"),
                          test=str(tmp_path / "test.jsonl"))
    model = tiny_bert()
    torch.manual_seed(0)
    r = train({"output_dir": str(tmp_path / "run"), "max_steps": 24, "batch_size": 8, "lr": 1e-2, "eval_every": 24,
               "progress": False, "plot": False, "delta": delta}, model=model, tokenizer=word_tokenizer(), splits=splits)
    losses = [rec["loss"] for rec in r.history if "loss" in rec]
    assert losses[-1] < losses[0]
    saved = dt.Delta.read(r.delta_path)
    assert "classifier" in saved.state and len(saved.state) > 1
    fresh = tiny_bert()
    torch.nn.init.normal_(fresh.classifier.weight)
    dt.load(fresh, r.delta_path)
    again = evaluate_classification(fresh, word_tokenizer(), splits.test, 2)
    assert again["accuracy"] == pytest.approx(r.metrics["test_accuracy"])
