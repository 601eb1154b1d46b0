"""The mechanism of prompt and prefix tuning (attention-position pieces): hooks on the model that read the active
composition at call time, so several active deltas concatenate ([P1; P2]) and deactivating them turns them off.

* Prompt tuning: a pre-hook on the top model rewrites `input_ids` into `inputs_embeds` with the virtual tokens
  inserted, and extends `attention_mask`, `labels`, `token_type_ids` and `position_ids` to match; a post-hook
  removes the virtual positions from token-level outputs. The KV cache then holds the virtual tokens: later decode
  steps (cache not empty) only shift positions and extend the mask. Masks, positions and labels given by the caller
  are always in real-token coordinates.
* Prefix tuning: a pre-hook on each adapted attention module hands it a stand-in for its cache whose `update`
  returns [prefix; cached; new] keys and values, and extends the attention mask by the prefix columns. The real
  cache never holds the prefix, so forward, generate and every decode step see it the same way.

One set of hooks per model (prompt) or attention module (prefix), shared by every delta that needs it and removed
when the last one leaves.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..compose import Route, Stack, Sum
from ..errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..host import slot_of, state_of

_HOOKS = "_deltatune_attention_hooks"


@dataclass
class _Hooks:
    handles: list
    model: nn.Module = field(repr=False)  # the model served (a plain reference: a deep copy of the model gets its copy)
    users: int = 1
    calls: list = field(default_factory=list)  # prompt tuning: what each running forward inserted, for the post-hook


def acquire(owner: nn.Module, key: str, model: nn.Module, register: Callable[[], list]) -> None:
    """Register the hooks `register()` makes on `owner` once; count further users."""
    reg = owner.__dict__.setdefault(_HOOKS, {})
    if key in reg:
        reg[key].users += 1
        return
    reg[key] = _Hooks(register(), model)


def release(owner: nn.Module, key: str) -> None:
    """One user less; the last one removes the hooks (and every trace of them on `owner`)."""
    reg = owner.__dict__.get(_HOOKS, {})
    entry = reg.get(key)
    if entry is None:
        return
    entry.users -= 1
    if entry.users <= 0:
        for handle in entry.handles:
            handle.remove()
        del reg[key]
        if not reg:
            del owner.__dict__[_HOOKS]


def _entry(owner: nn.Module, key: str) -> _Hooks | None:
    return owner.__dict__.get(_HOOKS, {}).get(key)


def active_pieces(model: nn.Module | None, module: nn.Module, capability: str) -> list[nn.Module]:
    """The active pieces at `module` that have `capability`, in composition order (Sum and Stack concatenate)."""
    st = state_of(model) if model is not None else None
    slot = slot_of(module)
    if st is None or slot is None or st.block is None:
        return []
    return [slot[n] for n in _order(st.block, slot) if hasattr(slot[n], capability)]


def _order(node: Any, slot: Any) -> list[str]:
    if isinstance(node, str):
        return [node] if node in slot and slot[node].position == "attention" else []
    here = [c for c in node.names() if c in slot and slot[c].position == "attention"]
    if isinstance(node, Route) and here:
        raise UnsupportedError(f"per-example routing (Route) of prompt/prefix deltas {here} is not implemented; "
                               f"activate them for the whole batch (a name, Sum or Stack) or run the rows separately")
    if isinstance(node, (Sum, Stack)):
        return [n for c in node.children for n in _order(c, slot)]
    return []  # other blocks are refused for attention-position deltas at activation


# --- calling conventions ---------------------------------------------------------------------------------------
_SIGNATURES: dict[type, list[inspect.Parameter]] = {}


def forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The parameters of the module's forward, without self."""
    params = _SIGNATURES.get(type(module))
    if params is None:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
        _SIGNATURES[type(module)] = params
    return params


def as_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positional ones named from the module's forward signature)."""
    if not args:
        return dict(kwargs)
    positional = [p for p in forward_parameters(module) if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(positional):
        raise UnsupportedError(f"{type(module).__name__} was called with {len(args)} positional arguments; prompt and "
                               f"prefix tuning need them by name (pass keyword arguments)")
    return {**{p.name: a for p, a in zip(positional, args)}, **kwargs}


def cache_length(cache: Any, layer: int = 0) -> int:
    """Tokens the cache holds for layer `layer` (0 without a cache)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise UnsupportedError(f"past_key_values of type {type(cache).__name__} is not a transformers Cache; prompt "
                               f"and prefix tuning need a Cache object (transformers >= 5)")
    return int(cache.get_seq_length(layer))


def insert(t: Tensor, at: int, block: Tensor) -> Tensor:
    """`t` with `block` inserted at index `at` of dimension 1."""
    return torch.cat([t[:, :at], block, t[:, at:]], dim=1)


# --- prompt tuning ---------------------------------------------------------------------------------------------
def prompt_hooks(model: nn.Module) -> list:
    return [model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True),
            model.register_forward_hook(_prompt_post_hook, with_kwargs=True, always_call=True)]


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    entry = _entry(model, "prompt")
    if entry is None:
        return None
    entry.calls.append(None)  # first: the post-hook pops one entry per call, even when this hook raises
    pieces = active_pieces(model, model.get_input_embeddings(), "prompt_embeddings")
    if not pieces:
        return None
    at = {p.cfg.insert_at for p in pieces}
    if len(at) != 1:
        raise ConfigError(f"active prompt deltas insert their tokens at different positions (insert_at {sorted(at)}); "
                          f"activate prompts with the same insert_at together")
    at = at.pop()
    prompt = torch.cat([p.prompt_embeddings() for p in pieces], dim=0)  # [n, d]
    n = prompt.shape[0]
    kw = as_kwargs(model, args, kwargs)
    filled = cache_length(kw.get("past_key_values")) > 0
    record = None
    if not filled:  # prefill (or no cache): the virtual tokens enter the sequence
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            ids = kw.get("input_ids")
            if ids is None:
                return None  # the model raises its own error for the missing input
            embeds = model.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        if length < at:
            raise ConfigError(f"prompt tokens go at position insert_at={at}, but the input has only {length} tokens")
        kw["input_ids"] = None
        kw["inputs_embeds"] = insert(embeds, at, prompt.to(embeds.dtype).expand(batch, n, -1))
        labels = kw.get("labels")
        if isinstance(labels, Tensor) and labels.shape == (batch, length) and not labels.is_floating_point():
            kw["labels"] = insert(labels, at, labels.new_full((batch, n), -100))
        types = kw.get("token_type_ids")
        if isinstance(types, Tensor) and types.shape[-1] == length:
            kw["token_type_ids"] = insert(types, at, types.new_zeros((*types.shape[:-1], n)))
        pos = kw.get("position_ids")
        if pos is not None:
            start = pos[:, at - 1 : at] + 1 if at > 0 else torch.zeros_like(pos[:, :1])
            kw["position_ids"] = insert(pos + n * (torch.arange(length, device=pos.device) >= at), at,
                                        start + torch.arange(n, device=pos.device))
        record = (at, n, length + n)
    elif kw.get("position_ids") is not None:  # decode step: positions follow the virtual tokens in the cache
        kw["position_ids"] = kw["position_ids"] + n
    mask = kw.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise UnsupportedError(f"prompt tuning extends a 2-D attention_mask [batch, tokens]; got "
                                   f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
        kw["attention_mask"] = insert(mask, at, mask.new_ones((mask.shape[0], n)))
    entry.calls[-1] = record
    return (), kw


def _strip(t: Any, at: int, n: int, total: int) -> Any:
    if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[1] == total:
        return t[:, n:] if at == 0 else torch.cat([t[:, :at], t[:, at + n:]], dim=1)
    return t


def _prompt_post_hook(model: nn.Module, args: tuple, kwargs: dict, output: Any):
    entry = _entry(model, "prompt")
    record = entry.calls.pop() if entry is not None and entry.calls else None
    if record is None:
        return None
    at, n, total = record
    if isinstance(output, tuple):
        return tuple(_strip(t, at, n, total) for t in output)
    for key in ("logits", "last_hidden_state"):
        if getattr(output, key, None) is not None:
            output[key] = _strip(output[key], at, n, total)
    if getattr(output, "hidden_states", None) is not None:
        output["hidden_states"] = tuple(_strip(h, at, n, total) for h in output["hidden_states"])
    return output


# --- prefix tuning ---------------------------------------------------------------------------------------------
def prefix_hooks(module: nn.Module) -> list:
    return [module.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)]


class PrefixedCache:
    """Stands in for an attention module's cache during one call: `update` stores the new keys/values in the real
    cache (if any) and returns them with the prefix in front. Anything else is the real cache's."""

    def __init__(self, inner: Any, keys: Tensor, values: Tensor, path: str) -> None:
        self.inner = getattr(inner, "self_attention_cache", inner)  # encoder-decoder caches: the self-attention part
        self.keys, self.values, self.path = keys, values, path

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        heads, _, dim = self.keys.shape
        if key_states.shape[1] != heads or key_states.shape[-1] != dim:
            raise ShapeMismatchError(f"prefix at {self.path!r} has {heads} key/value heads of size {dim}, but the "
                                     f"attention computes keys of shape {tuple(key_states.shape)} [batch, heads, tokens, "
                                     f"head_dim]; the delta was made for another model")
        batch = key_states.shape[0]
        k = self.keys.to(key_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        v = self.values.to(value_states.dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0 if self.inner is None else self.inner.get_seq_length(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"no cache in this call (prefix stand-in has no {name!r})")
        return getattr(inner, name)


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    entry = _entry(module, "prefix")
    pieces = active_pieces(entry.model if entry is not None else None, module, "prefix_kv")
    if not pieces:
        return None
    kv = [p.prefix_kv() for p in pieces]
    keys = torch.cat([k for k, _ in kv], dim=1)  # [kv_heads, n, head_dim]
    values = torch.cat([v for _, v in kv], dim=1)
    kw = as_kwargs(module, args, kwargs)
    hidden = kw[forward_parameters(module)[0].name]  # hidden_states [batch, tokens, d]
    cache = kw.get("past_key_values")
    past = cache_length(getattr(cache, "self_attention_cache", cache), getattr(module, "layer_idx", None) or 0)
    causal = kw.get("is_causal", getattr(module, "is_causal", False))
    impl = getattr(getattr(module, "config", None), "_attn_implementation", "eager") or "eager"
    kw["attention_mask"] = extend_mask(kw.get("attention_mask"), keys.shape[1], hidden.shape[1], past, bool(causal),
                                       impl, hidden, pieces[0].path)
    kw["past_key_values"] = PrefixedCache(cache, keys, values, pieces[0].path)
    return (), kw


def extend_mask(mask: Any, n: int, q: int, past: int, causal: bool, impl: str, like: Tensor, path: str) -> Any:
    """The attention mask over [n prefix keys; past + q keys]: every query may attend to every prefix key."""
    if mask is None:
        if not causal or q == 1 or impl.startswith("flash"):
            return None  # full attention (flash attention aligns its causal mask to the end: prefix keys stay visible)
        dev = like.device
        rows = torch.arange(q, device=dev).unsqueeze(1) + past
        real = torch.arange(past + q, device=dev).unsqueeze(0) <= rows  # causal, aligned to the end of the keys
        allowed = torch.cat([torch.ones(q, n, dtype=torch.bool, device=dev), real], dim=1)[None, None]
        if impl != "eager":
            return allowed
        return torch.zeros(allowed.shape, dtype=like.dtype, device=dev).masked_fill(~allowed, torch.finfo(like.dtype).min)
    if not isinstance(mask, Tensor):
        raise UnsupportedError(f"prefix at {path!r}: attention masks of type {type(mask).__name__} (attn_implementation "
                               f"{impl!r}) cannot be extended; load the model with attn_implementation='sdpa' or 'eager'")
    shape = (*mask.shape[:-1], n)
    if mask.dtype == torch.bool:
        cols = torch.ones(shape, dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        cols = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    else:  # 0/1 padding masks (flash attention)
        cols = torch.ones(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)
