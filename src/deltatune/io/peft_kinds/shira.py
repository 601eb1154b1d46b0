"""PEFT SHIRA <-> Sparse (a sparse ΔW at fixed positions).

`<path>.shira_indices` [2, n] holds (row, column) of each entry of `<path>.shira_weight` [n] in the [out, in]
weight (peft scales them by 1 at inference); ours holds the sorted flat positions row·in + column and the values
in that order. peft gives every module n = r·(in + out) entries for one r, so a Sparse delta is written only when
its entry counts fit one r, else refused naming the module. peft's SHiRA adapts nn.Linear modules only."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.sparse.sparse import Sparse
from ..delta import Delta
from ..peft import PeftFile, PeftKind, SizedDelta, module_key, register_kind

_KNOWN = frozenset({"r", "mask_type", "random_seed", "fan_in_fan_out", "init_weights"})


def read(file: PeftFile) -> Delta:
    parts = file.take({".shira_weight": "values", ".shira_indices": "indices"})
    state, ks = {}, {}
    file.number("r", int)  # checked: the entry counts below are r·(in + out)
    for mpath, named in parts.items():
        if set(named) != {"values", "indices"}:
            raise CorruptFileError(f"{file.where}: module {mpath!r} lacks shira_weight or shira_indices")
        values, idx = named["values"], named["indices"]
        if not values.is_floating_point() or values.dim() != 1 or idx.dim() != 2 or idx.shape != (2, values.shape[0]):
            raise CorruptFileError(f"{file.where}: module {mpath!r} has shira_weight {tuple(values.shape)} and "
                                   f"shira_indices {tuple(idx.shape)}; expected [n] floats and [2, n]")
        if file.header_only:
            state[mpath], ks[mpath] = {"index": torch.empty(values.shape, dtype=torch.int64, device="meta"),
                                       "values": values}, int(values.shape[0])
            continue
        if idx.is_floating_point():  # peft saves them as floats on Windows
            if not bool((idx == idx.round()).all()):
                raise CorruptFileError(f"{file.where}: shira_indices of {mpath!r} are not whole numbers")
        idx = idx.to(torch.int64)
        # the [out, in] size: from the file's r and the entry count n = r (in + out), with in from the largest column
        rows, cols = idx[0], idx[1]
        state[mpath] = {"rows": rows, "cols": cols, "values": values}
        ks[mpath] = int(values.shape[0])
    k = max(ks.values(), default=1)
    config = file.config(Sparse, targets=tuple(parts) or ("none",), k=k, mask="random",
                         k_pattern={re.escape(p): n for p, n in ks.items() if n != k})
    return _ShiraDelta(file.name(), config, state, {p: "Linear" for p in parts}, file.base())


class _ShiraDelta(SizedDelta):
    """A SHiRA file's entries before the module sizes are known: (row, column) pairs become flat positions once the
    weight's column count is (the file does not record it)."""

    def complete(self, sizes: dict[str, tuple[int, int]]) -> Delta:
        def place(mpath: str, st: dict, d_out: int, d_in: int) -> dict:
            rows, cols = st["rows"], st["cols"]
            if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= d_out or int(cols.min()) < 0
                                 or int(cols.max()) >= d_in):
                raise CorruptFileError(f"PEFT SHiRA adapter {self.name!r}: positions of {mpath!r} lie outside its "
                                       f"[{d_out}, {d_in}] weight")
            flat = rows * d_in + cols
            order = torch.argsort(flat)
            return {"shape": torch.tensor([d_out, d_in], dtype=torch.int64), "index": flat[order],
                    "values": st["values"][order]}

        return self.placed_each(sizes, place, lambda mpath, st: "rows" not in st)  # no rows: a module kept whole


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    flat, r = {}, None
    for mpath in paths:
        st = delta.state[mpath]
        if delta.module_types.get(mpath) != "Linear":
            raise UnsupportedError(f"{where}: module {mpath!r} is a {delta.module_types.get(mpath)}; peft's SHiRA adapts "
                                   f"nn.Linear modules only")
        if "bias" in st and bool(st["bias"].any()):
            raise UnsupportedError(f"{where}: module {mpath!r} changes its bias; peft's SHiRA has no bias change")
        d_out, d_in = (int(v) for v in st["shape"])
        n = int(st["index"].numel())
        if n % (d_out + d_in) or (r is not None and n // (d_out + d_in) != r):
            raise UnsupportedError(f"{where}: module {mpath!r} has {n} entries; peft's SHiRA gives every module "
                                   f"r·(in + out) entries for one r (here {d_out + d_in} per unit of r"
                                   f"{f', r={r}' if r is not None else ''})")
        r = n // (d_out + d_in)
        idx = st["index"].to(torch.int64)
        flat[module_key(mpath, "shira_indices")] = torch.stack([idx // d_in, idx % d_in])
        flat[module_key(mpath, "shira_weight")] = st["values"]
    return flat, {"target_modules": paths, "r": r, "mask_type": "random", "random_seed": None, "fan_in_fan_out": False,
                  "init_weights": True}


register_kind(PeftKind("SHIRA", (Sparse,), read, write, fields=_KNOWN,
                       description="SHiRA as a sparse ΔW (entry counts r·(in + out))"))
