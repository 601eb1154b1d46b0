"""Handing freed heap memory back to the operating system.

glibc keeps memory that Python and torch free in its heaps for reuse; after the engine replaces a large buffer (a
wider KV arena) or churns through many transient tensors of varying sizes (prefill chunks), the pages it keeps are
counted in the process's RSS although nothing uses them. `malloc_trim(0)` returns every whole free page of every
heap. Elsewhere (another C library, another OS) there is nothing to call and `trim` does nothing."""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return the heaps' free pages to the OS; True when something was returned (False: nothing, or no glibc)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
