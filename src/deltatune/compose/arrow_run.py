"""Arrow (Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"):
training-free per-token routing over a library of weight deltas.

At each module, delta i's prototype v_i is the top right-singular vector of its ΔW (a direction in the module's
input space). A token x scores each delta by |x·v_i| (the sign of a singular vector is arbitrary), keeps the
top-k, and mixes their contributions with softmax(score / T) over those k:

    y = h + Σ_{i ∈ top-k(x)} softmax_i(|x·v_i| / T) c_i(x)

Prototypes are computed once per module and cached until a delta's parameters change.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .blocks import Arrow, Context, run
from ..core.errors import UnsupportedError
from ..core.tensors import LowRankDelta


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
    cache = getattr(slot, "arrow_cache", None)
    if cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        protos = torch.stack([top_right_singular(slot[n].delta_weight(ctx.module)) for n in names]).to(ctx.x.dtype)
    slot.arrow_cache = (key, protos)
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
