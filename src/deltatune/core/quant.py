"""Quantised linear layers (bitsandbytes `Linear4bit` NF4/FP4 and `Linear8bitLt`; an `nn.Linear` whose weight is a
torchao `Int8Tensor`, from `quantize_(model, Int8WeightOnlyConfig())`): recognising, dequantising and requantising
their weights (docs/quantization.md).

torchao is optional too, and recognised the same way: by its weight's class (`Int8Tensor` from a `torchao` module);
requantising uses that class's own `from_hp`, so torchao is never imported here.

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
    """"4bit" for a bitsandbytes Linear4bit, "8bit" for a Linear8bitLt holding int8 weights, "torchao" for a linear
    whose weight is a torchao Int8Tensor, else None. Decided from the weight parameter's class, so neither library is
    imported here."""
    w = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    name = type(w).__name__ if w is not None else ""
    if type(w).__module__.split(".")[0] == "torchao":
        if name == "Int8Tensor" and w.dim() == 2 and isinstance(module, nn.Linear):
            return "torchao"
        raise TargetError(f"{type(module).__name__} holds a torchao {name} weight; deltatune supports torchao's int8 "
                          f"weights on nn.Linear (Int8WeightOnlyConfig) only (docs/quantization.md)")
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
    if kind == "torchao":
        return w.dequantize()
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
    kind = quant_kind(module)
    if kind == "4bit":
        return module.compute_dtype or module.weight.quant_state.dtype
    if kind == "torchao":
        return module.weight.dtype  # the dtype it was quantised from, which its forward computes in
    return torch.float32


@dataclass(frozen=True)
class QuantizedWeight:
    """The exact stored state of a quantised weight: what `restore` puts back bit for bit."""

    data: Tensor
    extra: dict[str, Any]


def snapshot(module: nn.Module) -> QuantizedWeight:
    w = module.weight
    kind = quant_kind(module)
    if kind == "torchao":  # requantize replaces the parameter and never writes it: keeping it keeps its bytes
        return QuantizedWeight(module._parameters["weight"], {"torchao": True})
    if kind == "4bit":
        import copy
        return QuantizedWeight(w.data.clone(), {"quant_state": copy.deepcopy(w.quant_state)})
    return QuantizedWeight(w.data.clone(), {"SCB": _scb(module).clone()})


def restore(module: nn.Module, saved: QuantizedWeight) -> None:
    """Put back a `snapshot` exactly (the weight parameter keeps its identity)."""
    if "torchao" in saved.extra:
        module._parameters["weight"] = saved.data
        return
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
    size, double quantisation); the weight parameter keeps its identity (torchao: a new parameter replaces it, the
    old one is left as it was, for `restore`)."""
    w = module.weight
    if quant_kind(module) == "torchao":
        _requantize_torchao(module, weight)
        return
    lib = bnb()
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


def _requantize_torchao(module: nn.Module, weight: Tensor) -> None:
    """A torchao Int8Tensor of `weight` with the stored one's block size, zero points (symmetric or not) and
    activation settings, in a new frozen parameter."""
    from torchao.quantization.granularity import PerBlock  # present: the module's weight came from torchao
    from torchao.quantization.quant_primitives import MappingType

    w = module.weight
    asym = w.zero_point is not None and bool((w.zero_point != 0).any())
    new = type(w).from_hp(weight.detach().to(w.dtype).contiguous(), granularity=PerBlock(tuple(w.block_size)),
                          mapping_type=MappingType.ASYMMETRIC if asym else MappingType.SYMMETRIC,
                          act_quant_kwargs=w.act_quant_kwargs, reduce_range=w.reduce_range)
    module._parameters["weight"] = nn.Parameter(new, requires_grad=False)
