"""Route: one delta (or none) per example of the batch, at serving speed.

At a module, the rows of the batch are grouped by their delta. Weight-position pieces that declare `low_rank` (their
update is a LowRankDelta that does not depend on the base weight) take the fast path, without
Python loops over deltas:

* gather: the factors of the row's delta are gathered per row, `[n, in, r]` and `[n, r, out]`, and two batched
  matmuls add `x Aᵀ Bᵀ` to each row — one pair of bmm per distinct rank, so deltas of different ranks share a
  batch without padding to the largest rank;
* segment: when many rows share few deltas (4+ rows per delta), one pair of plain matmuls per delta over its rows.

The gathered factors are built once per activation of the route and module (in generate, once for all decode
steps) from a per-module bank that stacks every eligible delta's factors once and is rebuilt only when a
delta's parameters change. Every other piece (DoRA, sparse, output/input position, or training with grad on)
runs per group: its rows are selected, the piece runs on them, and the result is put back.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError
from ..core.tensors import LowRankDelta
from .blocks import Block, Context, Node, run


class Route(Block):
    """One delta (or None: the bare model) per example of the batch: Route(rows)(h)[b] = rows[b](h[b])."""

    additive = False
    survives_detach = False
    in_place = True

    def __init__(self, rows: Sequence[str | None]) -> None:
        rows = tuple(rows)
        if not rows:
            raise ConfigError("Route needs one delta name (or None) per example; got an empty list")
        bad = [r for r in rows if r is not None and (not isinstance(r, str) or not r)]
        if bad:
            raise ConfigError(f"Route rows are delta names or None, got {bad[0]!r}")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "children", tuple(dict.fromkeys(r for r in rows if r is not None)))

    def check(self, inside: tuple[type, ...] = ()) -> None:
        bad = [t.__name__ for t in inside if not t.additive]  # only blocks that apply children in full (Sum, Stack)
        if bad:
            raise ConfigError(f"Route inside {bad[0]} makes no sense: per-example routing can only be stacked or summed "
                              f"with other deltas")

    def check_deltas(self, deltas: Mapping[str, Any]) -> None:
        super().check_deltas(deltas)
        for name in self.children:
            for path, piece in deltas[name].pieces.items():
                if not piece.routable:
                    raise ConfigError(f"{name!r} picks its own update per example ({path!r}), so Route cannot give it a "
                                      f"subset of the rows; activate it alone or in Sum/Stack")

    def restrict(self, present: Callable[[str], bool]) -> Node | None:
        return self if any(present(c) for c in self.children) else None  # type: ignore[arg-type]

    def _with(self, children: list[Node]) -> "Block":
        return self

    def run(self, h: Tensor, ctx: "Context") -> Tensor:
        return route_run(self, h, ctx)

    def __repr__(self) -> str:
        return f"Route({list(self.rows)!r})"

    def __hash__(self) -> int:
        return hash((Route, self.rows))


SEGMENT_ROWS_PER_DELTA = 4


@dataclass
class Bank:
    """Every fast-path delta's factors at one module, stacked per rank: At[r] [n, in, r], Bt[r] [n, r, out] (scale
    folded in), bias[r] [n, out] or None; `where[name] = (rank, index)`."""

    key: tuple
    At: dict[int, Tensor] = field(default_factory=dict)
    Bt: dict[int, Tensor] = field(default_factory=dict)
    bias: dict[int, Tensor | None] = field(default_factory=dict)
    where: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class Group:
    """Rows of one rank (gather) or of one delta (segment) at one module; rows None = every row, in order."""

    rows: Tensor | None
    At: Tensor
    Bt: Tensor
    bias: Tensor | None
    batched: bool


@dataclass
class Plan:
    key: tuple
    fast: list[Group]
    slow: list[tuple[str, Tensor]]  # (delta name, its rows) for the per-group path


def _fast_piece(slot, name: str) -> bool:
    p = slot[name]
    return p.position == "weight" and p.low_rank and p.layout is not None and p.layout.dense_input


def _versions(slot, names: list[str]) -> tuple:
    return tuple((n, id(slot[n]), *((q.data_ptr(), q._version) for q in slot[n].parameters())) for n in names)


def _bank(slot, module, dtype: torch.dtype, device: torch.device) -> Bank:
    names = [n for n in slot.keys() if n not in slot.internal.merged and _fast_piece(slot, n)]
    key = (dtype, device, _versions(slot, names))
    bank = slot.internal.cache.get(Route)
    if bank is not None and bank.key == key:
        return bank
    bank = Bank(key)
    per_rank: dict[int, list[tuple[str, LowRankDelta, Tensor | None]]] = {}
    with torch.no_grad():
        for n in names:
            dw, db = slot[n].live_update(module)
            if isinstance(dw, LowRankDelta):  # low_rank pieces may still return a dense form (LoHa)
                per_rank.setdefault(int(dw.A.shape[0]), []).append((n, dw, db))
        for r, items in per_rank.items():
            bank.At[r] = torch.stack([d.A.t() for _, d, _ in items]).to(device=device, dtype=dtype).contiguous()
            bank.Bt[r] = torch.stack([(d.B * d.scale).t() for _, d, _ in items]).to(device=device, dtype=dtype).contiguous()
            biases = [b for _, _, b in items]
            bank.bias[r] = None if all(b is None for b in biases) else torch.stack(
                [b if b is not None else torch.zeros(d.B.shape[0], dtype=d.B.dtype, device=d.B.device) for (_, d, _), b in zip(items, biases)]).to(device, dtype)
            for i, (n, _, _) in enumerate(items):
                bank.where[n] = (r, i)
    slot.internal.cache[Route] = bank
    return bank


def _rows(route: Route, batch: int) -> tuple[str | None, ...]:
    rows = route.rows
    if batch == len(rows):
        return rows
    if batch % len(rows) == 0:  # generate() repeats each example for num_return_sequences / beams
        k = batch // len(rows)
        return tuple(r for r in rows for _ in range(k))
    raise ConfigError(f"dt.route was given {len(rows)} rows but the batch has {batch} examples; give one delta name "
                      f"(or None) per example")


def _plan(route: Route, ctx: Context, batch: int, dtype: torch.dtype, device: torch.device, fast_ok: bool) -> Plan:
    slot = ctx.slot
    key = (id(route), route.rows, batch, dtype, device, ctx.position, fast_ok)
    cached = ctx.cache.get((Route, ctx.position))
    if cached is not None and cached.key == key:
        return cached
    rows = _rows(route, batch)
    by_name: dict[str, list[int]] = {}
    for i, n in enumerate(rows):
        if n is not None and ctx.piece(n) is not None:
            by_name.setdefault(n, []).append(i)
    bank = _bank(slot, ctx.module, dtype, device) if fast_ok else None
    fast_names = [n for n in by_name if bank is not None and n in bank.where]
    slow = [(n, torch.tensor(by_name[n], device=device)) for n in by_name if n not in fast_names]
    groups: list[Group] = []
    every_row = sum(len(by_name[n]) for n in fast_names) == batch
    if fast_names and len(fast_names) * SEGMENT_ROWS_PER_DELTA <= sum(len(by_name[n]) for n in fast_names):
        for n in fast_names:  # few deltas, many rows each: one matmul pair per delta
            r, i = bank.where[n]
            idx = by_name[n]
            groups.append(Group(None if len(idx) == batch else torch.tensor(idx, device=device), bank.At[r][i],
                                bank.Bt[r][i], None if bank.bias[r] is None else bank.bias[r][i], batched=False))
    else:
        ranks: dict[int, list[int]] = {}
        for i, n in enumerate(rows):
            if n in fast_names:
                ranks.setdefault(bank.where[n][0], []).append(i)
        for r, idx in ranks.items():
            sel = torch.tensor([bank.where[rows[i]][1] for i in idx], device=device)
            in_order = every_row and len(ranks) == 1
            groups.append(Group(None if in_order else torch.tensor(idx, device=device), bank.At[r].index_select(0, sel),
                                bank.Bt[r].index_select(0, sel),
                                None if bank.bias[r] is None else bank.bias[r].index_select(0, sel), batched=True))
    plan = Plan(key, groups, slow)
    ctx.cache[(Route, ctx.position)] = plan
    return plan


def _fast_group(g: Group, x3: Tensor, h3: Tensor) -> None:
    """h3 += x3 Aᵀ Bᵀ (+ Δb) on the group's rows, in place (grad is off)."""
    xs = x3 if g.rows is None else x3.index_select(0, g.rows)
    if g.batched:
        t = torch.bmm(xs, g.At)
        if g.rows is None:
            h3.baddbmm_(t, g.Bt)
        else:
            h3.index_add_(0, g.rows, torch.bmm(t, g.Bt))
        if g.bias is not None:
            h3.index_add_(0, g.rows, g.bias[:, None, :].expand(-1, h3.shape[1], -1)) if g.rows is not None \
                else h3.add_(g.bias[:, None, :])
        return
    n, t_len = xs.shape[0], xs.shape[1]
    u = (xs.reshape(n * t_len, -1) @ g.At) @ g.Bt
    if g.bias is not None:
        u = u + g.bias
    if g.rows is None:
        h3.add_(u.view(h3.shape))
    else:
        h3.index_add_(0, g.rows, u.view(n, t_len, -1))


def route_run(route: Route, h: Tensor, ctx: Context) -> Tensor:
    """Route(rows)(h): each row of the batch through its own delta (None: unchanged)."""
    batch = h.shape[0]
    fast_ok = ctx.position == "weight" and not torch.is_grad_enabled() and h.dim() >= 2 and h.dtype == ctx.x.dtype
    plan = _plan(route, ctx, batch, h.dtype, h.device, fast_ok)
    if plan.fast:
        h3 = h.view(batch, -1, h.shape[-1]) if h.is_contiguous() else None
        if h3 is None:
            h = h.contiguous()
            h3 = h.view(batch, -1, h.shape[-1])
        x3 = ctx.x.reshape(batch, -1, ctx.x.shape[-1])
        for g in plan.fast:
            _fast_group(g, x3, h3)
    # in place only at the weight position (the host hands over its own output or copy there); an input or output
    # may be a tensor other modules still read (a shared input, the residual stream through an identity module)
    in_place = ctx.position == "weight" and not torch.is_grad_enabled()
    for name, idx in plan.slow:
        sub = ctx.rows(idx)
        if ctx.position == "weight":  # additive: the rows' contribution alone, then added
            change = run(name, torch.zeros_like(h.index_select(0, idx)), sub)
            h = h.index_add_(0, idx, change) if in_place else h.index_add(0, idx, change)
        else:
            h = h.index_copy(0, idx, run(name, h.index_select(0, idx), sub))
    return h


def per_row(rows: Sequence[str | None]) -> Route:
    """The composition that runs row b of every batch through delta rows[b] (None: the bare model)."""
    return Route(rows)
