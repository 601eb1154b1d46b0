"""The routing kernel for CPU decode (grouped_add.cpp beside this file), built on first use with torch's C++
extension loader and cached, and the test of whether a forward can use it.

Built with the machine's C++ compiler for this CPU (`-O3 -march=native`), under
`$DELTATUNE_HOME/kernels` (else `$XDG_CACHE_HOME/deltatune/kernels`, else `~/.cache/deltatune/kernels`), in a
folder named for the source, torch's version and this CPU's instruction sets: a copy built for another CPU is
never loaded. The first build takes about 20 s (an `Engine` on the CPU builds it when it is created, never inside a
forward); later processes load the cached library. Where it cannot be built (no compiler, `DELTATUNE_KERNEL=0`)
`load()` returns None once, with a warning naming the reason, and routing uses torch ops (serve/routing.py):
the same results, slower for decode over many deltas (docs/serving.md)."""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("grouped_add.cpp")
_LOCK = threading.Lock()
_STATE: dict[str, ModuleType | None] = {}


def kernels_home() -> Path:
    if home := os.environ.get("DELTATUNE_HOME"):
        return Path(home).expanduser() / "kernels"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "deltatune" / "kernels"


def _cpu_tag() -> str:
    """The instruction sets this CPU has (x86 `flags` / Arm `Features` of /proc/cpuinfo), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_tag().encode()).hexdigest()[:12]
    name = f"deltatune_grouped_add_{digest}"
    folder = kernels_home() / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / f"{name}.so").exists():
        logging.getLogger("deltatune.serve").info("building the serving engine's routing kernel in %s (once, about "
                                                  "20 s)", folder)
    return load_extension(name, [str(SOURCE)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
                          extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)


def load() -> ModuleType | None:
    """The compiled kernel, building it if needed (once per process); None where it cannot be had."""
    with _LOCK:
        if "module" not in _STATE:
            module = None
            if os.environ.get("DELTATUNE_KERNEL", "1") == "0":
                warnings.warn("DELTATUNE_KERNEL=0: the serving engine routes decode tokens with torch ops (slower)")
            else:
                try:
                    module = _build()
                except Exception as e:  # no compiler, no ninja, a failed build: torch ops instead
                    warnings.warn(f"the serving engine's routing kernel could not be built ({type(e).__name__}: "
                                  f"{str(e)[:300]}); decode tokens are routed with torch ops (slower)")
            _STATE["module"] = module
        return _STATE["module"]


def loaded() -> bool:
    """Whether the kernel is loaded in this process (never builds it)."""
    return _STATE.get("module") is not None


def usable(x: Tensor, out: Tensor, at: Tensor, bt: Tensor) -> ModuleType | None:
    """The loaded kernel if these tensors suit it (CPU, one dtype of float32/float64, rows with unit stride);
    never builds it."""
    module = _STATE.get("module")
    if module is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    if not (x.dtype == out.dtype == at.dtype == bt.dtype) or x.stride(-1) != 1 or out.stride(-1) != 1:
        return None
    return module


def main() -> int:
    """`python -m deltatune.serve.kernel`: build (or find) the kernel now; says where, or why not (`make setup`)."""
    module = load()
    print(f"routing kernel: {module.__file__}" if module is not None else
          "routing kernel: not built; the serving engine routes with torch ops")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
