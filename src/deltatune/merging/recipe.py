"""Merge recipes: a YAML file naming the inputs, the method and its parameters, module filters and the output.

    method: ties
    base: path/to/base-model            # needed for model-dir inputs, DoRA/full-copy inputs and format: model
    inputs:
      - {path: runs/a/delta, weight: 1.0, density: 0.2}    # native delta, PEFT adapter or HF model directory
      - {path: runs/b/delta, weight: 0.5, density: 0.2}
    parameters: {lambda: 1.0}           # global parameters of the method
    modules: {include: ".*attn.*", exclude: ".*classifier"}   # full-match regexes on module paths
    output: {path: out/merged, format: delta, storage: lowrank, rank: 16}

`load_recipe` checks all of it — every error names the field, e.g. `inputs[2].weight: expected a number, got
'abc'` — and opens every input before anything is computed; `run_recipe` merges and writes. Relative paths are
taken from the current directory. Tensor-valued per-input parameters (Fisher merging's `fisher`) are given as
the path of a safetensors file with one tensor per module path.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..io.delta import Delta
from ..core import regex
from ..core.errors import ConfigError, DeltaTuneError, OutputPathError
from ..core.parsing import check_tree, read_yaml, short
from ..core.schema import Fraction, Invalid, PositiveInt, node_for
from ..core.suggest import did_you_mean
from ..io.checkpoints import CheckpointReader
from ..io.safetensors_io import check_finite, read_tensors
from .combine import BASE_NEEDED, STORAGES, merge_deltas, method_params, module_filter, needs_base, resolve_method
from .full_models import CheckpointMerge, check_output, is_model_dir, output_bytes, plan_to_delta, write_model

FORMATS = ("delta", "peft", "model")
TOP_KEYS = ("method", "base", "inputs", "parameters", "modules", "output")
OUTPUT_KEYS = ("path", "format", "storage", "rank", "energy", "name", "max_shard_bytes")


@dataclass
class RecipeInput:
    path: Path
    kind: str                                # "delta", "peft" or "model"
    source: Delta | CheckpointReader
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Output:
    path: Path
    format: str = "delta"
    storage: str = "dense"
    rank: int | None = None
    energy: float | None = None
    name: str = "merge"
    max_shard_bytes: int = 2 << 30


@dataclass
class Recipe:
    method: Any
    inputs: list[RecipeInput]
    params: dict[str, Any]                   # validated: global and per-input parameters together
    output: Output
    base: Path | None = None
    include: str | None = None
    exclude: str | None = None
    tensor_files: dict[str, list[dict[str, Tensor]]] = field(default_factory=dict)

    @property
    def has_models(self) -> bool:
        return any(i.kind == "model" for i in self.inputs)


# --- reading and checking ---------------------------------------------------------------------------------
def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _got(v: Any) -> str:
    """The value as a message shows it: a bounded repr, built from a bounded part of the value (`short`)."""
    return short(v, 60)


def _string(data: dict[str, Any], key: str, where: str, required: bool = False) -> str | None:
    v = data.get(key)
    if v is None:
        if required:
            raise _fail(where, "is required")
        return None
    if not isinstance(v, str) or not v or "\0" in v:
        raise _fail(where, f"expected a non-empty string (without NUL characters), got {_got(v)}")
    return v


def _mapping(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _fail(where, f"expected a mapping (key: value), got {_got(v)}")
    return v


def _unknown(data: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    extra = [k for k in data if k not in known]
    if extra:
        name = short(extra[0], 80) if not isinstance(extra[0], str) or len(extra[0]) > 80 else extra[0]
        raise _fail(f"{where}{name}", f"unknown field{did_you_mean(extra[0], known)}; known fields"
                                      f"{' of ' + where.rstrip('.') if where else ''}: {', '.join(known)}")


def input_kind(path: Path) -> str:
    if (path / "delta.json").is_file():
        return "delta"
    if (path / "adapter_config.json").is_file():
        return "peft"
    if is_model_dir(path):
        return "model"
    raise DeltaTuneError(f"{str(path)!r} holds no delta.json (deltatune delta), adapter_config.json (PEFT adapter) "
                         f"or model.safetensors[.index.json] (HF model directory)")


def load_recipe(source: str | Path | dict[str, Any]) -> Recipe:
    """A checked Recipe from a YAML file (or an already parsed dict); raises ConfigError naming the field."""
    if isinstance(source, dict):
        data = source
        check_tree(data, "the recipe", ConfigError)  # bounded like a file: no cycles, no alias blow-up
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        data = read_yaml(path, "recipe", ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"a recipe is a YAML mapping with the fields {', '.join(TOP_KEYS)}; got {_got(data)}")
    _unknown(data, TOP_KEYS, "")

    name = data.get("method")
    if not isinstance(name, str) or not name:
        raise _fail("method", f"expected the name of a merge method, got {_got(name)}")
    try:
        method = resolve_method(name)
    except ConfigError as e:
        raise _fail("method", str(e)) from None

    base = None
    if data.get("base") is not None:
        base = Path(_string(data, "base", "base"))
        try:
            CheckpointReader(base)
        except DeltaTuneError as e:
            raise _fail("base", f"expected an HF model directory (safetensors): {e}") from None

    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("inputs", f"expected a non-empty list of inputs ({{path: ..., <per-input parameters>}}), "
                              f"got {_got(raw_inputs)}")
    params_schema = getattr(method, "params", {})
    inputs = [_read_input(item, i, method.name, params_schema) for i, item in enumerate(raw_inputs)]

    parameters = _mapping(data.get("parameters"), "parameters")
    for k in parameters:
        p = params_schema.get(k) or next((q for q in params_schema.values() if q.arg == k), None)
        if p is None:
            raise _fail(f"parameters.{k}", f"merge method {method.name!r} has no parameter {_got(k)}"
                                           f"{did_you_mean(k, params_schema)}; its parameters: "
                                           f"{', '.join(sorted(params_schema)) or '(none)'}")
        for i, inp in enumerate(inputs):
            if k in inp.params:
                raise _fail(f"parameters.{k}", f"is also given per input (inputs[{i}].{k}); give it in one place")

    modules = _mapping(data.get("modules"), "modules")
    _unknown(modules, ("include", "exclude"), "modules.")
    for key in ("include", "exclude"):
        if modules.get(key) is not None:
            try:
                module_filter(**{key: modules[key]})
            except ConfigError:
                v = modules[key]
                raise _fail(f"modules.{key}", f"expected a regular expression (full match on module paths), got "
                                              f"{_got(v)}" + (f" ({_regex_error(v)})" if isinstance(v, str) else "")) from None

    output = _read_output(data.get("output"))
    recipe = Recipe(method, inputs, {}, output, base, modules.get("include"), modules.get("exclude"))
    tensor_names = [k for k, p in params_schema.items() if p.type is Tensor]
    recipe.tensor_files = _tensor_files(inputs, tensor_names)
    recipe.params = _validate_params(method, parameters, inputs, tensor_names)
    _cross_checks(recipe)
    return recipe


def _regex_error(v: str) -> str:
    try:
        regex.check(v)
    except regex.RegexError as e:
        return f"it {e}"
    return "invalid"


def _read_input(item: Any, i: int, method: str, schema: dict[str, Any]) -> RecipeInput:
    where = f"inputs[{i}]"
    if isinstance(item, str):
        item = {"path": item}
    if not isinstance(item, dict):
        raise _fail(where, f"expected a mapping with a path and per-input parameters, got {_got(item)}")
    path = Path(_string(item, "path", f"{where}.path", required=True))
    if not path.exists():
        raise _fail(f"{where}.path", f"{str(path)!r} does not exist")
    if not path.is_dir():
        raise _fail(f"{where}.path", f"{str(path)!r} is a file; expected a directory (delta, PEFT adapter or model)")
    try:
        kind = input_kind(path)
        source: Delta | CheckpointReader = CheckpointReader(path) if kind == "model" else Delta.read(path)
    except DeltaTuneError as e:
        raise _fail(f"{where}.path", str(e)) from None
    params = {k: v for k, v in item.items() if k != "path"}
    for k in params:
        p = schema.get(k) or next((q for q in schema.values() if q.arg == k), None)
        if p is None:
            per_input = [n for n, q in schema.items() if q.per_input]
            raise _fail(f"{where}.{k}", f"merge method {method!r} has no parameter {_got(k)}"
                                        f"{did_you_mean(k, per_input)}; its per-input parameters: "
                                        f"{', '.join(sorted(per_input)) or '(none)'}")
        if not p.per_input:
            raise _fail(f"{where}.{k}", f"{_got(k)} is a global parameter of {method!r}; give it under parameters")
    return RecipeInput(path, kind, source, params)


def _read_output(raw: Any) -> Output:
    if not isinstance(raw, dict):
        raise _fail("output", f"expected a mapping with path, format (delta | peft | model), storage, rank, energy; "
                              f"got {_got(raw)}")
    _unknown(raw, OUTPUT_KEYS, "output.")
    path = Path(_string(raw, "path", "output.path", required=True))
    fmt = raw.get("format", "delta")
    if fmt not in FORMATS:
        raise _fail("output.format", f"expected one of {', '.join(FORMATS)}, got {_got(fmt)}{did_you_mean(fmt, FORMATS)}")
    rank = _typed(raw, "rank", PositiveInt | None)
    energy = _typed(raw, "energy", Fraction | None)
    storage = raw.get("storage")
    if fmt == "model":
        for key in ("storage", "rank", "energy"):
            if raw.get(key) is not None:
                raise _fail(f"output.{key}", "applies to format delta or peft; a model holds W + ΔW in full")
        storage = "dense"
    else:
        storage = storage if storage is not None else ("lowrank" if fmt == "peft" else "dense")
        if storage not in STORAGES:
            raise _fail("output.storage", f"expected one of {', '.join(STORAGES)}, got {_got(storage)}"
                                          f"{did_you_mean(storage, STORAGES)}")
        if fmt == "peft" and storage != "lowrank":
            raise _fail("output.storage", f"format peft stores LoRA factors: expected lowrank, got {_got(storage)}")
        if storage == "lowrank":
            if rank is not None and energy is not None:
                raise _fail("output.rank", "give rank or energy, not both")
            if rank is None and energy is None:
                raise _fail("output.rank", "storage lowrank needs rank (per-module rank) or energy (fraction of each "
                                           "module's squared singular values to keep)")
        elif rank is not None or energy is not None:
            raise _fail("output.rank" if rank is not None else "output.energy", "applies to storage lowrank only")
    name = raw.get("name", "merge")
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise _fail("output.name", f"expected a delta name without '.' or '/', got {_got(name)}")
    shard = _typed(raw, "max_shard_bytes", PositiveInt, 2 << 30, " (bytes per shard)")
    return Output(path, fmt, storage, rank, energy, name, shard)


def _typed(raw: dict[str, Any], key: str, annotation: Any, default: Any = None, meaning: str = "") -> Any:
    """output.<key> converted to and checked against `annotation` by the schema configs use ("16" -> 16)."""
    node = node_for(annotation)
    value = raw.get(key, default)
    try:
        return node.check(value)
    except Invalid:
        raise _fail(f"output.{key}", f"expected {node.describe()}{meaning}, got {_got(value)}") from None


def _tensor_files(inputs: list[RecipeInput], names: list[str]) -> dict[str, list[dict[str, Tensor]]]:
    """Tensor-valued per-input parameters, read from the safetensors files the recipe names."""
    files: dict[str, list[dict[str, Tensor]]] = {}
    for name in names:
        given = [i for i, inp in enumerate(inputs) if name in inp.params]
        if not given:
            continue
        loaded = []
        for i, inp in enumerate(inputs):
            where = f"inputs[{i}].{name}"
            v = inp.params.get(name)
            if not isinstance(v, str):
                raise _fail(where, f"expected the path of a safetensors file with one tensor per module, got {_got(v)}")
            try:
                tensors, _ = read_tensors(Path(v))
                check_finite(tensors, v)
            except DeltaTuneError as e:
                raise _fail(where, str(e)) from None
            loaded.append(tensors)
        files[name] = loaded
    return files


_FIELD = re.compile(r"parameter '?(?P<name>[A-Za-z_]\w*)'?(?:\[(?P<index>\d+)\])?")


def _validate_params(method: Any, parameters: dict[str, Any], inputs: list[RecipeInput],
                     tensor_names: list[str]) -> dict[str, Any]:
    """The method's checked parameters; an error names the recipe field (inputs[i].name or parameters.name)."""
    per_input = {k for inp in inputs for k in inp.params if k not in tensor_names}
    combined = dict(parameters)
    for k in per_input:
        missing = [i for i, inp in enumerate(inputs) if k not in inp.params]
        if missing:
            raise _fail(f"inputs[{missing[0]}].{k}", f"is missing; other inputs give {_got(k)}: give a per-input "
                                                     f"parameter for every input, or put one value under parameters")
        combined[k] = [inp.params[k] for inp in inputs]
    try:
        return method_params(method, len(inputs), combined, supplied_per_module=tensor_names)
    except ConfigError as e:
        raise _locate(e, method, parameters, inputs) from None


def _locate(e: ConfigError, method: Any, parameters: dict[str, Any], inputs: list[RecipeInput]) -> ConfigError:
    m = _FIELD.search(str(e))
    schema = getattr(method, "params", {})
    if m is None or m.group("name") not in schema and not any(p.arg == m.group("name") for p in schema.values()):
        return _fail("parameters", str(e))
    name = m.group("name")
    p = schema.get(name) or next(q for q in schema.values() if q.arg == name)
    index = m.group("index")
    if index is not None and int(index) < len(inputs) and p.name in inputs[int(index)].params:
        value = inputs[int(index)].params[p.name]
        return _fail(f"inputs[{index}].{p.name}", f"expected {p.expected()}, got {_got(value)}")
    if p.name in parameters or p.arg in parameters:
        value = parameters.get(p.name, parameters.get(p.arg))
        return _fail(f"parameters.{p.name}", f"expected {p.expected()}, got {_got(value)}")
    where = f"inputs[0].{p.name}" if p.per_input else f"parameters.{p.name}"
    return _fail(where, str(e))


def _cross_checks(recipe: Recipe) -> None:
    models = [i for i, inp in enumerate(recipe.inputs) if inp.kind == "model"]
    if recipe.base is None:
        if models:
            raise _fail("base", f"is required: inputs[{models[0]}] is a model directory, whose task vector is taken "
                                f"against the base")
        if recipe.output.format == "model":
            raise _fail("base", "is required for output format model (the merged update is added to its weights)")
        deltas = [inp.source for inp in recipe.inputs]
        keep = module_filter(recipe.include, recipe.exclude)
        missing = needs_base(deltas, [p for d in deltas for p in d.state if keep(p)])
        if missing is not None:
            i, path = missing
            raise _fail("base", f"is required: inputs[{i}] ({str(recipe.inputs[i].path)!r}) "
                                f"{BASE_NEEDED.format(path=path)}; give the base model's directory")
    try:  # an unsafe output (the root, home, a file, a symlink loop, unrelated files, ...) before any work
        check_output(recipe.output.path, recipe.output.format == "model")
    except OutputPathError as e:
        raise OutputPathError(f"output.path: {e}") from None
    out = recipe.output.path.resolve()
    for i, inp in enumerate(recipe.inputs):
        if inp.path.resolve() == out:
            raise _fail("output.path", f"is the directory of inputs[{i}]; write the result elsewhere")
    if recipe.base is not None and recipe.base.resolve() == out:
        raise _fail("output.path", "is the base model's directory; write the result elsewhere")


# --- running ----------------------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, progress: bool = True) -> dict[str, Any]:
    """Merge and write as the recipe says; returns a summary (modules merged, output bytes, seconds)."""
    start = time.perf_counter()
    out = recipe.output
    check_output(out.path, out.format == "model", [i.path for i in recipe.inputs] + [b for b in [recipe.base] if b])
    sources = [inp.source for inp in recipe.inputs]
    module_params = _module_params(recipe) if recipe.tensor_files else None
    if module_params is not None and (recipe.has_models or out.format == "model"):
        raise ConfigError(f"tensor parameters ({', '.join(recipe.tensor_files)}) are supported for delta inputs "
                          f"merged into a delta; not with model inputs or output format model")
    if out.format == "model" or recipe.has_models:
        plan = CheckpointMerge(recipe.base, sources, recipe.method, recipe.params,
                               include=recipe.include, exclude=recipe.exclude)
        if out.format == "model":
            write_model(plan, out.path, max_shard_bytes=out.max_shard_bytes, progress=progress)
            merged = plan.changed
        else:
            delta = plan_to_delta(plan, output=out.storage, rank=out.rank, energy=out.energy,
                                          name=out.name, progress=progress)
    else:
        delta = merge_deltas(sources, recipe.method, recipe.params, output=out.storage, rank=out.rank,
                             energy=out.energy, base=recipe.base, include=recipe.include, exclude=recipe.exclude,
                             name=out.name, progress=progress, module_params=module_params,
                             supplied_per_module=list(recipe.tensor_files))
    if out.format != "model":
        merged = len(delta.state)
        if out.format == "peft":
            from ..io.peft import write_peft

            write_peft(delta, out.path)
        else:
            delta.write(out.path)
    size = output_bytes(out.path, out.format == "model")  # what was written, not whatever else is there
    return {"method": recipe.method.name if hasattr(recipe.method, "name") else str(recipe.method),
            "inputs": len(recipe.inputs), "modules": merged, "unit": "tensors" if out.format == "model" else "modules",
            "output": str(out.path), "format": out.format, "storage": out.storage if out.format != "model" else None,
            "bytes": size, "seconds": time.perf_counter() - start}


def _module_params(recipe: Recipe):
    def lookup(key: str) -> dict[str, list[Tensor]]:
        out = {}
        for name, files in recipe.tensor_files.items():
            values = []
            for i, tensors in enumerate(files):
                if key not in tensors:
                    raise ConfigError(f"inputs[{i}].{name}: {recipe.inputs[i].params[name]!r} has no tensor for {key!r}")
                values.append(tensors[key])
            out[name] = values
        return out

    return lookup


def render(summary: dict[str, Any]) -> str:
    what = f"{summary['format']}" + (f" ({summary['storage']})" if summary.get("storage") else "")
    return (f"merged {summary['inputs']} inputs with {summary['method']}: {summary['modules']} {summary['unit']} "
            f"merged; wrote {what} to {summary['output']} ({_size(summary['bytes'])}) in {summary['seconds']:.1f} s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
