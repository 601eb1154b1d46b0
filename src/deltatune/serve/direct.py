"""The direct hot load: a native delta file's factors copied out of their byte ranges, without building a Delta.

At registration (`plan_for`), a fast delta in the native format whose every update is a `LowRankDelta` made of two
of its stored tensors as they are (`Delta.update` returns the file's own tensors with a scale — the low-rank kinds
whose factors are stored, e.g. LoRA and rsLoRA) gets a plan: per module, where A and B lie in the file's data, and
the scale. The layout part is shared by every file with the same header (same tensor names, shapes and offsets:
every delta of one recipe), keyed by the header's SHA-256, so a registry of many such deltas holds it once.

At a hot load (`read_direct`) the tensor file's data is read into one buffer and its hash computed beside the
caller's work (settled through `io.deferred`, like every read), its raw header is compared with the plan's digest — a file whose directory
or header changed since registration gets None, and the caller takes the full read, which checks everything again
— its values are checked finite, and the factors are views of the copied data. Other deltas (converted, factors
computed from stored tensors, other formats) take the full read (`Delta.read` + `Delta.update`)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..core.errors import NonFiniteError
from ..core.parsing import read_json
from ..io.delta import Delta
from ..io.formats import format_of
from ..io.native import CONFIG_FILE, TENSOR_FILE
from ..io.safetensors_io import DTYPES, check_finite, read_data, read_header


@dataclass(frozen=True)
class Span:
    """One factor's place in the data: its tensor's key, bytes [begin, end), dtype and shape."""

    key: str
    begin: int
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, data: Tensor) -> Tensor:
        return data[self.begin:self.end].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Layout:
    """Where every module's A and B lie in files with one header (shared by all of them)."""

    header_sha256: str
    spans: tuple[tuple[str, Span, Span], ...]   # (module path, A, B)
    dtype: torch.dtype | None                   # the one dtype of every tensor in the file, when there is one


@dataclass(frozen=True)
class Plan:
    """One file's direct load: its tensor file as delta.json records it (name, size, hash), the shared layout,
    one scale per module (in the layout's order), and the directory's state at registration."""

    tensor_file: str
    size: int
    sha256: str
    layout: Layout
    scales: tuple[float, ...]
    stamp: tuple


def stamp_of(path: Path) -> tuple:
    """The directory's files with sizes, modification times and inodes: any save or replacement changes it."""
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode()) for e in os.scandir(path)
                        if e.is_file()))


def plan_for(path: Path, delta: Delta, layouts: dict[str, Layout], stamp: tuple) -> Plan | None:
    """The direct plan of the fast delta `delta` (read with meta tensors from `path`, whose `stamp_of` was `stamp`
    before it was read), or None when it has none — or when the directory changed since `stamp` (what was validated
    may not be what is there). `layouts` (header SHA-256 → Layout) is shared between calls."""
    if format_of(path).name != "native" or stamp_of(path) != stamp:
        return None
    record = read_json(path / CONFIG_FILE).get("tensors")
    if not (isinstance(record, dict) and type(record.get("bytes")) is int and isinstance(record.get("sha256"), str)):
        return None  # changed since it was validated: the full read will say what is wrong
    name = record.get("file", TENSOR_FILE)
    if not (isinstance(name, str) and Path(name).name == name and name.endswith(".safetensors")
            and not name.startswith(".")):
        return None
    tensor_file = path / name
    header, start = read_header(tensor_file)
    with open(tensor_file, "rb") as f:
        raw = f.read(start)[8:]
    digest = hashlib.sha256(raw).hexdigest()
    dtypes = {entry["dtype"] for entry in header.values()}
    layout = layouts.get(digest)
    spans, scales = [], []
    for mpath, stored in delta.state.items():
        try:
            dw, _ = delta.update(mpath)
        except (RuntimeError, NotImplementedError):  # an update that reads stored values: not a plain copy
            return None
        keys = [next((k for k, t in stored.items() if t is f), None) for f in (dw.A, dw.B)]
        if None in keys or not isinstance(dw.scale, (int, float)):
            return None  # its factors are computed from what is stored: the full read builds them
        pair = []
        for k in keys:
            entry = header.get(f"{mpath}.{k}")
            if entry is None:
                return None
            dtype = DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            if begin % dtype.itemsize:
                return None  # an unaligned tensor cannot be viewed in place
            pair.append(Span(f"{mpath}.{k}", begin, end, dtype, tuple(entry["shape"])))
        spans.append((mpath, *pair))
        scales.append(float(dw.scale))
    if layout is None:
        layout = Layout(digest, tuple(spans), DTYPES[dtypes.pop()] if len(dtypes) == 1 else None)
        layouts[digest] = layout
    elif layout.spans != tuple(spans):  # the same header read as other modules: not the plan to share
        return None
    if stamp_of(path) != stamp:  # changed while it was planned
        return None
    return Plan(name, int(record["bytes"]), record["sha256"], layout, tuple(scales), stamp)


def read_direct(path: Path, plan: Plan, alloc=None) -> tuple[dict[str, tuple[Tensor, Tensor, float]], Tensor] | None:
    """The delta's factors {module: (A, B, scale)} as views of one copy of its data, and that copy (read into
    `alloc(n)` when given), or None when the directory or the file's header changed since registration (the caller
    then reads it in full). Raises CorruptFileError when
    the data's hash does not match delta.json's (at the end of an enclosing `checks_at_exit` block) and
    NonFiniteError for NaN/inf values."""
    if stamp_of(path) != plan.stamp:
        return None
    tensor_file = path / plan.tensor_file
    raw, data = read_data(tensor_file, size=plan.size, sha256=plan.sha256, manifest="delta.json", alloc=alloc)
    layout = plan.layout
    if hashlib.sha256(raw).hexdigest() != layout.header_sha256:
        return None
    factors = {mpath: (a.view(data), b.view(data), scale) for (mpath, a, b), scale in zip(layout.spans, plan.scales)}
    whole = layout.dtype is not None and layout.dtype.is_floating_point and data.numel() % layout.dtype.itemsize == 0
    if whole and bool(torch.isfinite(data.view(layout.dtype).sum())):
        return factors, data  # a sum is finite only if every value is (NaN and inf propagate); an overflow checks below
    check_finite({span.key: span.view(data) for _, *pair in layout.spans for span in pair}, str(tensor_file))
    if whole and not bool(torch.isfinite(data.view(layout.dtype)).all()):  # a value outside the factors
        raise NonFiniteError(f"{str(tensor_file)!r} holds NaN/inf value(s) outside the factors; the file is damaged — "
                             f"it was not loaded")
    return factors, data
