"""Per-token routing of the low-rank contribution (SGMV-style): a compiled kernel on the CPU, torch ops elsewhere.

The engine sets a `Plan` for each forward in a context variable; the forward hook it installs once on every banked
module reads it. Tokens are the flattened [batch × time] positions of the forward's input; each carries a global
slot number or none. Per rank bucket the plan groups the bucket's tokens by slot (u distinct slots) and picks a
path; all read the banks' Aᵀ [n, in, R] and Bᵀ [n, R, out] (serve/slots.py) where they lie:

* **the compiled kernel** (serve/kernel.py; CPU, float32/64 banks, every bucket): tokens sorted by slot,
  z = x·Aᵀ[s] and out += z·Bᵀ[s] per token, in place, the tokens of one slot in a row on one thread so that its
  factors come from cache after the first. `bench/serve_routing.py` found it faster than both torch paths at
  every segment length it measured, prefill and decode;
* **long segments** (torch ops; prefill: many tokens per slot): the u segments are padded to the longest one (L);
  the hook gathers the u slots' factors once, runs two batched matmuls over [u, L, ·] and keeps the valid rows;
* **short segments** (torch ops; fewer than `BAG_BELOW` tokens per distinct slot on average: decode over many
  deltas): two `embedding_bag` row sums per token, z = Σᵢ xᵢ·Aᵀ[s, i, :] and y = Σᵣ zᵣ·Bᵀ[s, r, :], in the
  forward's own token order (when every token of the forward has a slot in the bucket, the input is used as it
  is and y added to the output as a whole). Between these two torch paths the same benchmark puts the crossover
  near 8 tokens per slot (gaps of a few percent around it, docs/serving.md).

Otherwise the result is added into the module's output rows with `index_add_`. Tokens without a delta are never
touched, so their output is the base output exactly; a step's cost grows with its tokens and the distinct deltas
in it, not with how many are registered or loaded."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernel
from .slots import Banks

_PLAN: contextvars.ContextVar["Plan | None"] = contextvars.ContextVar("deltatune_serve_plan", default=None)
#: with torch ops, a bucket's tokens take the row-sum path when they average fewer than this many per distinct slot
BAG_BELOW = 8
#: every bucket the compiled kernel suits uses it where it is loaded (False: always torch ops)
KERNEL = True


@dataclass
class Group:
    bucket: int
    rows: Tensor                # [u] bank rows of the bucket
    gather: Tensor | None       # [u * L] token index per padded position (padding points at token 0; dropped below)
    valid: Tensor | None        # positions of real tokens in [u * L]
    tokens: Tensor | None       # [n] token index of each valid position, in the same order; None: every token of
                                # the forward in its own order (torch ops' short-segment path only)
    u: int
    length: int
    token_rows: Tensor | None = None  # [n] bank row of each token (torch ops' short segments), in the forward's order
    bags: dict | None = None          # (size, width) -> (indices, offsets), built once per forward
    by_slot: tuple[Tensor, Tensor] | None = None  # the kernel's (bank rows, tokens) sorted by row; None: torch ops

    def bag(self, size: int, width: int) -> tuple[Tensor, Tensor]:
        """embedding_bag indices and offsets over a [count * size, width] view: token t sums rows
        row_t * size + 0 .. size − 1."""
        key = (size, width)
        if key not in self.bags:
            r = self.token_rows
            idx = (r[:, None] * size + torch.arange(size, device=r.device)).reshape(-1)
            self.bags[key] = (idx, torch.arange(r.numel(), device=r.device) * size)
        return self.bags[key]


@dataclass
class Plan:
    groups: list[Group]


def make_plan(slots: list[int], banks: Banks, device: torch.device) -> Plan:
    """The plan for one forward from each flattened token's global slot (−1: none)."""
    by_slot: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s >= 0:
            by_slot.setdefault(s, []).append(t)
    # the compiled kernel beats both torch paths at every segment length measured (bench/serve_routing.py); the torch
    # ops' fields are planned as well, for a forward whose tensors the kernel does not take (kernel.usable)
    compiled = KERNEL and kernel.loaded()
    groups = []
    for bi, b in enumerate(banks.buckets):
        segs = [(s - b.offset, toks) for s, toks in sorted(by_slot.items()) if b.offset <= s < b.offset + b.count]
        if not segs:
            continue
        as_t = lambda v: torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
        ranked = None
        if compiled and kernel.suits(banks.dtype, b.rank, device):
            ranked = (as_t([r for r, toks in segs for _ in toks]), as_t([t for _, toks in segs for t in toks]))
        n = sum(len(toks) for _, toks in segs)
        if n < BAG_BELOW * len(segs):  # short segments: each token by itself, in the forward's own order
            order = [t for t, s in enumerate(slots) if b.offset <= s < b.offset + b.count]
            whole = n == len(slots)  # every token of the forward, in order: no select, a plain add
            groups.append(Group(bi, as_t([r for r, _ in segs]), None, None, None if whole else as_t(order),
                                len(segs), 1, as_t([slots[t] - b.offset for t in order]), {}, ranked))
            continue
        length = max(len(toks) for _, toks in segs)
        gather, valid, tokens = [], [], []
        for i, (_, toks) in enumerate(segs):
            gather.extend(toks + [0] * (length - len(toks)))
            valid.extend(range(i * length, i * length + len(toks)))
            tokens.extend(toks)
        groups.append(Group(bi, as_t([r for r, _ in segs]), as_t(gather), as_t(valid), as_t(tokens), len(segs), length,
                            by_slot=ranked))
    return Plan(groups)


class use_plan:
    """Context manager: forwards inside it route tokens by `plan` (context-local: threads and tasks see their own)."""

    def __init__(self, plan: Plan | None) -> None:
        self.plan, self._token = plan, None

    def __enter__(self) -> Plan | None:
        self._token = _PLAN.set(self.plan)
        return self.plan

    def __exit__(self, *exc) -> None:
        _PLAN.reset(self._token)


def low_rank_add(banks: Banks, path: str, x: Tensor, out: Tensor, plan: Plan) -> Tensor:
    """out (flattened tokens × out) += for each token s · B_slot A_slot x, grouped as the plan says."""
    x2 = x.reshape(-1, x.shape[-1])
    o2 = out.view(-1, out.shape[-1])
    for g in plan.groups:
        at, bt = banks.AT[path][g.bucket], banks.BT[path][g.bucket]  # [count, in, R], [count, R, out]
        if g.by_slot is not None and (compiled := kernel.usable(x2, o2, at, bt)) is not None:
            compiled.grouped_low_rank_add(x2, o2, at, bt, *g.by_slot)  # in place, per token, where the factors lie
            continue
        if g.token_rows is not None:  # short segments: per-token row sums where the factors lie
            rank, width = at.shape[2], bt.shape[2]
            xs = (x2 if g.tokens is None else x2.index_select(0, g.tokens)).to(at.dtype)
            idx, off = g.bag(at.shape[1], rank)
            z = F.embedding_bag(idx, at.view(-1, rank), off, mode="sum", per_sample_weights=xs.reshape(-1))
            idx, off = g.bag(rank, width)
            y = F.embedding_bag(idx, bt.view(-1, width), off, mode="sum", per_sample_weights=z.reshape(-1))
            if g.tokens is None:
                o2.add_(y.to(o2.dtype))
                continue
        else:  # long segments: gathered slots, batched matmuls
            a, b = at.index_select(0, g.rows), bt.index_select(0, g.rows)
            xs = x2.index_select(0, g.gather).view(g.u, g.length, -1).to(a.dtype)
            y = torch.bmm(torch.bmm(xs, a), b).view(g.u * g.length, -1)  # [u * L, out]
            if g.valid.numel() != y.shape[0]:
                y = y.index_select(0, g.valid)
        o2.index_add_(0, g.tokens, y.to(o2.dtype))
    return out


def install_hooks(model: nn.Module, banks: Banks) -> list:
    """A forward hook on every banked module; a no-op outside a plan (the model behaves as the bare base)."""
    modules = dict(model.named_modules())
    handles = []
    for path in banks.shapes:
        def hook(module: nn.Module, args: tuple, out: Tensor, _path: str = path) -> Tensor | None:
            plan = _PLAN.get()
            if plan is None or not plan.groups:
                return None
            if not out.is_contiguous():
                out = out.contiguous()
            with torch.no_grad():
                return low_rank_add(banks, _path, args[0], out, plan)
        handles.append(modules[path].register_forward_hook(hook))
    return handles
