"""Quantised linear layers (bitsandbytes `Linear4bit` NF4/FP4 and `Linear8bitLt`): recognising, dequantising and
requantising their weights, and `quantize`, which puts them into a model in place (docs/quantization.md).

bitsandbytes is optional (the `quant` extra). Nothing here imports it at import time: a quantised module is
recognised by the class name of its weight parameter (`Params4bit`, `Int8Params`), and bitsandbytes is imported only
to dequantise, requantise or quantise, when such a module (which came from bitsandbytes) is already in hand or
`quantize` is called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import MissingDependencyError, TargetError

INSTALL_HINT = ("pip install 'bitsandbytes==0.50.2' (or pip install -e '.[quant]'; `make setup` / `make test` install "
                "it)")
SCHEMES = ("nf4", "fp4", "int8")


def bnb() -> Any:
    """The bitsandbytes module, or MissingDependencyError naming how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - exercised with the import blocked
        raise MissingDependencyError(f"quantised bases need bitsandbytes, which is not installed ({e}); "
                                     f"{INSTALL_HINT}") from None
    return bitsandbytes


def quant_kind(module: nn.Module) -> str | None:
    """"4bit" for a bitsandbytes Linear4bit, "8bit" for a Linear8bitLt holding int8 weights, else None. Decided from
    the weight parameter's class name, so bitsandbytes is never imported here."""
    w = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    name = type(w).__name__ if w is not None else ""
    if name == "Params4bit" and getattr(w, "quant_state", None) is not None:
        return "4bit"
    if name == "Int8Params" and w.dtype == torch.int8:
        return "8bit"
    if name in ("Params4bit", "Int8Params"):
        raise TargetError(f"{type(module).__name__} holds a {name} weight that is not quantised yet; move the module to "
                          f"its device first (module.to('cpu')), which quantises it")
    return None


def dequantized(module: nn.Module) -> Tensor:
    """The weight of a quantised linear as a dense [out, in] tensor (4-bit: in the dtype it was quantised from;
    8-bit: float32). A new tensor: writing it changes nothing."""
    kind = quant_kind(module)
    w = module.weight
    if kind == "4bit":
        qs = w.quant_state
        if getattr(qs, "packing_format_for_cpu", False):  # bitsandbytes repacked it for its CPU inference kernel
            return _dequantize_cpu_packed(w)
        return bnb().functional.dequantize_4bit(w.data, qs)
    if kind == "8bit":
        return w.data.float() * (_scb(module).float()[:, None] / 127.0)
    raise TargetError(f"{type(module).__name__} is not a quantised linear layer")


def _dequantize_cpu_packed(w: Tensor) -> Tensor:
    """The weight bitsandbytes' AVX512-BF16 kernel computes with once it has repacked a Linear4bit (it does so in
    place on the first inference forward: absmax then in bfloat16, laid out [in / blocksize, out])."""
    import copy
    fn = bnb().functional
    qs = copy.deepcopy(w.quant_state)
    qs.original_nested = False  # keep the float absmax the kernel uses; the inverse would requantise it
    data, qs = fn._convert_weight_packed_for_cpu_inverse(w.data.clone(), qs)
    qs.absmax = w.quant_state.absmax.t().reshape(-1).float()
    qs.nested = False
    return fn.dequantize_4bit(data, qs)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the quantised module computes in (its dequantised view's dtype)."""
    if quant_kind(module) == "4bit":
        return module.compute_dtype or module.weight.quant_state.dtype
    return torch.float32


@dataclass(frozen=True)
class QuantizedWeight:
    """The exact stored state of a quantised weight: what `restore` puts back bit for bit."""

    data: Tensor
    extra: dict[str, Any]


def snapshot(module: nn.Module) -> QuantizedWeight:
    w = module.weight
    if quant_kind(module) == "4bit":
        import copy
        return QuantizedWeight(w.data.clone(), {"quant_state": copy.deepcopy(w.quant_state)})
    return QuantizedWeight(w.data.clone(), {"SCB": _scb(module).clone()})


def restore(module: nn.Module, saved: QuantizedWeight) -> None:
    """Put back a `snapshot` exactly (the weight parameter keeps its identity)."""
    w = module.weight
    w.data = saved.data.clone()
    if "quant_state" in saved.extra:
        import copy
        w.quant_state = copy.deepcopy(saved.extra["quant_state"])
    else:
        _set8(module, w.data, saved.extra["SCB"].clone())


def _scb(module: nn.Module) -> Tensor:
    """The per-row scales of a Linear8bitLt: on the weight until its first forward, then on `module.state`."""
    scb = getattr(module.weight, "SCB", None)
    return scb if scb is not None else module.state.SCB


def _set8(module: nn.Module, cb: Tensor, scb: Tensor) -> None:
    """Store int8 rows and scales the way a freshly quantised Linear8bitLt holds them (its next forward moves them to
    `module.state`)."""
    w = module.weight
    w.data = cb
    w.CB, w.SCB = w.data, scb
    state = getattr(module, "state", None)
    if state is not None:
        state.CB = state.SCB = None


@torch.no_grad()
def requantize(module: nn.Module, weight: Tensor) -> None:
    """Store the dense [out, in] `weight` in the module, quantised with the module's own scheme (quant type, block
    size, double quantisation); the weight parameter keeps its identity."""
    lib = bnb()
    w = module.weight
    if quant_kind(module) == "4bit":
        qs = w.quant_state
        dtype = qs.dtype
        new = lib.nn.Params4bit(weight.to(dtype).contiguous(), requires_grad=False, quant_type=qs.quant_type,
                                blocksize=qs.blocksize, compress_statistics=qs.nested,
                                quant_storage=w.quant_storage).to(w.device)
        w.data, w.quant_state = new.data, new.quant_state
    else:
        cb, scb, _ = lib.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())  # as Int8Params does
        _set8(module, cb, scb)
