"""Requests and the continuous-batching policy.

Every engine step: (1) cancelled requests leave (KV freed, delta unpinned); (2) the step's prefill-token budget
(`prefill_tokens`) is spent on prompt chunks: first the requests already prefilling, in arrival order, then waiting
requests admitted in arrival order while the batch has room and their delta gets a device slot (a request whose
delta cannot get one — every fitting slot pinned — waits, without blocking the ones behind it); (3) one decode
forward for every request past its prompt (one token each, in place in the KV arena, serve/kv.py) and one prefill
forward for the step's chunks (left-padded over the prefilling requests' own caches); (4) each request that
decoded or finished its prompt samples its next token, streams it, and finishes on max_tokens, EOS or a stop
string, freeing its KV and unpinning its delta. A long prompt therefore never stalls the decodes for more than one
chunk budget per step."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .sampling import SamplingParams

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    delta: str | None
    sampling: SamplingParams
    on_token: Callable[["Request", int], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    status: str = "waiting"          # waiting | running | finished
    finish_reason: str | None = None  # length | eos | stop | cancelled | error
    error: BaseException | None = None
    key: tuple[str, int] | None = None
    slot: int | None = None
    kv: list[tuple[Tensor, Tensor]] | None = None  # while prefilling: per layer [kv_heads, prompt, head_dim]
    length: int = 0                                 # tokens in the KV cache (prompt chunks done, then decoded)
    row: int | None = None                          # its row of the decode arena once its prompt is done
    generator: torch.Generator | None = None
    _cancel: bool = False

    @property
    def done(self) -> bool:
        return self.status == "finished"

    def cancel(self) -> None:
        """Stop this request at the next step; its KV memory is freed and its delta unpinned."""
        self._cancel = True


def padded_cache(reqs: list[Request], width: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer K, V [batch, kv_heads, width, head_dim]: each request's cache left-padded to `width` (a request
    with no cache yet is all padding)."""
    layers = []
    first = next(r for r in reqs if r.kv is not None)
    for layer in range(len(first.kv)):
        k0, v0 = first.kv[layer]
        k = k0.new_zeros(len(reqs), k0.shape[0], width, k0.shape[2])
        v = v0.new_zeros(len(reqs), v0.shape[0], width, v0.shape[2])
        for i, r in enumerate(reqs):
            if r.kv is None:
                continue
            rk, rv = r.kv[layer]
            k[i, :, width - r.length:] = rk[:, :r.length]
            v[i, :, width - r.length:] = rv[:, :r.length]
        layers.append((k, v))
    return layers


def store_new(reqs: list[Request], layers: list[tuple[Tensor, Tensor]], new: list[int], capacity: list[int]) -> None:
    """Append each request's last `new[i]` positions of the forward's cache to its own prefill KV (allocated on
    first use with `capacity[i]` positions)."""
    for i, r in enumerate(reqs):
        n = new[i]
        if r.kv is None:
            r.kv = []
            for k, v in layers:
                r.kv.append((k.new_empty(k.shape[1], capacity[i], k.shape[3]), v.new_empty(v.shape[1], capacity[i], v.shape[3])))
        for (rk, rv), (k, v) in zip(r.kv, layers):
            rk[:, r.length:r.length + n] = k[i, :, k.shape[2] - n:]
            rv[:, r.length:r.length + n] = v[i, :, v.shape[2] - n:]
        r.length += n
