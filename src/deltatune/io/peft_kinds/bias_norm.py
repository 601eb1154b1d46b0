"""PEFT BEFT <-> BitFit and PEFT LN_TUNING <-> LNTuning: the two mappings of trained biases and norm parameters.

BEFT (peft's bias-only method; peft has no type named BitFit): `<path>.beft_bias` [1, out] is added to an
nn.Linear's output, which is our BitFit's Δb. peft allows it on a Linear without a bias, ours refuses such a module
(by name, when the delta is loaded); ours on Conv1D or norm modules has no BEFT form and is refused on writing.

LN_TUNING: peft trains a copy of each targeted module and saves its parameters, `<path>.ln_tuning_layers.weight`
(and `.bias`): the tuned values themselves, which replace the base's. Reading keeps them as such (a `PeftDelta`
whose `for_model` subtracts the base: Δγ = γ_file − γ, Δβ = β_file − β); writing adds the base back, so it needs
the model the delta was taken from (`dt.save` gives it). Only normalisation modules are mapped (peft can copy any
module; ours tunes norms)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.bitfit import BitFit
from ...methods.layernorm import LNTuning
from ..delta import Delta, base_lookup
from ..peft import PeftDelta, PeftFile, PeftKind, module_key, register_kind


def read_beft(file: PeftFile) -> Delta:
    parts = file.take({".beft_bias": "bias"})
    file.floating(parts, "BEFT biases")
    state = {}
    for mpath, named in parts.items():
        b = named["bias"]
        if b.dim() != 2 or b.shape[0] != 1:
            raise CorruptFileError(f"{file.where}: beft_bias of {mpath!r} has shape {tuple(b.shape)}, expected [1, out]")
        state[mpath] = {"bias": b.reshape(-1)}
    config = file.config(BitFit, targets=tuple(parts) or ("none",))
    return Delta(file.name(), config, state, {p: "Linear" for p in parts}, file.base())


def write_beft(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    flat = {}
    for mpath in paths:
        if delta.module_types.get(mpath) != "Linear":
            raise UnsupportedError(f"{where}: module {mpath!r} is a {delta.module_types.get(mpath)}; peft's BEFT adds "
                                   f"biases to nn.Linear modules only")
        flat[module_key(mpath, "beft_bias")] = delta.state[mpath]["bias"].reshape(1, -1)
    return flat, {"target_modules": paths, "init_weights": True}


def read_ln(file: PeftFile) -> Delta:
    parts = file.take({".ln_tuning_layers.weight": "delta", ".ln_tuning_layers.bias": "bias"})
    file.floating(parts, "tuned norm parameters")
    for mpath, named in parts.items():
        if "delta" not in named or named["delta"].dim() != 1:
            raise UnsupportedError(f"{file.where}: module {mpath!r} is not a normalisation module (its tuned weight has "
                                   f"shape {tuple(named['delta'].shape) if 'delta' in named else None}); deltatune's "
                                   f"LayerNorm tuning adapts norm modules only")
    bias = any("bias" in n for n in parts.values())
    config = file.config(LNTuning, targets=tuple(parts) or ("none",), bias=bias)
    absolute = {p: {k: ("weight" if k == "delta" else "bias") for k in named} for p, named in parts.items()}
    return PeftDelta(file.name(), config, {p: dict(n) for p, n in parts.items()}, {p: "Norm" for p in parts},
                     file.base(), absolute=absolute)


def write_ln(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if delta.source is None:
        raise UnsupportedError(f"{where}: peft's LN_TUNING stores the tuned norm weights themselves, which needs the "
                               f"base model: save it from the model (dt.save(model, path, name, format='peft'))")
    lookup = base_lookup(delta.source, delta.module_types)
    flat = {}
    for mpath in paths:
        weight, bias = lookup(mpath)
        st = delta.state[mpath]
        flat[module_key(mpath, "ln_tuning_layers.weight")] = weight.float() + st["delta"].float()
        if bias is not None and "bias" in st:  # LNTuning(bias=False) tunes no β: peft's copy keeps the base's
            flat[module_key(mpath, "ln_tuning_layers.bias")] = bias.float() + st["bias"].float()
    return flat, {"target_modules": paths}


register_kind(PeftKind("BEFT", (BitFit,), read_beft, write_beft, fields=frozenset({"init_weights"}),
                       description="BitFit as peft's BEFT: Δb on nn.Linear outputs"))
register_kind(PeftKind("LN_TUNING", (LNTuning,), read_ln, write_ln,
                       description="LayerNorm tuning: the tuned norm weights (and biases) themselves"))
