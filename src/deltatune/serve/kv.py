"""The decode KV arena: one preallocated batch cache that running requests write into in place.

Per layer K and V are [rows, kv_heads, cols, head_dim]. Each decoding request owns one row; its tokens are the
columns [start, cur) of that row, right-aligned at a column pointer `cur` shared by all rows. A decode step writes
every row's new token at column `cur` (in place, no copy of anything else) and attends over the view
[:, :, lo:cur + 1] (lo: the smallest start), with an attention mask hiding each row's columns before its start.
A request joins (its prompt finished) by copying its prompt KV once into a free row at [cur − n, cur); it leaves by
freeing its row. Only when the pointer reaches the arena's width (or a joining prompt is longer than the columns
left of the pointer) are the live columns moved — to a wider arena when needed — which is rare (amortised: one
column per step) instead of the re-padding copy of every cache at every step.

Free rows inside the used range take part in the decode forward with a dummy token that attends only to itself
(no delta, output discarded), so no row is ever fully masked."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from .memory import trim


class ArenaLayer(DynamicLayer):
    """One layer's view of the arena for one decode forward: writes column `cur`, returns [:, :, lo:cur + 1]."""

    def __init__(self, k: Tensor, v: Tensor, rows: int, lo: int, cur: int) -> None:
        super().__init__()
        self._k, self._v, self._rows, self._lo, self._cur = k, v, rows, lo, cur
        self.dtype, self.device = k.dtype, k.device
        self.keys, self.values = k[:rows, :, lo:cur], v[:rows, :, lo:cur]
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        c, r = self._cur, self._rows
        self._k[:r, :, c:c + 1].copy_(key_states)
        self._v[:r, :, c:c + 1].copy_(value_states)
        self.keys, self.values = self._k[:r, :, self._lo:c + 1], self._v[:r, :, self._lo:c + 1]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class Arena:
    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.cols = 0
        self.cur = 0
        self.owner: list = [None] * rows
        self.start = [0] * rows
        self.moves = 0      # times the live columns were moved (relayouts)
        self.joins = 0

    @property
    def used(self) -> int:
        """Rows [0, used) take part in a decode forward (the last occupied row + 1)."""
        for i in range(self.rows - 1, -1, -1):
            if self.owner[i] is not None:
                return i + 1
        return 0

    @property
    def lo(self) -> int:
        starts = [self.start[i] for i in range(self.rows) if self.owner[i] is not None]
        return min(starts) if starts else self.cur

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _relayout(self, need_left: int, shape_of: list[tuple[Tensor, Tensor]] | None = None) -> None:
        """Move the live columns [lo, cur) to the left of the arena, leaving at least `need_left` columns before the
        pointer and as many after it as before (doubling the width when needed)."""
        lo = self.lo
        extent = self.cur - lo
        new_cur = max(extent, need_left)
        new_cols = max(self.cols, 2 * new_cur + 16)
        if self.k and new_cols == self.cols:  # wide enough: the live columns move within the arena, nothing allocated
            if extent and new_cur != self.cur:
                for k, v in zip(self.k, self.v):
                    k[:, :, new_cur - extent:new_cur] = k[:, :, lo:self.cur].clone()  # clone: the ranges may overlap
                    v[:, :, new_cur - extent:new_cur] = v[:, :, lo:self.cur].clone()
                self.moves += 1
            self.start = [s + new_cur - self.cur for s in self.start]
            self.cur = new_cur
            return
        src_k, src_v = self.k, self.v
        if not src_k:
            src_k = [k for k, _ in shape_of]
            src_v = [v for _, v in shape_of]
        new_k, new_v = [], []
        for k, v in zip(src_k, src_v):
            nk = k.new_zeros(self.rows, k.shape[-3], new_cols, k.shape[-1])  # zeros: masked columns stay finite
            nv = v.new_zeros(self.rows, v.shape[-3], new_cols, v.shape[-1])
            if self.k and extent:
                nk[:, :, new_cur - extent:new_cur] = k[:, :, lo:self.cur]
                nv[:, :, new_cur - extent:new_cur] = v[:, :, lo:self.cur]
            new_k.append(nk)
            new_v.append(nv)
        if self.k:
            self.moves += 1
        shift = new_cur - self.cur
        self.start = [s + shift for s in self.start]
        self.k, self.v, self.cols, self.cur = new_k, new_v, new_cols, new_cur
        del src_k, src_v, k, v  # nothing of the old arena stays referenced
        trim()  # the old arena's pages go back to the OS instead of staying in the heap (serve/memory.py)

    def join(self, req, kv: list[tuple[Tensor, Tensor]], n: int) -> None:
        """Copy a finished prompt's KV (per layer [kv_heads, ≥ n, head_dim], first n positions) into a free row."""
        row = self.owner.index(None)
        if not self.k or self.cur < n or self.cur >= self.cols:
            self._relayout(n, kv)
        c = self.cur
        for (ak, av), (k, v) in zip(zip(self.k, self.v), kv):
            ak[row, :, c - n:c] = k[:, :n]
            av[row, :, c - n:c] = v[:, :n]
        self.owner[row], self.start[row] = req, c - n
        req.row = row
        self.joins += 1

    def leave(self, req) -> None:
        if req.row is not None:
            self.owner[req.row] = None
            req.row = None

    def cache(self) -> tuple[Cache, int, int]:
        """A Cache over the used rows for one decode forward; (cache, used rows, lo). Moves columns if full."""
        if self.cur >= self.cols:
            self._relayout(0)
        used, lo = self.used, self.lo
        layers = [ArenaLayer(k, v, used, lo, self.cur) for k, v in zip(self.k, self.v)]
        return Cache(layers=layers), used, lo

    def mask(self, used: int, lo: int) -> Tensor:
        """[used, cur + 1 − lo]: each occupied row sees [start, cur]; a free row sees only its own new column."""
        width = self.cur + 1 - lo
        starts = torch.tensor([self.start[i] - lo if self.owner[i] is not None else width - 1 for i in range(used)])
        return (torch.arange(width).unsqueeze(0) >= starts.unsqueeze(1)).long()

    def advance(self) -> None:
        self.cur += 1
