"""PEFT LOHA <-> LoHa and PEFT LOKR <-> LoKr (peft's LyCORIS family, on Linear modules).

LoHa: `hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a`, `hada_w2_b` are our b1, a1, b2, a2; s = alpha / r.
LoKr: `lokr_w1` / `lokr_w1_a` / `lokr_w1_b` / `lokr_w2` / `lokr_w2_a` / `lokr_w2_b` are our w1, w1_a, ...;
decompose_factor is our factor, decompose_both the same; s = alpha / r. Which factors are low-rank follows from
(r, factor, decompose_both) in both libraries, so the shapes are checked when the delta is loaded.
Refused: rank_pattern / alpha_pattern (ours has one r and alpha per delta), effective Conv2d, Conv1D modules
(peft's LyCORIS layers adapt nn.Linear only)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.loha import LoHa
from ...methods.lokr import LoKr
from ..delta import Delta
from ..peft import PeftFile, PeftKind, linear_tensors, register_kind

_REFUSE = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
           "use_effective_conv2d": "effective Conv2d factors"}
_COMMON = frozenset({"r", "alpha", "rank_dropout", "module_dropout", "init_weights"})
_LOHA = {"b1": "hada_w1_a", "a1": "hada_w1_b", "b2": "hada_w2_a", "a2": "hada_w2_b"}
_LOKR = {n: "lokr_" + n for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}


def _read(file: PeftFile, names: dict[str, str], make: Any) -> Delta:
    parts = file.take({"." + theirs: ours for ours, theirs in names.items()})
    file.floating(parts, "factors")
    if any(k.endswith(".lokr_t2") or k.endswith(".hada_t1") for k in file.tensors):
        raise UnsupportedError(f"{file.where} holds convolution factors; deltatune adapts Linear modules here")
    r, alpha = file.number("r", int), file.number("alpha", float)
    config = make(targets=tuple(parts) or ("none",), r=r, alpha=float(alpha))
    for mpath, named in parts.items():
        if any(t.dim() != 2 for t in named.values()):
            raise CorruptFileError(f"{file.where}: module {mpath!r} has factors that are not matrices")
    return Delta(file.name(), config, {p: dict(n) for p, n in parts.items()}, {p: "Linear" for p in parts}, file.base())


def _write(names: dict[str, str], extra: Any) -> Any:
    def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        flat = linear_tensors(delta, paths, names, where)
        cfg = delta.config
        return flat, {"target_modules": paths, "r": cfg.r, "alpha": cfg.alpha, "rank_pattern": {}, "alpha_pattern": {},
                      "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True, **extra(cfg)}
    return write


def read_loha(file: PeftFile) -> Delta:
    return _read(file, _LOHA, lambda **kw: file.config(LoHa, **kw))


def read_lokr(file: PeftFile) -> Delta:
    factor = file.number("decompose_factor", int, default=-1)
    both = file.flag("decompose_both")
    init = "lycoris" if file.cfg.get("init_weights") == "lycoris" else "default"
    return _read(file, _LOKR, lambda **kw: file.config(LoKr, factor=factor, decompose_both=both, init=init, **kw))


register_kind(PeftKind("LOHA", (LoHa,), read_loha, _write(_LOHA, lambda cfg: {}), fields=_COMMON, refuse=_REFUSE,
                       description="LoHa: Hadamard product of two low-rank products"))
register_kind(PeftKind("LOKR", (LoKr,), read_lokr,
                       _write(_LOKR, lambda cfg: {"decompose_factor": cfg.factor, "decompose_both": cfg.decompose_both,
                                                  "rank_dropout_scale": False}),
                       fields=_COMMON | {"decompose_factor", "decompose_both", "rank_dropout_scale", "use_upstream"},
                       refuse=_REFUSE, description="LoKr: Kronecker product, factors low-rank where r is small"))
