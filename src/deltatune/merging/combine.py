"""Many deltas -> one merged delta, in ΔW space, one module at a time.

For every module path (the union over the inputs, after the include/exclude filters) the pipeline computes
each input's exact update ΔW_i (LoRA: s·B·A with rsLoRA's s; DoRA: its exact update against the base weights;
dense, sparse and full copies as they are), merges them with a registered merge method, converts the result
to the requested storage (dense, sparse, or a truncated SVD) and drops every input tensor of that module before
the next one. An input that does not adapt a module counts as ΔW = 0 there. Biases are merged with the same
method, as vectors, where any input changes them.

When every input of a module is low-rank and the method declares itself linear (`method.linear`), the merged
update Σ c_i ΔW_i is formed by concatenating factors and refactored with the QR-based SVD of `LowRankDelta`,
never densified (unless dense or sparse storage is asked for).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io.delta import Delta, base_lookup
from ..core import regex
from ..core.errors import ConfigError, ShapeMismatchError, UnsupportedError
from ..core.parsing import short
from ..core.tensors import DeltaTensor, DenseDelta, LowRankDelta, SparseDelta
from ..core.progress import Progress
from .compress import check_rank_options, low_rank

STORAGES = ("dense", "sparse", "lowrank")
ModuleParams = Callable[[str], dict[str, Any]]


# --- the method and its parameters ------------------------------------------------------------------------
def resolve_method(method: Any) -> Any:
    """A merge method by registered name, or the method object itself (anything with validate and __call__)."""
    if isinstance(method, str):
        from .registry import get_method  # the built-in methods registered when deltatune.merging was imported

        return get_method(method)
    if not callable(method) or not callable(getattr(method, "validate", None)):
        raise ConfigError(f"method must be a registered merge method name or a MergeMethod, got {type(method).__name__}")
    return method


def method_params(method: Any, n: int, params: dict[str, Any] | None = None,
                  per_input: Sequence[dict[str, Any]] | None = None, *, where: str = "per_input",
                  supplied_per_module: Sequence[str] = ()) -> dict[str, Any]:
    """Global `params` plus `per_input` dicts (one per input, each key given for every input or none) as one
    validated dict for `method`. Tensor parameters named in `supplied_per_module` come per module later."""
    merged = dict(params or {})
    if per_input is not None:
        if len(per_input) != n:
            raise ConfigError(f"{where} has {len(per_input)} entries for {n} inputs; give one dict per input")
        keys = list(dict.fromkeys(k for p in per_input for k in p))
        for k in keys:
            if k in merged:
                raise ConfigError(f"parameter {k!r} is given both globally and per input ({where}); give it once")
            missing = [i for i, p in enumerate(per_input) if k not in p]
            if missing:
                raise ConfigError(f"{where}[{missing[0]}] lacks {k!r}, which other inputs give; give a per-input "
                                  f"parameter for every input, or for none")
            merged[k] = [p[k] for p in per_input]
    placeholders = {k: torch.zeros(1) for k in supplied_per_module if k not in merged}
    checked = method.validate({**merged, **placeholders}, n)
    return {k: v for k, v in checked.items() if k not in placeholders}


def is_linear(method: Any) -> bool:
    """Whether the method declares that its result is a fixed linear combination Σ c_i τ_i of its inputs."""
    return bool(getattr(method, "linear", False))


def linear_coefficients(method: Any, params: dict[str, Any], n: int) -> list[float]:
    """c_i of a linear method, read off by merging one-hot probes (input i is e_i in a [1, n] tensor)."""
    probes = [torch.zeros(1, n) for _ in range(n)]
    for i, p in enumerate(probes):
        p[0, i] = 1.0
    return [float(c) for c in method(probes, key="", **params)[0]]


# --- filters and storage -------------------------------------------------------------------------------------
def module_filter(include: str | None = None, exclude: str | None = None) -> Callable[[str], bool]:
    """path -> kept? `include` and `exclude` are full-match regular expressions on module paths, matched in linear
    time (`core.regex`)."""
    compiled = {}
    for name, pattern in (("include", include), ("exclude", exclude)):
        if pattern is None:
            continue
        if not isinstance(pattern, str):
            raise ConfigError(f"{name} must be a regular expression (a string), got {short(pattern)}")
        try:
            compiled[name] = regex.compile(pattern)
        except regex.RegexError as e:
            raise ConfigError(f"{name}={short(pattern)} {e}") from None

    def keep(path: str) -> bool:
        if "include" in compiled and not compiled["include"].fullmatch(path):
            return False
        return not ("exclude" in compiled and compiled["exclude"].fullmatch(path))

    return keep


def check_storage(output: str, rank: int | None, energy: float | None) -> None:
    """`output` is a storage; lowrank takes exactly one of rank and energy, the others neither."""
    if output not in STORAGES:
        raise ConfigError(f"output must be one of {STORAGES}, got {output!r}")
    if output == "lowrank":
        check_rank_options(rank, energy, required=True)
    elif rank is not None or energy is not None:
        raise ConfigError(f"rank and energy apply to output 'lowrank' only, not {output!r}")


def to_storage(dw: DeltaTensor, output: str, rank: int | None = None, energy: float | None = None) -> DeltaTensor:
    """dw as a DenseDelta, a SparseDelta (exact zeros dropped) or a truncated LowRankDelta."""
    if output == "lowrank":
        return low_rank(dw, rank, energy)
    dense = dw.to_dense().float()
    if output == "dense":
        return DenseDelta(dense.contiguous())
    sparse = SparseDelta.from_dense(dense)
    if sparse.nnz == 0:  # a stored sparse module holds at least one entry
        return SparseDelta(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=dense.dtype), dense.shape)
    return sparse


# --- the pipeline ----------------------------------------------------------------------------------------------
def read_inputs(inputs: Sequence[Delta | str | Path]) -> list[Delta]:
    if isinstance(inputs, (str, Path, Delta)) or not isinstance(inputs, Sequence) or not inputs:
        raise ConfigError("inputs must be a non-empty list of deltas (Delta objects or delta directories)")
    return [d if isinstance(d, Delta) else Delta.read(d) for d in inputs]


def needs_base(deltas: list[Delta], paths: list[str]) -> tuple[int, str] | None:
    """(input index, module path) of the first update that needs the base weights (DoRA, full copies, PEFT's
    absolute biases), or None. Cheap: no dense ΔW is formed for LoRA."""
    for i, d in enumerate(deltas):
        for path in paths:
            if path in d.state:
                try:
                    d.update(path, None)
                except UnsupportedError:
                    return i, path
    return None


BASE_NEEDED = "needs the base weights to express its update at {path!r} (DoRA, full copies or PEFT's absolute biases)"


def merge_deltas(inputs: Sequence[Delta | str | Path], method: Any, params: dict[str, Any] | None = None, *,
                 per_input: Sequence[dict[str, Any]] | None = None, output: str = "dense", rank: int | None = None,
                 energy: float | None = None, base: Any = None, include: str | None = None,
                 exclude: str | None = None, name: str = "merge", progress: bool = True,
                 module_params: ModuleParams | None = None,
                 supplied_per_module: Sequence[str] = ()) -> Delta:
    """Merge `inputs` module by module with `method` into one Delta stored as `output`.

    `params` are the method's global parameters, `per_input` one dict of per-input parameters per input.
    `output`: "dense", "sparse" (exact zeros dropped) or "lowrank" (truncated SVD: `rank` per module, or the
    smallest rank keeping `energy` of the squared singular values).
    `base`: the base model, model directory or weight lookup; needed for DoRA and full-copy inputs.
    `include`/`exclude`: full-match regexes on module paths. `module_params(key)` returns per-module extra
    parameters (e.g. Fisher tensors) for key = module path or `<path>.bias`; name them in `supplied_per_module`.
    """
    deltas = read_inputs(inputs)
    if isinstance(base, (str, Path)):
        from ..io.checkpoints import CheckpointReader

        base = CheckpointReader(base)
    method = resolve_method(method)
    n = len(deltas)
    checked = method_params(method, n, params, per_input, supplied_per_module=supplied_per_module)
    check_storage(output, rank, energy)
    keep = module_filter(include, exclude)
    paths = [p for p in dict.fromkeys(p for d in deltas for p in d.state) if keep(p)]
    if not paths:
        raise ConfigError(f"no module is left to merge: the inputs adapt {sum(len(d.state) for d in deltas)} module(s), "
                          f"include={include!r} / exclude={exclude!r} keep none")
    types = _module_types(deltas, paths)
    missing = needs_base(deltas, paths) if base is None else None
    if missing is not None:
        i, path = missing
        raise UnsupportedError(f"input {i} ({deltas[i].name!r}) {BASE_NEEDED.format(path=path)}; pass base= (a model "
                               f"or a model directory)")
    lookups = [base_lookup(base, d.module_types) for d in deltas]
    coefficients = linear_coefficients(method, checked, n) if is_linear(method) else None

    def merge_module(path: str) -> tuple[DeltaTensor, Tensor | None]:
        ups = [d.update(path, lookups[i]) if path in d.state else None for i, d in enumerate(deltas)]
        extra = module_params(path) if module_params is not None else {}
        dws = [u[0] if u is not None else None for u in ups]
        shapes = {tuple(dw.shape) for dw in dws if dw is not None}
        if len(shapes) > 1:
            raise ShapeMismatchError(f"module {path!r} has updates of different shapes across inputs: "
                                     f"{[None if dw is None else tuple(dw.shape) for dw in dws]}")
        shape = shapes.pop()
        if coefficients is not None and all(isinstance(dw, LowRankDelta) for dw in dws if dw is not None):
            merged: DeltaTensor = _linear_lowrank(dws, coefficients)
        else:
            merged = DenseDelta(method([_dense(dw, shape) for dw in dws], key=path, **checked, **extra))
        del dws
        dbs = [u[1] if u is not None else None for u in ups]
        del ups
        bias = None
        if any(db is not None for db in dbs):
            size = {tuple(db.shape) for db in dbs if db is not None}
            if len(size) > 1:
                raise ShapeMismatchError(f"module {path!r} has bias updates of different shapes across inputs: {size}")
            extra_b = module_params(f"{path}.bias") if module_params is not None else {}
            zeros = torch.zeros(size.pop())
            bias = method([zeros if db is None else db.float() for db in dbs], key=f"{path}.bias", **checked, **extra_b)
        return to_storage(merged, output, rank, energy), bias

    tensors: dict[str, DeltaTensor] = {}
    biases: dict[str, Tensor] = {}
    with Progress(len(paths), enabled=progress, description="merge") as bar:
        for i, path in enumerate(paths):
            tensors[path], db = merge_module(path)
            if db is not None:
                biases[path] = db
            bar.update(i + 1, module=path)
    if biases and base is not None:  # pieces storing biases hold one wherever the base module has a bias
        lookup = base_lookup(base, types)
        for path in paths:
            if path not in biases and types[path] != "Embedding":
                b = lookup(path)[1]
                if b is not None:
                    biases[path] = torch.zeros(b.shape)
    return Delta.from_tensors(name, tensors, biases, module_types=types, base=_base_info(deltas, paths))


def _dense(dw: DeltaTensor | None, shape: tuple[int, ...]) -> Tensor:
    return torch.zeros(shape) if dw is None else dw.to_dense().float()


def _linear_lowrank(dws: list[DeltaTensor | None], coefficients: list[float]) -> LowRankDelta:
    """Σ c_i ΔW_i of low-rank updates, exactly, as concatenated factors."""
    parts = [(dw, c) for dw, c in zip(dws, coefficients) if dw is not None and c != 0.0]
    if not parts:
        dw = next(dw for dw in dws if dw is not None)
        return LowRankDelta(torch.zeros(1, dw.shape[1]), torch.zeros(dw.shape[0], 1))
    a = torch.cat([dw.A.float() for dw, _ in parts])
    b = torch.cat([dw.B.float() * (dw.scale * c) for dw, c in parts], 1)
    return LowRankDelta(a, b, 1.0)


def _module_types(deltas: list[Delta], paths: list[str]) -> dict[str, str]:
    types: dict[str, str] = {}
    for path in paths:
        seen = {d.module_types.get(path, "Linear") for d in deltas if path in d.state}
        if len(seen) > 1:
            raise ShapeMismatchError(f"module {path!r} is a {' in one input and a '.join(sorted(seen))} in another; "
                                     f"the inputs were made for different models")
        types[path] = seen.pop()
    return types


def _base_info(deltas: list[Delta], paths: list[str]) -> dict[str, Any]:
    shapes: dict[str, Any] = {}
    for d in deltas:
        for p, s in d.base.get("weight_shapes", {}).items():
            if p in paths:
                shapes.setdefault(p, s)
    first = deltas[0].base
    return {"model_class": first.get("model_class"), "model_name": first.get("model_name"), "weight_shapes": shapes}

