"""PEFT PREFIX_TUNING <-> PrefixTuning, on rotary-position models.

peft saves the prefixes of all layers as one tensor `prompt_embeddings` [n, layers·2·kv_heads·head_dim] (viewed
as [n, layer·2 + (0 keys | 1 values), kv_heads, head_dim]); ours holds prefix_keys / prefix_values
[kv_heads, n, head_dim] on each self-attention module (found on the model in layer order when the delta meets
it).

Positions differ (docs/methods.md, prefix tuning): peft puts the prefix in the cache, so the real tokens sit at
positions n..n+L-1; ours keeps them at 0..L-1. The prefix keys carry no rotation in either, and rotary attention
depends on positions only through R(p_q − p_k) between rotated vectors, so the query of token i meets a prefix key
K as R(n + i) q · K in peft and R(i) q · K' in ours: the two agree exactly (logits and generated tokens) when
K' = R(−n) K, which the codec applies on reading (R(+n) on writing), using the model's rotary frequencies. Models
with absolute position embeddings (GPT-2, BERT) give the real tokens other embeddings at n.. than at 0.., which no
prefix can undo: their prefixes are refused, both ways. Refused too: prefix_projection=True (peft then saves the
MLP, not the prefixes) and encoder-decoder models."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ...core.errors import CorruptFileError, TargetError, UnsupportedError
from ...methods.prompts.prompts import SELF_ATTENTION, PrefixTuning
from ..delta import Delta
from ..peft import PeftFile, PeftKind, register_kind, task_type

KEY = "prompt_embeddings"
PLACE = "<self-attention modules>"  # the module paths a read prefix gets from the model
_KNOWN = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                    "num_layers", "encoder_hidden_size", "prefix_projection"})


def rotation(model: nn.Module, shift: int, head_dim: int, what: str) -> tuple[Tensor, Tensor]:
    """(cos, sin) [head_dim] of the model's rotary embedding at position `shift`, without its attention scaling;
    UnsupportedError for a model without rotary positions."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb") and hasattr(m, "inv_freq")), None)
    if rotary is None:
        raise UnsupportedError(f"{what}: peft's prefix tuning moves the real tokens to positions n.. while deltatune "
                               f"keeps them at 0..; on a model with rotary positions the codec converts the prefix keys, "
                               f"but this {type(model).__name__} has absolute position embeddings, which no prefix "
                               f"conversion undoes (docs/formats.md)")
    freqs = shift * rotary.inv_freq.detach().float().cpu()
    emb = torch.cat([freqs, freqs])
    if emb.numel() != head_dim:
        raise UnsupportedError(f"{what}: the rotary embedding covers {emb.numel()} of {head_dim} head dimensions "
                               f"(partial rotary); the prefix conversion needs all")
    return emb.cos(), emb.sin()


def rotate(k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = k.shape[-1] // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    return (k.float() * cos + turned.float() * sin).to(k.dtype)


def attention_paths(model: nn.Module) -> list[str]:
    return [p for p, _ in model.named_modules() if re.fullmatch(SELF_ATTENTION, p)]


class PrefixFileDelta(Delta):
    """peft's stacked prefixes, placed on the model's self-attention modules (in order) and converted to its
    positions (see the module doc) when the delta meets the model."""

    heads: int = 0

    @property
    def needs_model(self) -> str:  # type: ignore[override]
        return (f"PEFT prefix adapter {self.name!r}: its prefixes are placed on the model's self-attention modules and "
                f"converted to its positions by its rotary embedding; load it onto the model first (dt.load, then "
                f"dt.save; or `deltatune convert --base MODEL_DIR`)")

    def for_model(self, model: nn.Module) -> Delta:
        paths = attention_paths(model)
        t = self.state[PLACE][KEY]
        n, width = t.shape
        if len(paths) * 2 * self.heads == 0 or width % (2 * len(paths) * self.heads):
            raise TargetError(f"PEFT prefix adapter {self.name!r} holds prefixes of width {width} for {self.heads} "
                              f"key/value heads, which do not fit the {len(paths)} self-attention modules of this "
                              f"{type(model).__name__}")
        head_dim = width // (2 * len(paths) * self.heads)
        cos, sin = rotation(model, -n, head_dim, f"PEFT prefix adapter {self.name!r}")
        kv = t.view(n, 2 * len(paths), self.heads, head_dim)
        state = {p: {"prefix_keys": rotate(kv[:, 2 * i].transpose(0, 1), cos, sin).contiguous(),
                     "prefix_values": kv[:, 2 * i + 1].transpose(0, 1).contiguous()} for i, p in enumerate(paths)}
        config = self.config.replace(targets=tuple(paths))
        return Delta(self.name, config, state, {p: "?" for p in paths}, dict(self.base))


def read(file: PeftFile) -> Delta:
    if file.number("num_transformer_submodules", int, default=1) != 1:
        raise UnsupportedError(f"{file.where} is for an encoder-decoder model; deltatune's prefixes adapt one stack")
    if file.flag("prefix_projection"):
        raise UnsupportedError(f"{file.where} uses prefix_projection=True; deltatune reads plain prefixes")
    t = file.tensors.pop(KEY, None)
    n = file.number("num_virtual_tokens", int)
    if t is None or t.dim() != 2 or t.shape[0] != n or not t.is_floating_point():
        raise CorruptFileError(f"{file.where}: {KEY} {None if t is None else tuple(t.shape)} is not [{n}, width] floats")
    config = file.config(PrefixTuning, n_tokens=n)
    delta = PrefixFileDelta(file.name(), config, {PLACE: {KEY: t}}, {PLACE: "?"}, file.base())
    delta.heads = file.number("num_attention_heads", int)
    return delta


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if delta.source is None:
        raise UnsupportedError(f"{where}: peft's prefixes need converting to its positions with the model's rotary "
                               f"embedding; save from the model (dt.save(model, path, name, format='peft'))")
    order = attention_paths(delta.source)
    if sorted(paths) != sorted(order):
        raise UnsupportedError(f"{where}: peft's prefix tuning puts a prefix on every layer; this delta covers "
                               f"{len(paths)} of {len(order)} self-attention modules")
    keys = [delta.state[p]["prefix_keys"] for p in order]
    heads, n, head_dim = keys[0].shape
    cos, sin = rotation(delta.source, n, head_dim, where)
    stacked = torch.stack([t for p in order for t in (rotate(delta.state[p]["prefix_keys"], cos, sin),
                                                      delta.state[p]["prefix_values"])], dim=1)  # [kv, 2L, n, hd]
    flat = stacked.permute(2, 1, 0, 3).reshape(n, -1).contiguous()  # [n, 2L · kv · hd]
    return {KEY: flat}, {"task_type": task_type(delta.base.get("model_class")), "num_virtual_tokens": int(n),
                         "token_dim": int(heads * head_dim), "num_transformer_submodules": 1,
                         "num_attention_heads": int(heads), "num_layers": len(order), "prefix_projection": False}


register_kind(PeftKind("PREFIX_TUNING", (PrefixTuning,), read, write, fields=_KNOWN, prefix="base_model.",
                       description="prefix tuning on rotary models, converted to peft's shifted positions"))
