"""PEFT POLY <-> Poly (and MHR: n_splits > 1). `<path>.poly_lora_A` [splits, skills, in/splits, r],
`<path>.poly_lora_B` [splits, skills, r, out/splits] and `<path>.poly_router.module_logits` [tasks, splits·skills]
are our poly_A, poly_B and logits, as they are (both scale by 1/r and route by σ(Z)/Σσ(Z) at inference)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ...core.errors import CorruptFileError, UnsupportedError
from ...methods.poly import Poly
from ..delta import Delta
from ..peft import PeftFile, PeftKind, linear_tensors, register_kind

_NAMES = {"poly_A": "poly_lora_A", "poly_B": "poly_lora_B", "logits": "poly_router.module_logits"}
_KNOWN = frozenset({"r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights"})


def read(file: PeftFile) -> Delta:
    if file.cfg.get("poly_type", "poly") != "poly":
        raise UnsupportedError(f"{file.where} uses poly_type={file.cfg.get('poly_type')!r}; deltatune maps 'poly'")
    parts = file.take({"." + theirs: ours for ours, theirs in _NAMES.items()})
    file.floating(parts, "Poly skills and routing logits")
    for mpath, named in parts.items():
        if set(named) != set(_NAMES):
            raise CorruptFileError(f"{file.where}: module {mpath!r} lacks some of {sorted(_NAMES.values())}")
    config = file.config(Poly, targets=tuple(parts) or ("none",), r=file.number("r", int),
                         n_tasks=file.number("n_tasks", int), n_skills=file.number("n_skills", int),
                         n_splits=file.number("n_splits", int, default=1))
    types = {p: "Linear" for p in parts}
    return Delta(file.name(), config, {p: dict(n) for p, n in parts.items()}, types, file.base())


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    flat = linear_tensors(delta, paths, _NAMES, where)
    cfg = delta.config
    return flat, {"target_modules": paths, "r": cfg.r, "n_tasks": cfg.n_tasks, "n_skills": cfg.n_skills,
                  "n_splits": cfg.n_splits, "poly_type": "poly", "init_weights": True}


register_kind(PeftKind("POLY", (Poly,), read, write, fields=_KNOWN, description="Poly / MHR: routed LoRA skills per task"))
