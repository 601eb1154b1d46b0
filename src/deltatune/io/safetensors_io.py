"""Reading safetensors safely: the file is memory-mapped and checked before any tensor is read.

`read_tensors` compares the file's size with what the caller's manifest records (delta.json) before it maps
anything, parses the header with the bounded JSON reader, checks that the tensors tile the data exactly (no gaps,
no overlaps, nothing past the end, sizes that fit dtype and shape), and verifies a recorded SHA-256 on the same
mapping the tensors are copied from: before the copy for small files, beside it (a second thread) for large ones,
and no tensor is returned before its hash matched (inside `deferred.checks_at_exit()`: before that block ends
without an error). A 1 GiB file where 1 KiB is expected is refused after one `fstat`; a damaged header costs the
header's bytes. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import stat
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from ..core.errors import CorruptFileError, DeltaNotFoundError, NonFiniteError
from ..core.parsing import load_json, short
from .deferred import settle

T = TypeVar("T")
#: the largest header accepted (the safetensors format's own limit)
MAX_HEADER_BYTES = 100 << 20
#: safetensors dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_tensors(path: Path, *, size: int | None = None, sha256: str | None = None, manifest: str = "",
                 header_only: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of the safetensors file at `path` and its metadata. `size` / `sha256`, when given, are what a
    manifest (named by `manifest` in messages) records: the file must have exactly that size (checked before it is
    read) and hash. With `header_only`, the tensors are meta tensors (names, shapes, dtypes) from the checked header:
    no tensor data is read and the hash is not checked. From `HASH_BESIDE_BYTES` on, the hash runs in a second
    thread from the moment the file is mapped; the read returns after it matched, or, inside
    `deferred.checks_at_exit()`, hands the check to that block."""
    where = repr(str(path))
    mm, actual = _map(Path(path), where, size, manifest)

    def read() -> tuple[dict[str, Tensor], dict[str, str]]:
        header, start = _header(mm, actual, where)
        metadata = header.pop("__metadata__", {})
        if header_only:
            return {key: torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]], device="meta")
                    for key, entry in header.items()}, metadata
        return {key: _tensor(mm, start, entry) for key, entry in header.items()}, metadata

    return _hashed(mm, actual, None if header_only else sha256, where, manifest, read)


def read_data(path: Path, *, size: int, sha256: str, manifest: str = "",
              alloc: Callable[[int], Tensor] | None = None) -> tuple[bytes, Tensor]:
    """The raw header bytes and a copy of the data bytes (one uint8 tensor) of the safetensors file at `path`, which
    must have exactly `size` bytes and the SHA-256 `sha256`. The data is read with `preadv` straight into the
    tensor (no mapping: a freshly written file's pages are not faulted in one by one). The hash is computed over
    the header and the copy itself (so the bytes the caller uses are the bytes checked), in a second thread from
    HASH_BESIDE_BYTES on — piece by piece as the data arrives (READ_PIECE_BYTES at a time), so the hash has started
    before the read ends — settled through `deferred` like `read_tensors`' check. The header is not parsed: the
    caller compares it with a header it checked before (the serving engine's registration). `alloc(n)`, when given,
    supplies the uint8 buffer of n bytes to read into (the engine recycles buffers whose pages are already mapped:
    faulting in fresh pages cost more than the read itself in a busy process)."""
    where = repr(str(path))
    fd = _open(Path(path), where)
    try:
        actual = _checked_size(fd, where, size, manifest)
        n = int.from_bytes(_pread(fd, 0, memoryview(bytearray(8)), where), "little")
        if n > actual - 8 or n > MAX_HEADER_BYTES or n < 2:
            raise _corrupt(where, f"its header length {n} does not fit a file of {actual} bytes")
        head = bytes(_pread(fd, 0, memoryview(bytearray(8 + n)), where))
        data = (alloc or _empty_bytes)(actual - 8 - n)
        view = memoryview(data.numpy())
        if actual < HASH_BESIDE_BYTES:
            _pread(fd, 8 + n, view, where)
            digest = _Digest([head, view], beside=False)
        else:  # hashed as it arrives: the second thread hashes each piece while the next one is read
            pieces: queue.SimpleQueue = queue.SimpleQueue()
            digest = _Digest(_arriving(head, pieces))
            try:
                for at in range(0, len(view), READ_PIECE_BYTES):
                    pieces.put(_pread(fd, 8 + n + at, view[at:at + READ_PIECE_BYTES], where))
            except BaseException:  # no hashing thread outlives a failed read
                pieces.put(None)
                digest.join()
                raise
            pieces.put(None)
    finally:
        os.close(fd)

    def finish() -> None:
        digest.join()
        _check_hash(digest.value, sha256, where, manifest)

    settle(finish)
    return head[8:], data


def _arriving(head: bytes, pieces: queue.SimpleQueue):
    """`head`, then each piece put into `pieces` until None."""
    yield head
    while (piece := pieces.get()) is not None:
        yield piece


def _empty_bytes(n: int) -> Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _pread(fd: int, offset: int, into: memoryview, where: str) -> memoryview:
    """Fill `into` from the file at `offset` (however many reads it takes); the file ending first is an error."""
    got = 0
    while got < len(into):
        k = os.preadv(fd, [into[got:]], offset + got)
        if k == 0:
            raise _corrupt(where, f"it ended at byte {offset + got} while being read (it was changed meanwhile)")
        got += k
    return into


def _checked_size(fd: int, where: str, size: int | None, manifest: str) -> int:
    """The open file's size, which must be `size` when given, and at least a header's length."""
    actual = os.fstat(fd).st_size
    if size is not None and actual != size:
        raise CorruptFileError(f"{where} is {actual} bytes but {manifest or 'its manifest'} records {size}; "
                               f"the file was truncated, modified or belongs to another save — it was not read")
    if actual < 8:
        raise _corrupt(where, f"it is {actual} bytes long, shorter than a safetensors header")
    return actual


def _map(path: Path, where: str, size: int | None, manifest: str) -> tuple[mmap.mmap, int]:
    """A private mapping of the file at `path` (which must have `size` bytes when given) and its size."""
    fd = _open(path, where)
    try:
        actual = _checked_size(fd, where, size, manifest)
        return mmap.mmap(fd, actual, access=mmap.ACCESS_COPY), actual  # private pages: tensors never alias the file
    finally:
        os.close(fd)  # the mapping holds its own descriptor


def _hashed(mm: mmap.mmap, actual: int, sha256: str | None, where: str, manifest: str, read: Callable[[], T]) -> T:
    """`read()` from the mapping with its SHA-256 checked against `sha256` (when given): before the read for small
    files, beside it from HASH_BESIDE_BYTES on — then the check is settled through `deferred` (now, or at the end of
    an enclosing `checks_at_exit` block). The mapping is closed once the hash is done."""
    beside = sha256 is not None and actual >= HASH_BESIDE_BYTES
    digest = _Digest([mm] if beside else None)

    def finish() -> None:
        digest.join()
        mm.close()
        if beside:
            _check_hash(digest.value, sha256, where, manifest)

    try:
        if sha256 is not None and not beside:
            _check_hash(hashlib.sha256(mm).hexdigest(), sha256, where, manifest)
        out = read()
    except BaseException:
        finish()  # a hash mismatch is reported in preference to whatever the copy made of a changed file
        raise
    if beside:
        settle(finish)
    else:
        finish()
    return out


#: from this size on, a file's hash is computed in a second thread while its tensors are copied out (hashlib and
#: torch's copies both release the GIL); the tensors are returned only after the hash matched
HASH_BESIDE_BYTES = 4 << 20
#: `read_data` reads in pieces of this size, each hashed while the next is read
READ_PIECE_BYTES = 2 << 20


class _Digest:
    """The SHA-256 of a sequence of buffers, computed in a second thread started at once (with `beside`; else now;
    nothing when `parts` is None); `join` waits for it — the caller joins before it releases the buffers."""

    def __init__(self, parts: list | None, beside: bool = True) -> None:
        self.parts, self.value = parts, None
        self.worker = None
        if parts is not None and beside:
            self.worker = threading.Thread(target=self._run, name="deltatune-sha256", daemon=True)
            self.worker.start()
        elif parts is not None:
            self._run()

    def _run(self) -> None:
        h = hashlib.sha256()
        for part in self.parts:
            h.update(part)
        self.value = h.hexdigest()

    def join(self) -> None:
        if self.worker is not None:
            self.worker.join()


def _check_hash(actual: str | None, expected: str, where: str, manifest: str) -> None:
    if actual != expected:
        raise CorruptFileError(f"{where} does not match the SHA-256 hash recorded in {manifest or 'its manifest'}"
                               f"; the file was modified, damaged or belongs to another save")


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The checked tensor table ({key: dtype, shape, data_offsets}, metadata left out) of the safetensors file at
    `path` and the offset where its data starts; only the header's pages are read."""
    path = Path(path)
    where = repr(str(path))
    fd = _open(path, where)
    try:
        actual = os.fstat(fd).st_size
        if actual < 8:
            raise _corrupt(where, f"it is {actual} bytes long, shorter than a safetensors header")
        with mmap.mmap(fd, actual, access=mmap.ACCESS_READ) as mm:
            header, start = _header(mm, actual, where)
    finally:
        os.close(fd)
    header.pop("__metadata__", None)
    return header, start


def _open(path: Path, where: str) -> int:
    """A read-only descriptor of the regular file at `path`, or the typed error saying why there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DeltaNotFoundError(f"tensor file {where} does not exist") from None
    except IsADirectoryError:
        raise CorruptFileError(f"tensor file {where} is a directory") from None
    except OSError as e:
        raise CorruptFileError(f"tensor file {where} cannot be opened ({e.strerror or e})") from None
    except ValueError:  # a NUL character in the name
        raise CorruptFileError(f"tensor file {where} is not a valid file name") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptFileError(f"tensor file {where} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _corrupt(where: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{where} is not a readable safetensors file ({why}); the file is truncated or corrupt "
                            f"— save the delta again")


def _header(mm: mmap.mmap, actual: int, where: str) -> tuple[dict[str, Any], int]:
    """The checked tensor table of a mapped safetensors file and where its data starts."""
    n = int.from_bytes(mm[:8], "little")
    if n > actual - 8 or n > MAX_HEADER_BYTES or n < 2:
        raise _corrupt(where, f"its header length {n} does not fit a file of {actual} bytes")
    header = load_json(mm[8:8 + n], f"the header of {where}")
    if not isinstance(header, dict):
        raise _corrupt(where, f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(where, f"its __metadata__ must map strings to strings, got {short(metadata)}")
    data = actual - 8 - n
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _corrupt(where, f"tensor {short(key)}: expected dtype, shape and data_offsets, got {short(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise _corrupt(where, f"tensor {short(key)} has dtype {short(dtype)}; known: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt(where, f"tensor {short(key)} has shape {short(shape)}; expected a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise _corrupt(where, f"tensor {short(key)} has data_offsets {short(offsets)} outside the {data} data bytes")
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * DTYPES[dtype].itemsize:
            raise _corrupt(where, f"tensor {short(key)} spans {offsets[1] - offsets[0]} bytes, but {count} x {dtype} "
                                  f"take {count * DTYPES[dtype].itemsize}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            raise _corrupt(where, f"its tensors {'overlap' if begin < end else 'leave a gap'} at byte {min(begin, end)} "
                                  f"(tensor {short(key)})")
        end = stop
    if end != data:
        raise _corrupt(where, f"its tensors cover {end} of the {data} data bytes")
    return header, 8 + n


def _tensor(mm: mmap.mmap, start: int, entry: dict[str, Any]) -> Tensor:
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    if begin == end:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin) \
        .reshape(shape).clone()


def _all_finite(floats: list[Tensor]) -> bool:
    """True when every value is finite, in one fused pass per dtype: a norm is finite only if every entry is (a
    finite tensor whose norm overflows reads as not finite, and the caller then checks tensor by tensor)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in floats:
        by_dtype.setdefault(t.dtype, []).append(t)
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group))).all()) for group in by_dtype.values())


def check_finite(tensors: dict[str, Tensor], where: str) -> None:
    floats = [t for t in tensors.values() if t.is_floating_point() and not t.is_meta and t.numel()]  # meta: header only
    if floats and all(t.device == floats[0].device for t in floats) and _all_finite(floats):
        return
    for key, t in tensors.items():
        if t.is_meta:  # read from the header only: the values are checked when the data is read
            continue
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"tensor {key!r} in {where} holds {bad} NaN/inf value(s); "
                                 f"the delta diverged or the file is damaged — it was not loaded")
