"""The CPU routing kernel (grouped_add.cpp beside this file): built once with torch's C++ extension loader, cached,
loaded by later processes; and the test of whether a forward can use it.

Built with the machine's C++ compiler for this CPU (`-O3 -march=native`; torch's loader needs ninja and setuptools
too) under `cache_home("kernels")` — `$DELTATUNE_HOME/kernels`, else `$XDG_CACHE_HOME/deltatune/kernels`, else
`~/.cache/deltatune/kernels` — in a folder named for the source, torch's version and this CPU's instruction sets,
so a copy built for another CPU is never loaded. The first build takes about 20 s (an `Engine` on the CPU with
float32/float64 weights builds it when it is created, never inside a forward; `make setup` builds it ahead); later
processes import the built library directly. Where it cannot be had (no compiler or ninja, a failed build,
`DELTATUNE_KERNEL=0`) `load()` warns once, with the build's own last words, and returns None from then on;
routing then uses torch ops (serve/routing.py): the same sums, slower."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..zoo.paths import cache_home

SOURCE = Path(__file__).with_name("grouped_add.cpp")
#: the largest bank rank the kernel takes (its per-token sums live on the stack); larger buckets use torch ops
MAX_RANK = 256
STALE_LOCK_SECONDS = 600  # a build lock older than this was left by a killed build (a build takes about 20 s)
_LOCK = threading.Lock()
_STATE: dict[str, ModuleType | None] = {}
log = logging.getLogger("deltatune.serve")


def _cpu_tag() -> str:
    """The instruction sets this CPU has (x86 `flags` / Arm `Features` of /proc/cpuinfo), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build() -> ModuleType:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_tag().encode()).hexdigest()[:12]
    name = f"deltatune_grouped_add_{digest}"
    folder = cache_home("kernels") / name
    library = folder / f"{name}.so"
    if library.exists():  # built before: imported as it is (no compiler or ninja needed)
        try:
            return _import(name, library)
        except ImportError:  # a build cut short: build again
            pass
    from torch.utils.cpp_extension import load as load_extension

    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:  # else torch's loader waits forever
        log.warning("removing the stale build lock %s (left by a build that was killed)", lock)
        lock.unlink(missing_ok=True)
    log.warning("building the serving engine's routing kernel in %s (once, about 20 s)", folder)
    return load_extension(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                          extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


def load() -> ModuleType | None:
    """The compiled kernel, building it if needed (tried once per process); None where it cannot be had."""
    with _LOCK:
        if "module" not in _STATE:
            module = None
            if os.environ.get("DELTATUNE_KERNEL", "1") == "0":
                reason = "DELTATUNE_KERNEL=0"
            else:
                try:
                    module, reason = _build(), ""
                except Exception as e:  # no compiler, no ninja, a failed build: torch ops instead
                    text = " ".join(str(e).split())
                    reason = f"{type(e).__name__}: …{text[-600:]}" if len(text) > 600 else f"{type(e).__name__}: {text}"
            _STATE["module"] = module
            if module is None:
                warnings.warn(f"the serving engine's routing kernel is not used ({reason}); tokens are routed with "
                              f"torch ops (slower)", stacklevel=2)
        return _STATE["module"]


def loaded() -> bool:
    """Whether the kernel is loaded in this process (never builds it)."""
    return _STATE.get("module") is not None


def suits(banks_dtype: torch.dtype, rank: int, device: torch.device) -> bool:
    """Whether a bucket of banks with this dtype, rank and device can take the kernel (when it is loaded)."""
    return device.type == "cpu" and banks_dtype in (torch.float32, torch.float64) and 1 <= rank <= MAX_RANK


def usable(x: Tensor, out: Tensor, at: Tensor, bt: Tensor) -> ModuleType | None:
    """The loaded kernel if these tensors suit it (CPU, one dtype of float32/float64, rows with unit stride, a rank
    it takes); never builds it."""
    module = _STATE.get("module")
    if module is None or not suits(at.dtype, at.shape[-1], x.device):
        return None
    if not (x.dtype == out.dtype == at.dtype == bt.dtype) or x.stride(-1) != 1 or out.stride(-1) != 1:
        return None
    return module


def main() -> int:
    """Build (or find) the kernel now and say where it is, or why not; exit status 1 when it is not built."""
    module = load()
    print(f"routing kernel: {module.__file__}" if module is not None else
          "routing kernel: not built; the serving engine routes with torch ops")
    return 0 if module is not None else 1
