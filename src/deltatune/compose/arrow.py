"""Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"):
training-free per-token routing over a library of weight deltas.

At each module, delta i's prototype v_i is the top right-singular vector of its ΔW (a direction in the module's
input space). A token x scores each delta by |x·v_i| (the sign of a singular vector is arbitrary), keeps the
top-k, and mixes their contributions with softmax(score / T) over those k:

    y = h + Σ_{i ∈ top-k(x)} softmax_i(|x·v_i| / T) c_i(x)

Prototypes are computed once per module and cached until a delta's parameters change.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError, UnsupportedError
from ..core.tensors import LowRankDelta
from .blocks import Block, Context, _init_children, run


class Arrow(Block):
    """Training-free per-token routing among weight-position deltas by their top right-singular vectors."""

    additive = False
    positions = ("weight",)
    survives_detach = False

    def __init__(self, *children: str, top_k: int = 1, temperature: float = 1.0) -> None:
        _init_children(self, children)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(children):
            raise ConfigError(f"Arrow.top_k must be an integer in [1, {len(children)}], got {top_k!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"Arrow.temperature must be a positive number, got {temperature!r}")
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "temperature", float(temperature))

    def check(self, inside: tuple[type, ...] = ()) -> None:
        nested = [c for c in self.children if not isinstance(c, str)]
        if nested:
            raise ConfigError(f"Arrow routes among deltas, not blocks ({nested[0]!r})")

    def check_deltas(self, deltas: Mapping[str, Any]) -> None:
        super().check_deltas(deltas)
        for name in self.children:
            for path, piece in deltas[name].pieces.items():
                if not piece.mergeable:
                    raise ConfigError(f"Arrow routes by each delta's ΔW; {name!r} at {path!r} is not a weight update")

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        return arrow_run(self, h, ctx)

    def __repr__(self) -> str:
        return f"Arrow({', '.join(map(repr, self.children))}, top_k={self.top_k})"


def top_right_singular(dw) -> Tensor:
    """The top right-singular vector of a delta tensor ([in]); low-rank updates via their small core."""
    if isinstance(dw, LowRankDelta):
        q, r = torch.linalg.qr(dw.B.double())            # ΔW = s·B A = Q (s·R A)
        _, _, vh = torch.linalg.svd(dw.scale * (r @ dw.A.double()), full_matrices=False)
    else:
        dense = dw.to_dense()
        if dense.dim() != 2:
            raise UnsupportedError(f"Arrow routes by ΔW's right-singular vectors; this update has shape "
                                   f"{tuple(dense.shape)} (not a matrix)")
        _, _, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    return vh[0]


def _prototypes(arrow: Arrow, names: list[str], ctx: Context) -> Tensor:
    slot = ctx.slot
    key = (arrow.children, tuple(names), ctx.x.dtype,
           tuple((q.data_ptr(), q._version) for n in names for q in slot[n].parameters()))
    cache = slot.internal.cache.get(Arrow)
    if cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        protos = torch.stack([top_right_singular(slot[n].delta_weight(ctx.module)) for n in names]).to(ctx.x.dtype)
    slot.internal.cache[Arrow] = (key, protos)
    return protos


def arrow_run(arrow: Arrow, h: Tensor, ctx: Context) -> Tensor:
    names = [n for n in arrow.children if ctx.piece(n) is not None]
    if not names:
        return h
    protos = _prototypes(arrow, names, ctx)                       # [n, in]
    x = ctx.x
    scores = (x.to(protos.dtype) @ protos.t()).abs() / arrow.temperature   # [..., n]
    k = min(arrow.top_k, len(names))
    top, idx = scores.topk(k, dim=-1)
    weights = torch.zeros_like(scores).scatter_(-1, idx, torch.softmax(top, dim=-1))
    out = h
    for i, n in enumerate(names):
        change = run(n, torch.zeros_like(h), ctx)                # c_i(x)
        out = out + weights[..., i:i + 1].to(change.dtype) * change
    return out
