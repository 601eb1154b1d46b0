"""PEFT IA3 <-> IA3. `<path>.ia3_l` is [out, 1] on a module whose output is rescaled and [1, in] on a feed-forward
module (its input rescaled), so the shape tells which; ours is the flat vector. fan_in_fan_out marks Conv1D."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...core.errors import CorruptFileError
from ...methods.ia3 import IA3
from ..delta import Delta
from ..peft import PeftFile, PeftKind, fan_in_fan_out, layer_type, module_key, register_kind

_KNOWN = frozenset({"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"})


def read(file: PeftFile) -> Delta:
    parts = file.take({".ia3_l": "ia3_l"})
    file.floating(parts, "(IA)3 vectors")
    state, types, ff = {}, {}, []
    for mpath, named in parts.items():
        l = named["ia3_l"]
        if l.dim() != 2 or 1 not in l.shape:
            raise CorruptFileError(f"{file.where}: ia3_l of {mpath!r} has shape {tuple(l.shape)}, expected [out, 1] or "
                                   f"[1, in]")
        if l.shape[0] == 1 and l.shape[1] != 1 or (l.shape == (1, 1) and file.selects("feedforward_modules", mpath)):
            ff.append(mpath)
        state[mpath] = {"ia3_l": l.reshape(-1)}
        types[mpath] = layer_type(file.flag("fan_in_fan_out"))
    config = file.config(IA3, targets=tuple(parts) or ("none",), feedforward=tuple(ff) or None)
    return Delta(file.name(), config, state, types, file.base())


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    flat, ff = {}, []
    for mpath in paths:
        l = delta.state[mpath]["ia3_l"]
        if delta.config.for_module(mpath).feedforward:
            ff.append(mpath)
            flat[module_key(mpath, "ia3_l")] = l.reshape(1, -1)
        else:
            flat[module_key(mpath, "ia3_l")] = l.reshape(-1, 1)
    conv1d = fan_in_fan_out(delta, paths)
    return flat, {"target_modules": paths, "feedforward_modules": ff, "fan_in_fan_out": conv1d, "init_ia3_weights": True}


register_kind(PeftKind("IA3", (IA3,), read, write, fields=_KNOWN, description="(IA)3: outputs and feed-forward inputs"))
