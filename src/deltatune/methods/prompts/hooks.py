"""The mechanism of prompt and prefix tuning (attention-position pieces): hooks on the model that read the active
composition at call time, so several active deltas concatenate ([P1; P2]), a Route gives each example its own
virtual tokens or prefix, and deactivating them turns them off.

* Prompt tuning: a pre-hook on the top model rewrites `input_ids` into `inputs_embeds` with the virtual tokens
  inserted, and extends `attention_mask`, `labels`, `token_type_ids` and `position_ids` to match; a post-hook
  removes the virtual positions from token-level outputs. The KV cache then holds the virtual tokens: later decode
  steps (cache not empty) only shift positions and extend the mask. Masks, positions and labels given by the caller
  are always in real-token coordinates.
* Prefix tuning: a pre-hook on each adapted attention module hands it a stand-in for its cache whose `update`
  returns [prefix; cached; new] keys and values, and extends the attention mask by the prefix columns. The real
  cache never holds the prefix, so forward, generate and every decode step see it the same way.
* Route (one delta per example): every row gets a block as long as the longest row's virtual tokens or prefix; a
  shorter row's extra columns are masked out of attention, so each row attends to exactly its own (docs/composition.md,
  "Route"; the padding of prompts: docs/methods.md, "Prompt tuning").

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
from torch.nn import functional as F

from ...compose import Route, Stack, Sum
from ...core.errors import ConfigError, ShapeMismatchError, UnsupportedError
from ...runtime import active_block, slot_of
from ...compose.route import _rows as route_rows

_HOOKS = "_deltatune_attention_hooks"


@dataclass
class _Hooks:
    handles: list
    model: nn.Module = field(repr=False)  # the model served (a plain reference: a deep copy of the model gets its copy)
    users: int = 1
    calls: list = field(default_factory=list)  # prompt tuning: what each running forward inserted, for the post-hook
    routed: tuple = ()  # the last routed call's rows (see active_rows), reused while block, batch and pieces are the same


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


# --- which deltas act on which example ------------------------------------------------------------------------
def _here(name: str, slot: Any) -> bool:
    return name in slot and slot[name].position == "attention"


def _entries(node: Any, slot: Any) -> list[str | Route]:
    """The attention-position deltas of `node` at this module in composition order (Sum and Stack concatenate): a
    name acts on every row, a Route on each row through that row's delta. Other blocks are refused at activation."""
    if isinstance(node, str):
        return [node] if _here(node, slot) else []
    if isinstance(node, Route):
        return [node] if any(_here(c, slot) for c in node.children) else []
    if isinstance(node, (Sum, Stack)):
        return [e for c in node.children for e in _entries(c, slot)]
    return []


@dataclass
class Rows:
    """Active pieces at one module per example: the distinct piece sequences `combos` (composition order; () for rows
    that have none) and `which[b]`, the combo of row b — None when every row has combos[0]."""

    combos: list[tuple[nn.Module, ...]]
    which: Tensor | None = None

    def pieces(self) -> list[nn.Module]:
        return list({id(p): p for c in self.combos for p in c}.values())


def active_rows(entry: _Hooks | None, module: nn.Module, capability: str, batch: Callable[[], int | None]) -> Rows | None:
    """The active pieces with `capability` at `module` (of the model `entry` serves), per example; None when no active
    delta has one here (or, under a Route, when `batch()` cannot tell the batch size). Rows whose Route delta has no
    such piece here get none. Under a Route the per-row assignment is kept on `entry` for the next call (decode steps)."""
    block = active_block(entry.model) if entry is not None else None  # this thread's composition
    slot = slot_of(module)
    if block is None or slot is None:
        return None
    entries = _entries(block, slot)
    if not any(isinstance(e, Route) for e in entries):
        pieces = tuple(slot[n] for n in entries if hasattr(slot[n], capability))  # type: ignore[index]
        return Rows([pieces]) if pieces else None
    size = batch()
    if size is None:
        return None
    key = (size, capability, tuple((n, id(p)) for n, p in slot.items()))
    routed = entry.routed  # read once: another thread may replace it meanwhile
    if not (routed and routed[0] is block and routed[1] == key):
        per_route = {id(e): route_rows(e, size) for e in entries if isinstance(e, Route)}
        combos: dict[tuple[str, ...], int] = {}
        which = []
        for b in range(size):
            names = (e if isinstance(e, str) else per_route[id(e)][b] for e in entries)
            combo = tuple(n for n in names if n is not None and _here(n, slot) and hasattr(slot[n], capability))
            which.append(combos.setdefault(combo, len(combos)))
        device = next((q.device for c in combos for n in c[:1] for q in slot[n].parameters()), None)
        routed = (block, key, list(combos), torch.tensor(which, device=device))
        entry.routed = routed  # type: ignore[union-attr]
    _, _, combos, which = routed
    if not any(combos):
        return None
    found = [tuple(slot[n] for n in c) for c in combos]
    return Rows(found) if len(found) == 1 else Rows(found, which)


def _padded(blocks: list[Tensor | None], dim: int, rows: Rows, at_end: bool) -> tuple[Tensor, Tensor | None]:
    """Per-combo blocks (None: empty) padded with zeros along `dim` to the longest and selected per row: ([R, ...],
    lengths [batch] or None when all are equally long). R = 1 without a Route, else the batch size. `at_end`: each
    block sits at the end of its padded one (zeros first), else at the start."""
    if rows.which is None:
        return blocks[0][None], None  # type: ignore[index]
    ref = next(b for b in blocks if b is not None)
    sizes = [0 if b is None else b.shape[dim] for b in blocks]
    longest = max(sizes)
    padded = []
    for b, n in zip(blocks, sizes):
        if b is None:
            shape = list(ref.shape)
            shape[dim] = longest
            padded.append(ref.new_zeros(shape))
            continue
        pad = [0, 0] * (b.dim() - 1 - dim) + ([longest - n, 0] if at_end else [0, longest - n])
        padded.append(F.pad(b, pad))
    which = rows.which.to(ref.device)
    out = torch.stack(padded).index_select(0, which)
    lengths = None if len(set(sizes)) == 1 else torch.tensor(sizes, device=ref.device).index_select(0, which)
    return out, lengths


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


def _batch_size(kw: dict[str, Any]) -> int | None:
    for key in ("inputs_embeds", "input_ids"):
        if isinstance(kw.get(key), Tensor):
            return kw[key].shape[0]
    return None


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    entry = _entry(model, "prompt")
    if entry is None:
        return None
    entry.calls.append(None)  # first: the post-hook pops one entry per call, even when this hook raises
    kw: dict[str, Any] = {}

    def batch() -> int | None:
        kw.update(as_kwargs(model, args, kwargs))
        return _batch_size(kw)

    rows = active_rows(entry, model.get_input_embeddings(), "prompt_embeddings", batch)
    if rows is None:
        return None
    kw = kw or as_kwargs(model, args, kwargs)
    at = {p.cfg.insert_at for p in rows.pieces()}
    if len(at) != 1:
        raise ConfigError(f"active prompt deltas insert their tokens at different positions (insert_at {sorted(at)}); "
                          f"activate (or route in one batch) only prompts with the same insert_at")
    at = at.pop()
    prompt, lengths = _padded([torch.cat([p.prompt_embeddings() for p in c]) if c else None for c in rows.combos],
                              0, rows, at_end=True)  # [R, n, d]: a shorter row's tokens last, padding first
    n = prompt.shape[1]
    if lengths is not None and "position_ids" not in {p.name for p in forward_parameters(model)}:
        raise UnsupportedError(f"routed prompts of different lengths need explicit position ids, which "
                               f"{type(model).__name__}.forward does not take; route prompts of equal length")
    shift: Any = n if lengths is None else lengths[:, None]  # virtual tokens in front of each row's later tokens
    filled = cache_length(kw.get("past_key_values"))
    pos, mask = kw.get("position_ids"), kw.get("attention_mask")
    record = None
    if not filled:  # prefill (or no cache): the virtual tokens enter the sequence
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            ids = kw.get("input_ids")
            if ids is None:
                return None  # the model raises its own error for the missing input
            embeds = model.get_input_embeddings()(ids)
        batch_size, length = embeds.shape[:2]
        if length < at:
            raise ConfigError(f"prompt tokens go at position insert_at={at}, but the input has only {length} tokens")
        valid = None if lengths is None else torch.arange(n, device=embeds.device) >= n - lengths[:, None]
        src = None if lengths is None else _pad_source(at, n, lengths, length)
        kw["input_ids"] = None
        kw["inputs_embeds"] = _fill(insert(embeds, at, prompt.to(embeds.dtype).expand(batch_size, n, -1)), at, valid, src)
        labels = kw.get("labels")
        if isinstance(labels, Tensor) and labels.shape == (batch_size, length) and not labels.is_floating_point():
            labels = insert(labels, at, labels.new_full((batch_size, n), -100))
            if lengths is not None and at == 0 and length:  # a row without virtual tokens does not score its first token
                labels[:, n] = labels[:, n].masked_fill(lengths == 0, -100)
            kw["labels"] = labels
        types = kw.get("token_type_ids")
        if isinstance(types, Tensor) and types.shape[-1] == length:
            types = types if lengths is None else types.expand(batch_size, -1)
            kw["token_type_ids"] = _fill(insert(types, at, types.new_zeros((*types.shape[:-1], n))), at, valid, src)
        if pos is not None or lengths is not None:  # routed lengths differ: each row's positions as it has them alone
            real = torch.arange(length, device=embeds.device)
            if lengths is not None:
                pos = (real[None] if pos is None else pos).expand(batch_size, -1)
            start = pos[:, at - 1 : at] + 1 if at > 0 else torch.zeros_like(pos[:, :1])
            virtual = start + torch.arange(n, device=pos.device) - (n - shift)  # a row's tokens: start, start + 1, ...
            kw["position_ids"] = _fill(insert(pos + shift * (real >= at), at, virtual), at, valid, src)
        if mask is None and lengths is not None:
            mask = torch.ones(batch_size, length, dtype=torch.long, device=embeds.device)
        record = (at, n, length + n)
    elif lengths is not None or pos is not None:  # decode step: positions follow the row's virtual tokens in the cache
        q = _tokens(kw)
        if pos is None:  # the model would count the cache, which holds n virtual columns for every row
            pos = torch.arange(filled - n, filled - n + q, device=lengths.device)[None]  # type: ignore[union-attr]
        kw["position_ids"] = pos + shift
        if mask is None and lengths is not None:
            mask = torch.ones(lengths.shape[0], filled - n + q, dtype=torch.long, device=lengths.device)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            raise UnsupportedError(f"prompt tuning extends a 2-D attention_mask [batch, tokens]; got "
                                   f"{type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}")
        cols = (mask.new_ones((mask.shape[0], n)) if lengths is None
                else (torch.arange(n, device=mask.device) >= n - lengths[:, None]).to(mask.dtype))
        kw["attention_mask"] = insert(mask, at, cols)
    entry.calls[-1] = record
    return (), kw


def _tokens(kw: dict[str, Any]) -> int:
    """Tokens per row in this call."""
    t = kw.get("inputs_embeds")
    return int((t if t is not None else kw["input_ids"]).shape[1])


def _pad_source(at: int, n: int, lengths: Tensor, length: int) -> Tensor:
    """Per row, the column whose content fills the row's padded virtual columns (those stay masked out as keys, but
    run as queries): the token before the block (at > 0), else the row's first virtual token, else its first real
    one. Such a query computes exactly what its source computes: in a causal model the token before the block (so
    the block's last column scores the next token as the row alone does), in a bidirectional one any source (so
    a pooler reading position 0, BERT's, reads what it reads alone)."""
    if at > 0:
        return torch.full_like(lengths, at - 1)
    return torch.where(lengths > 0, n - lengths, torch.full_like(lengths, n)).clamp(max=n + length - 1)


def _fill(t: Tensor, at: int, valid: Tensor | None, src: Tensor | None) -> Tensor:
    """`t` [batch, tokens, ...] with the padded columns of the virtual block (valid False) copied from column src[b]."""
    if valid is None:
        return t
    extra = [1] * (t.dim() - 2)
    source = t.gather(1, src.view(-1, 1, *extra).expand(-1, 1, *t.shape[2:]))  # type: ignore[union-attr]
    n = valid.shape[1]
    block = torch.where(valid.view(*valid.shape, *extra), t[:, at:at + n], source)
    return torch.cat([t[:, :at], block, t[:, at + n:]], dim=1)


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
    cache (if any) and returns them with the prefix in front. Anything else is the real cache's. `keys` and `values`
    are [1 or batch, kv_heads, n, head_dim]: one prefix for every row, or one per row."""

    def __init__(self, inner: Any, keys: Tensor, values: Tensor, path: str) -> None:
        self.inner = getattr(inner, "self_attention_cache", inner)  # encoder-decoder caches: the self-attention part
        self.keys, self.values, self.path = keys, values, path

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        _, heads, _, dim = self.keys.shape
        if key_states.shape[1] != heads or key_states.shape[-1] != dim:
            raise ShapeMismatchError(f"prefix at {self.path!r} has {heads} key/value heads of size {dim}, but the "
                                     f"attention computes keys of shape {tuple(key_states.shape)} [batch, heads, tokens, "
                                     f"head_dim]; the delta was made for another model")
        batch = key_states.shape[0]
        k = self.keys.to(key_states.dtype).expand(batch, -1, -1, -1)
        v = self.values.to(value_states.dtype).expand(batch, -1, -1, -1)
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return 0 if self.inner is None else self.inner.get_seq_length(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(f"no cache in this call (prefix stand-in has no {name!r})")
        return getattr(inner, name)


def _hidden(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get(forward_parameters(module)[0].name)


def _prefix_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    entry = _entry(module, "prefix")
    rows = active_rows(entry, module, "prefix_kv", lambda: getattr(_hidden(module, args, kwargs), "shape", (None,))[0])
    if rows is None:
        return None
    kv = [[p.prefix_kv() for p in c] for c in rows.combos]
    keys, lengths = _padded([torch.cat([k for k, _ in c], dim=1) if c else None for c in kv], 1, rows, at_end=False)
    values, _ = _padded([torch.cat([v for _, v in c], dim=1) if c else None for c in kv], 1, rows, at_end=False)
    n = keys.shape[2]  # keys, values [1 or batch, kv_heads, n, head_dim]; a shorter row's prefix first, zeros after
    path = rows.pieces()[0].path
    kw = as_kwargs(module, args, kwargs)
    hidden = kw[forward_parameters(module)[0].name]  # hidden_states [batch, tokens, d]
    cache = kw.get("past_key_values")
    past = cache_length(getattr(cache, "self_attention_cache", cache), getattr(module, "layer_idx", None) or 0)
    causal = kw.get("is_causal", getattr(module, "is_causal", False))
    impl = getattr(getattr(module, "config", None), "_attn_implementation", "eager") or "eager"
    valid = None if lengths is None else torch.arange(n, device=lengths.device) < lengths[:, None]
    kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, hidden.shape[1], past, bool(causal), impl, hidden,
                                       path, valid)
    kw["past_key_values"] = PrefixedCache(cache, keys, values, path)
    return (), kw


def extend_mask(mask: Any, n: int, q: int, past: int, causal: bool, impl: str, like: Tensor, path: str,
                valid: Tensor | None = None) -> Any:
    """The attention mask over [n prefix keys; past + q keys]: every query may attend to every prefix key, or, with
    `valid` [batch, n] (routed prefixes of different lengths), to the prefix keys of its row that are valid."""
    if valid is not None and impl.startswith("flash"):
        raise UnsupportedError(f"prefix at {path!r}: routed prefixes of different lengths need a per-row key mask, which "
                               f"flash attention ({impl!r}) does not take; load the model with attn_implementation='sdpa' "
                               f"or 'eager', or route prefixes of equal length")
    if mask is None:
        if valid is None and (not causal or q == 1 or impl.startswith("flash")):
            return None  # full attention (flash attention aligns its causal mask to the end: prefix keys stay visible)
        dev = like.device
        rows = torch.arange(q, device=dev).unsqueeze(1) + past
        real = torch.arange(past + q, device=dev).unsqueeze(0) <= rows  # causal, aligned to the end of the keys
        if not causal:
            real = torch.ones_like(real)
        prefix = torch.ones(1, n, dtype=torch.bool, device=dev) if valid is None else valid
        batch = prefix.shape[0]
        allowed = torch.cat([prefix[:, None, None, :].expand(batch, 1, q, n), real[None, None].expand(batch, 1, -1, -1)],
                            dim=-1)
        if impl != "eager":
            return allowed
        return torch.zeros(allowed.shape, dtype=like.dtype, device=dev).masked_fill(~allowed, torch.finfo(like.dtype).min)
    if not isinstance(mask, Tensor):
        raise UnsupportedError(f"prefix at {path!r}: attention masks of type {type(mask).__name__} (attn_implementation "
                               f"{impl!r}) cannot be extended; load the model with attn_implementation='sdpa' or 'eager'")
    if valid is not None:
        if mask.dim() != 4:
            raise UnsupportedError(f"prefix at {path!r}: routed prefixes of different lengths extend a 4-D attention mask "
                                   f"[batch, heads, queries, keys]; got one of shape {tuple(mask.shape)}")
        batch = valid.shape[0]
        mask = mask.expand(batch, *mask.shape[1:])
        allowed = valid[:, None, None, :].expand(batch, mask.shape[1], mask.shape[2], n)
        if mask.dtype == torch.bool:
            cols = allowed
        else:
            cols = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(mask.dtype).min if mask.is_floating_point() else 0)
        return torch.cat([cols, mask], dim=-1)
    shape = (*mask.shape[:-1], n)
    if mask.dtype == torch.bool:
        cols = torch.ones(shape, dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        cols = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    else:  # 0/1 padding masks (flash attention)
        cols = torch.ones(shape, dtype=mask.dtype, device=mask.device)
    return torch.cat([cols, mask], dim=-1)
