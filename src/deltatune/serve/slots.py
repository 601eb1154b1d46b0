"""Device slots: preallocated per-module factor banks, split into rank buckets, and the table of which delta
(name, version) each slot holds, with pins for requests in flight and LRU eviction among the unpinned.

A bucket of rank R with n slots holds, for every banked module of shape [out, in], Aᵀ [n, in, R] and Bᵀ [n, R, out]
(the scale folded into Bᵀ): transposed, so that the compiled routing kernel, the batched matmuls over gathered
slots and the per-token row sums (serve/routing.py) all read them as they lie. A delta of rank r goes into
the smallest bucket with R ≥ r (a larger one if that is full of pinned deltas); its factors are copied in and the
unused R − r ranks zeroed, which adds exactly nothing. Nothing is allocated after construction and no module of
the model changes."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.errors import ConfigError
from .pool import Factors


@dataclass
class Bucket:
    rank: int
    count: int
    offset: int  # global slot number of its first slot


class Banks:
    """Aᵀ [n, in, R] and Bᵀ [n, R, out] per banked module and bucket, on the model's device, in its dtype."""

    def __init__(self, shapes: dict[str, tuple[int, int]], buckets: dict[int, int], device: torch.device,
                 dtype: torch.dtype) -> None:
        if not buckets or any(not isinstance(r, int) or r < 1 or not isinstance(n, int) or n < 1 for r, n in buckets.items()):
            raise ConfigError(f"rank buckets must map ranks ≥ 1 to slot counts ≥ 1, got {buckets!r}")
        self.buckets: list[Bucket] = []
        offset = 0
        for rank in sorted(buckets):
            self.buckets.append(Bucket(rank, buckets[rank], offset))
            offset += buckets[rank]
        self.size = offset
        self.shapes, self.dtype = shapes, dtype
        self.AT: dict[str, list[Tensor]] = {}
        self.BT: dict[str, list[Tensor]] = {}
        for path, (out_f, in_f) in shapes.items():
            self.AT[path] = [torch.zeros(b.count, in_f, b.rank, device=device, dtype=dtype) for b in self.buckets]
            self.BT[path] = [torch.zeros(b.count, b.rank, out_f, device=device, dtype=dtype) for b in self.buckets]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in (*self.AT.values(), *self.BT.values()) for t in ts)

    def locate(self, slot: int) -> tuple[int, int]:
        """(bucket index, row in it) of a global slot number."""
        for i, b in enumerate(self.buckets):
            if slot < b.offset + b.count:
                return i, slot - b.offset
        raise IndexError(slot)

    @torch.no_grad()
    def write(self, slot: int, factors: Factors) -> None:
        """Copy a delta's factors into the slot's rows (zeros for modules it does not adapt and unused ranks)."""
        bi, row = self.locate(slot)
        for path in self.shapes:
            at, bt = self.AT[path][bi][row], self.BT[path][bi][row]  # [in, R], [R, out]
            f = factors.get(path)
            if f is None:
                at.zero_()
                bt.zero_()
                continue
            a, b, scale = f
            r = a.shape[0]
            at[:, :r].copy_(a.t(), non_blocking=True)
            if scale != 1:  # scaled on the way in: one pass over B, in the wider of the two dtypes, rounded once
                wide = torch.promote_types(b.dtype, bt.dtype)
                torch.mul(b.t().to(bt.device, wide, non_blocking=True), scale, out=bt[:r])
            else:
                bt[:r].copy_(b.t(), non_blocking=True)
            if r < at.shape[1]:
                at[:, r:].zero_()
                bt[r:].zero_()

    def factors(self, path: str, slot: int) -> tuple[Tensor, Tensor]:
        """The slot's (A [R, in], B [out, R] with the scale folded in) for `path`: views of the bank."""
        bi, row = self.locate(slot)
        return self.AT[path][bi][row].t(), self.BT[path][bi][row].t()


class SlotTable:
    """Which (name, version) each slot holds; pins of requests in flight; LRU order of the unpinned."""

    def __init__(self, banks: Banks) -> None:
        self.banks = banks
        self.key: list[tuple[str, int] | None] = [None] * banks.size
        self.pins = [0] * banks.size
        self.where: dict[tuple[str, int], int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # loaded, unpinned slots; oldest first
        self.loads = 0
        self.evictions = 0

    def acquire(self, key: tuple[str, int], rank: int, load) -> int | None:
        """Pin the slot holding `key`, loading it (`load(slot)`) into a free or least recently used unpinned slot
        of the smallest bucket that fits; None when every fitting slot is pinned."""
        slot = self.where.get(key)
        if slot is not None:
            self._pin(slot)
            return slot
        for b in self.banks.buckets:
            if b.rank < rank:
                continue
            slot = self._free_in(b)
            if slot is None:
                continue
            old = self.key[slot]
            if old is not None:
                del self.where[old]
                self.evictions += 1
            self.key[slot] = None
            self.lru.pop(slot, None)
            load(slot)  # may raise: the slot stays empty
            self.key[slot] = key
            self.where[key] = slot
            self.loads += 1
            self._pin(slot)
            return slot
        return None

    def _free_in(self, b: Bucket) -> int | None:
        for s in range(b.offset, b.offset + b.count):
            if self.key[s] is None and self.pins[s] == 0:
                return s
        for s in self.lru:
            if b.offset <= s < b.offset + b.count:
                return s
        return None

    def _pin(self, slot: int) -> None:
        self.pins[slot] += 1
        self.lru.pop(slot, None)

    def release(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0 and self.key[slot] is not None:
            if self.key[slot][1] == -1:  # a replaced version: nothing will ask for it again
                self.key[slot] = None
            else:
                self.lru[slot] = None

    def forget(self, name: str, below: int | None = None) -> None:
        """Versions of `name` (those below version `below`, when given: a re-registration keeps the new version's
        slot, which a request may have loaded already) in unpinned slots are dropped; pinned ones stay for their
        requests, unreachable by new ones (their version differs), and are evicted first once released."""
        for key, slot in list(self.where.items()):
            if key[0] == name and (below is None or key[1] < below):
                del self.where[key]
                if self.pins[slot] == 0:
                    self.key[slot] = None
                    self.lru.pop(slot, None)
                else:
                    self.key[slot] = (name, -1)  # stale: released into the LRU's front below
        for slot in [s for s, k in enumerate(self.key) if k == (name, -1) and self.pins[s] == 0]:
            self.key[slot] = None
