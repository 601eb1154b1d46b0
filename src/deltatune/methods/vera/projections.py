"""Frozen random matrices that pieces regenerate from a seed instead of saving them (VeRA, RandLoRA).

A matrix is drawn on the CPU in float32 from a `torch.Generator` seeded by a hash of its *stream* name (never
Python's randomised `hash`), so the same config gives the same matrix in every process and on every machine;
files therefore hold only the seed (in the config), not the matrices.

`shared(key, make, dtype, device)` hands every piece the *same* tensor per (key, dtype, device): the modules of
one shape hold one copy between them, not one each. The table keeps a tensor only while some piece holds it
(weak references), so detaching the last delta that uses a matrix frees it.
"""
from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

_TABLE: "weakref.WeakValueDictionary[tuple, Tensor]" = weakref.WeakValueDictionary()


def stream_seed(*name: object) -> int:
    """A 56-bit generator seed for the stream `name` (ints and strings), the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(name).encode()).digest()[:7], "little")


def uniform(stream: tuple, shape: tuple[int, ...], bound: float) -> Tensor:
    """U(-bound, bound) of `shape`, float32 on the CPU, drawn row-major from `stream`'s generator.

    Row-major drawing makes a matrix with fewer rows a prefix of one with more (same stream, same row length)."""
    gen = torch.Generator().manual_seed(stream_seed(*stream))
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen)


def shared(key: tuple, make: Callable[[], Tensor], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """The one tensor for (key, dtype, device), made by `make()` (CPU float32) on first use."""
    device = torch.device(device)
    full = (key, dtype, str(device))
    t = _TABLE.get(full)
    if t is None:
        t = make().to(device=device, dtype=dtype)
        _TABLE[full] = t
    return t


def clear() -> None:
    """Forget every table entry (pieces keep the tensors they hold); the next use regenerates them."""
    _TABLE.clear()


def table_size() -> int:
    """Tensors currently in the table (held by at least one piece or caller)."""
    return len(_TABLE)


class HeldBases:
    """A piece's strong references to its shared matrices for one (dtype, device), refreshed when that changes."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: tuple[Tensor, ...] = ()

    def get(self, dtype: torch.dtype, device: torch.device, fetch: Callable[[torch.dtype, torch.device], tuple[Tensor, ...]]
            ) -> tuple[Tensor, ...]:
        if self.key != (dtype, device):
            self.tensors = fetch(dtype, device)
            self.key = (dtype, device)
        return self.tensors
