"""The delta pool: registered deltas (disk tier, metadata only) and their factors in host memory (an LRU under a
byte budget).

Registration reads the delta's metadata (native `delta.json` / PEFT `adapter_config.json`) and its safetensors
header, never its tensors, and validates it like `dt.load`: the format's own checks, `check_fits` against the
model, pieces built from the config (on a meta copy of the model) compared with the file's tensor names and
shapes. A refused file raises the same typed error and changes nothing. The result of validating one file
(keyed by its path, sizes and modification times) is shared by every registration of that file.

Which path a delta takes is decided here from declared capabilities, never from its kind's name (docs/serving.md):

* **fast**: every piece is `mergeable`, needs no base (`needs_base`, `needs_shape` false) and its update
  (`Delta.update` on the file's meta tensors) is a `LowRankDelta`: its factors go to the device banks as stored.
* **converted**: other mergeable deltas, when the user passes `convert_rank=`: at registration their exact ΔW
  (given the base) is truncated by SVD to that rank; the relative error is reported (`Registered.error`). This
  reads the tensors, once per registration.
* **refused**: pieces that are not weight updates (prompts, bottleneck adapters), bias changes, modules the
  engine has no bank for, or a mergeable non-low-rank delta without `convert_rank`.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, DeltaNameError, UnsupportedError
from ..core.tensors import LowRankDelta
from ..io.deferred import active, after_checks
from ..io.delta import Delta
from ..io.files import check_fits, fitted_state
from ..runtime import build_pieces
from .convert import pad_rank, truncate
from .direct import Layout, Plan, plan_for, read_direct, stamp_of

#: read buffers of dropped host entries kept for reuse (serve/pool.py, "read buffers")
SPARE_BUFFERS = 2
Factors = dict[str, tuple[Tensor, Tensor, float]]  # path -> (A [r, in], B [out, r], scale): ΔW = scale · B A


@dataclass(frozen=True)
class FileInfo:
    """What registration learned about one delta directory (shared by every registration of it)."""

    kind: str
    ranks: dict[str, int]          # module path -> rank of its update (fast) or of the conversion
    fast: bool
    nbytes: int                    # host bytes of the factors
    direct: Plan | None = None     # where its factors lie in its file (serve/direct.py), when they are stored as is


@dataclass
class Registered:
    """One registered name: the file it serves, its version (bumped by re-registering) and its path."""

    name: str
    path: Path
    version: int
    info: FileInfo
    convert_rank: int | None = None
    error: float | None = None     # the conversion's worst relative Frobenius error over modules (converted only)
    errors: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    @property
    def rank(self) -> int:
        return max(self.info.ranks.values())

    @property
    def policy(self) -> str:
        return "fast" if self.info.fast else "converted"


def _file_key(path: Path) -> tuple:
    return (str(path.resolve()), stamp_of(path))


class DeltaPool:
    """Registered deltas by name, and an LRU of their factors in host memory under `host_bytes`."""

    def __init__(self, model: nn.Module, skeleton: nn.Module, bank_shapes: dict[str, tuple[int, int]],
                 max_rank: int, host_bytes: int = 2 << 30, dtype: torch.dtype = torch.float32) -> None:
        self.model, self.skeleton, self.bank_shapes = model, skeleton, bank_shapes
        self.max_rank, self.host_bytes, self.dtype = max_rank, int(host_bytes), dtype
        self.entries: dict[str, Registered] = {}
        self._files: dict[tuple, FileInfo] = {}
        self._layouts: dict[str, Layout] = {}   # header SHA-256 -> factor layout, shared by files with that header
        self._host: OrderedDict[tuple[str, int], tuple[Factors, int, Tensor | None]] = OrderedDict()
        self._spare: list[Tensor] = []  # read buffers of dropped direct reads, reused (at most SPARE_BUFFERS)
        self.host_used = 0
        self.disk_reads = 0
        self._versions: dict[str, int] = {}
        self._lock = threading.RLock()

    # --- registration ------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, *, convert_rank: int | None = None) -> Registered:
        if not isinstance(name, str) or not name:
            raise DeltaNameError(f"a delta name must be a non-empty string, got {name!r}")
        if convert_rank is not None and (not isinstance(convert_rank, int) or isinstance(convert_rank, bool)
                                         or not 1 <= convert_rank <= self.max_rank):
            raise ConfigError(f"convert_rank must be a whole number in 1..{self.max_rank} (the engine's largest slot "
                              f"rank), got {convert_rank!r}")
        path = Path(path)
        from ..io.formats import format_of

        format_of(path)  # DeltaNotFoundError for a missing or unrecognised directory
        key = _file_key(path)
        info = self._files.get(key)
        if info is None:
            info = self._inspect(path, convert_rank)
            self._files[key] = info
        if not info.fast and convert_rank is None:
            raise UnsupportedError(self._convert_message(path, info.kind))
        if max(info.ranks.values()) > self.max_rank and info.fast:
            raise UnsupportedError(f"delta {str(path)!r} has rank {max(info.ranks.values())}, above the engine's largest "
                                   f"slot rank {self.max_rank}; add a rank bucket of at least that rank, or convert it")
        errors: dict[str, float] = {}
        if not info.fast:  # converted: the exact update is read now, and the error reported
            _, errors = self._convert(path, convert_rank)
            info = FileInfo(info.kind, {p: convert_rank for p in info.ranks}, False,
                            sum(convert_rank * sum(self.bank_shapes[p]) for p in info.ranks) * _size(self.dtype))
        with self._lock:
            version = self._versions.get(name, 0) + 1
            self._versions[name] = version
            old = self.entries.get(name)
            if old is not None:
                self._drop_host(old.key)
            entry = Registered(name, path, version, info, convert_rank if not info.fast else None,
                               max(errors.values()) if errors else None, errors)
            self.entries[name] = entry
        return entry

    def unregister(self, name: str) -> Registered:
        with self._lock:
            entry = self.get(name)
            del self.entries[name]
            self._drop_host(entry.key)
            return entry

    def get(self, name: str) -> Registered:
        try:
            return self.entries[name]
        except KeyError:
            raise DeltaNameError(f"no delta named {name!r} is registered ({len(self.entries)} are)") from None

    def _convert_message(self, path: Path, kind: str) -> str:
        return (f"delta {str(path)!r} ({kind}) is a weight update that is not low-rank and independent of the base, "
                f"so it has no factors for the device slots; register it with convert_rank=r to serve its exact update "
                f"truncated to rank r (the error is reported)")

    def _inspect(self, path: Path, convert_rank: int | None) -> FileInfo:
        stamp = stamp_of(path)  # before anything is read: a direct plan is made only for what was validated here
        delta = Delta.read_meta(path)
        check_fits(self.skeleton, delta)
        delta = delta.for_model(self.skeleton)
        built = build_pieces(self.skeleton, delta.config, list(delta.state))
        fast = True
        for mpath, _module, piece in built:
            fitted_state(repr(str(path)), mpath, piece, delta.state[mpath])  # the checks of dt.load
            cls = type(piece)
            if not cls.mergeable:
                raise UnsupportedError(f"delta {str(path)!r} ({delta.config.kind}) at {mpath!r} is not a weight update "
                                       f"(position {cls.position!r}); the serving engine serves weight updates only — "
                                       f"use dt.load on a model of its own")
            if mpath not in self.bank_shapes:
                raise UnsupportedError(f"delta {str(path)!r} adapts {mpath!r}, which has no bank in this engine (banks "
                                       f"cover the model's Linear/Conv1D layers outside the output head); it cannot be "
                                       f"served here")
            if cls.needs_base or cls.needs_shape:
                fast = False
        update = _meta_updates(path, delta, self.skeleton)
        ranks: dict[str, int] = {}
        for mpath in delta.state:
            if fast:
                dw, db = update(mpath, None)
                if not isinstance(dw, LowRankDelta):
                    fast = False
                else:
                    ranks[mpath] = dw.rank
                if db is not None:
                    raise UnsupportedError(f"delta {str(path)!r} changes the bias of {mpath!r}; the serving engine "
                                           f"adds weight updates only — bias changes are not served")
            else:
                ranks[mpath] = 0
        if not fast:
            for mpath in delta.state:
                if update(mpath, self.skeleton)[1] is not None:
                    raise UnsupportedError(f"delta {str(path)!r} changes the bias of {mpath!r}; the serving engine "
                                           f"adds weight updates only — bias changes are not served")
        nbytes = sum(r * sum(self.bank_shapes[p]) for p, r in ranks.items()) * _size(self.dtype)
        return FileInfo(delta.config.kind, ranks, fast, nbytes, plan_for(path, delta, self._layouts, stamp) if fast else None)

    def _convert(self, path: Path, rank: int) -> tuple[Factors, dict[str, float]]:
        delta = Delta.read(path).for_model(self.model)
        self.disk_reads += 1
        factors: Factors = {}
        errors: dict[str, float] = {}
        for mpath in delta.state:
            low, errors[mpath] = truncate(delta.update(mpath, self.model, with_bias=False)[0], rank)
            factors[mpath] = (*self._pad_to(mpath, low.A, low.B, rank), low.scale)
        return factors, errors

    def _pad_to(self, mpath: str, a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        a, b = pad_rank(a, b, rank)
        return a.to(self.dtype).contiguous(), b.to(self.dtype).contiguous()

    # --- host tier ---------------------------------------------------------------------------------
    def factors(self, entry: Registered) -> Factors:
        """The delta's factors in host memory (read from disk, with every check of `dt.load`, when not cached).
        Inside `deferred.checks_at_exit()` a large file's hash may still be running when this returns: the factors
        enter the host cache only once it matched, and the caller must not publish them before the block ends."""
        with self._lock:
            hit = self._host.get(entry.key)
            if hit is not None:
                self._host.move_to_end(entry.key)
                return hit[0]
        if not entry.info.fast:
            factors, buffer = self._convert(entry.path, entry.convert_rank)[0], None
        else:
            factors = buffer = None
            if entry.info.direct is not None:  # None back: changed since registration, so read in full
                direct = read_direct(entry.path, entry.info.direct, self._buffer)
                if direct is not None:
                    factors, buffer = direct
            if factors is None:
                delta = Delta.read(entry.path)
                factors = {mpath: (dw.A, dw.B, dw.scale) for mpath in delta.state for dw in [delta.update(mpath)[0]]}
            self.disk_reads += 1
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for a, b, _ in factors.values() for t in (a, b)}
        nbytes = sum(storages.values())
        recycle = active()  # a load's block: what this load drops may be reused once it has written its slot
        after_checks(lambda: self._keep(entry, factors, nbytes, buffer, recycle))  # once the file's hash matched
        return factors

    def _keep(self, entry: Registered, factors: Factors, nbytes: int, buffer: Tensor | None, recycle: bool) -> None:
        """Into the host cache (evicting the least recently used), or — too large, or replaced meanwhile — not kept.
        Inside a load's `checks_at_exit` block (the engine's `_load`: it runs when the block ends, after the factors
        were written to their slot) the read buffers dropped here are reused by the next read; outside one nothing
        is reused, since the caller still holds the factors."""
        with self._lock:
            if self.entries.get(entry.name) is entry and nbytes <= self.host_bytes:  # a replaced version is not kept
                while self.host_used + nbytes > self.host_bytes and self._host:
                    self._drop_host(next(iter(self._host)), recycle)
                self._host[entry.key] = (factors, nbytes, buffer)
                self.host_used += nbytes
            elif recycle:
                self._recycle(buffer)

    def _drop_host(self, key: tuple[str, int], recycle: bool = False) -> None:
        hit = self._host.pop(key, None)
        if hit is not None:
            self.host_used -= hit[1]
            if recycle:
                self._recycle(hit[2])

    # --- read buffers ------------------------------------------------------------------------------
    # A direct read (serve/direct.py) copies a file's data into one buffer; the factors are views of it. Fresh
    # buffers cost a page fault per 4 KiB page on first write, which in a busy engine process was measured at
    # 64 ms for a 19.5 MB SmolLM2 r=16 delta against 3 ms for the read itself; buffers that a load drops (not
    # kept, or evicted by it) are therefore reused (at most SPARE_BUFFERS, held beside the `host_bytes` budget).
    # Loads run one at a time under the engine's lock and each has copied its factors into its slot before the next
    # can reuse a buffer; factors returned by `factors` to a caller outside a load are never recycled under it,
    # but an entry evicted by a later load may be — such a caller must copy what it keeps.
    def _buffer(self, n: int) -> Tensor:
        with self._lock:
            for i, b in enumerate(self._spare):
                if b.numel() == n:
                    return self._spare.pop(i)
        return torch.empty(n, dtype=torch.uint8)

    def _recycle(self, buffer: Tensor | None) -> None:
        if buffer is not None:
            self._spare.append(buffer)
            del self._spare[:-SPARE_BUFFERS]

    @property
    def host_cached(self) -> list[tuple[str, int]]:
        return list(self._host)


def _meta_updates(path: Path, delta: Delta, skeleton: nn.Module):
    """`update(module, base)` → (ΔW, Δb) of `delta` (read with meta tensors), computed on the meta tensors; a kind whose
    update reads stored values (VeRA and RandLoRA read their saved shapes) cannot be computed there, so the delta's
    tensors are then read once, at registration, and the update computed from them (with every check of dt.load)."""
    full: list[Delta] = []

    def update(mpath: str, base):
        if not full:
            try:
                return delta.update(mpath, base)
            except (RuntimeError, NotImplementedError) as e:  # a value of a meta tensor was asked for
                if "meta" not in str(e).lower():
                    raise
                full.append(Delta.read(path).for_model(skeleton))
        return full[0].update(mpath, base)

    return update


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

