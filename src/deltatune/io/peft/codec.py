"""The generic PEFT codec: peft adapter directories (adapter_config.json + adapter_model.safetensors) to and from
`Delta` objects, for every peft adapter type with a mapping in the registry (`registry.py`; the mappings live in
`io/peft_kinds/`, one module per kind).

Reading: the config is checked (a JSON object whose `peft_type` has a mapping; the generic fields' types; keys the
kind refuses; keys neither the codec nor the kind knows are warned about by name), the tensors are read from the
safetensors file only (an `adapter_model.bin` pickle is refused, never opened) with the model prefix
`base_model.model.` removed, and the kind's reader takes the tensors it understands. What is left must belong to a
`modules_to_save` module (kept whole, by the registered whole-module method), else the file is refused naming the
tensors. `base_model_name_or_path` is recorded in `Delta.base["model_name"]`, never fetched.

Writing: the kind of the delta's config class gives the tensors and its config fields; modules kept whole are
written under their own names and listed in `modules_to_save`; the directory is replaced as a whole, with an
integrity manifest beside the two files (peft ignores it).

peft's selection options (`target_modules` as a list or a regex, `exclude_modules`, `layers_to_transform` with
`layers_pattern`) need no reading: the tensors name every adapted module, and a delta read from a file targets
exactly those paths. Written files list exact paths.
"""
from __future__ import annotations

import json
import re
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ...core import regex
from ...core.config import whole_module_config
from ...core.errors import ConfigError, CorruptFileError, DeltaNotFoundError, ShapeMismatchError, UnsupportedError
from ...core.parsing import expect, read_json, short
from ...core.targeting import matches
from ...core.tensors import DeltaTensor
from ..delta import Delta, base_lookup
from ..formats import Format, check_output, register_format, write_directory
from ..safetensors_io import check_finite, read_tensors
from .registry import PeftKind, kind_of_config, kind_of_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

#: config keys every peft adapter type has (or that only describe it), read or ignored here
COMMON_FIELDS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
})

_ANY_NAMES = (lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, str) and m for m in v)),
              "a list of module names or null")
#: the type of every generic config field the codec uses: field -> (accepts?, what is expected)
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "modules_to_save": _ANY_NAMES,
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "auto_mapping": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def check_fields(cfg: dict[str, Any], where: str, types: dict[str, tuple[Any, str]]) -> None:
    """A typed error naming the field for every key of `types` in `cfg` whose value is not what is expected."""
    for key, (ok, expected) in types.items():
        if key in cfg:
            expect(ok(cfg[key]), where, key, expected, cfg[key])


# --- what a kind's reader gets ---------------------------------------------------------------------------------
@dataclass
class PeftFile:
    """An adapter directory being read: its config, its tensors (keys without the model prefix) and where it is."""

    path: Path
    where: str
    cfg: dict[str, Any]
    tensors: dict[str, Tensor]
    header_only: bool = False

    def take(self, suffixes: dict[str, str]) -> dict[str, dict[str, Tensor]]:
        """{module path: {name: tensor}} for every key `<path><suffix>` (suffix -> name), taken off the file."""
        out: dict[str, dict[str, Tensor]] = {}
        for key in list(self.tensors):
            for suffix, name in suffixes.items():
                if key.endswith(suffix) and len(key) > len(suffix):
                    path = key[: -len(suffix)]
                    if name in out.setdefault(path, {}):
                        raise CorruptFileError(f"{self.where} holds {name} of {path!r} twice (e.g. {key!r})")
                    out[path][name] = self.tensors.pop(key)
                    break
        return out

    def number(self, key: str, kind: type = float, default: Any = None) -> Any:
        """The config's number at `key` (a whole number for kind=int); `default` when absent or null and a default is
        given, else a typed error naming the key."""
        value = self.cfg.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and not isinstance(value, int)):
            raise CorruptFileError(f"{self.where}: {key}={short(value)} is not a {'whole ' if kind is int else ''}number")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.cfg.get(key)
        if value is None:
            return default
        expect(isinstance(value, bool), self.where, key, "true or false", value)
        return value

    def patterns(self, key: str, values: type = float) -> dict[str, Any]:
        """A `rank_pattern` / `alpha_pattern`-style object: module pattern -> number, each pattern checked."""
        value = self.cfg.get(key) or {}
        if not isinstance(value, dict):
            raise CorruptFileError(f"{self.where}: {key} must be an object mapping module patterns to values, got "
                                   f"{short(value)}")
        for pattern, v in value.items():
            try:
                regex.check(pattern)
            except regex.RegexError as e:
                raise CorruptFileError(f"{self.where}: {key} key {short(pattern)} {e}") from None
            bad = not isinstance(v, (int, float)) or isinstance(v, bool) or (values is int and not isinstance(v, int))
            if bad:
                raise CorruptFileError(f"{self.where}: {key}[{short(pattern)}]={short(v)} is not a "
                                       f"{'whole ' if values is int else ''}number")
        return value

    def selects(self, key: str, path: str) -> bool:
        """Whether the config's module selection at `key` (peft's rule: a string is a full-match regex, a list of
        name suffixes) picks `path`; False when absent."""
        spec = self.cfg.get(key)
        if not spec:
            return False
        expect(isinstance(spec, str) or (isinstance(spec, list) and all(isinstance(s, str) for s in spec)),
               self.where, key, "a regex or a list of module names", spec)
        return matches(spec if isinstance(spec, str) else tuple(spec), path)

    def floating(self, parts: dict[str, dict[str, Tensor]], what: str) -> None:
        for mpath, named in parts.items():
            for name, t in named.items():
                if not t.is_floating_point():
                    raise CorruptFileError(f"{self.where}: {name} of module {short(mpath)} holds {t.dtype} values; "
                                           f"{what} are floating point")

    def shape(self, t: Tensor, expected: tuple[int, ...], what: str, mpath: str) -> Tensor:
        if tuple(t.shape) != tuple(expected):
            raise CorruptFileError(f"{self.where}: {what} of {mpath!r} has shape {tuple(t.shape)}, expected "
                                   f"{tuple(expected)}")
        return t

    def config(self, cls: type, **kwargs: Any) -> Any:
        """`cls(**kwargs)` with a config error naming the file."""
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{self.where}: {e}") from None

    def base(self) -> dict[str, Any]:
        mapping = self.cfg.get("auto_mapping") if isinstance(self.cfg.get("auto_mapping"), dict) else {}
        return {"model_class": mapping.get("base_model_class"), "model_name": self.cfg.get("base_model_name_or_path"),
                "weight_shapes": {}}

    def name(self) -> str:
        return re.sub(r"[./]", "_", self.path.resolve().name) or "default"


# --- a delta whose file holds values that replace the base's -----------------------------------------------------
@dataclass
class PeftDelta(Delta):
    """A Delta read from a PEFT file some of whose tensors are the trained values themselves, which replace the base
    model's (LayerNorm tuning's copies, LoRA's bias="lora_only"): `absolute[path][name]` names the base attribute
    ("weight" or "bias", in the module's [out, in] view) that state entry `name` replaces. `for_model` turns them
    into changes; `update` needs the base for them; so does writing them (`needs_model`: every writer refuses it)."""

    absolute: dict[str, dict[str, str]] = field(default_factory=dict)
    #: what the absolute entries are, in messages
    replaced: ClassVar[str] = "trained values"

    def _relative(self, path: str, lookup: Any) -> dict[str, Tensor]:
        st = dict(self.state[path])
        weight, bias = lookup(path)
        for name, attr in self.absolute.get(path, {}).items():
            if name not in st:
                continue
            ref = weight if attr == "weight" else bias
            if ref is None:
                raise ShapeMismatchError(f"PEFT adapter {self.name!r} replaces the {attr} of {path!r}, but that module "
                                         f"has no {attr}")
            if tuple(ref.shape) != tuple(st[name].shape):
                raise ShapeMismatchError(f"PEFT adapter {self.name!r}: {attr} of {path!r} has shape "
                                         f"{tuple(st[name].shape)} in the file but {tuple(ref.shape)} on this model")
            st[name] = st[name].float() - ref.detach().float().to(st[name].device)
        return st

    def for_model(self, model: nn.Module) -> Delta:
        lookup = base_lookup(model, self.module_types)
        state = {p: (self._relative(p, lookup) if p in self.absolute else dict(st)) for p, st in self.state.items()}
        return Delta(self.name, self.config, state, dict(self.module_types), dict(self.base))

    def update(self, path: str, base: Any = None, with_bias: bool = True) -> tuple[DeltaTensor, Tensor | None]:
        replaced = self.absolute.get(path, {})
        if not replaced:
            return super().update(path, base, with_bias)
        if base is None:
            if not with_bias and set(replaced.values()) == {"bias"}:  # the ΔW needs no base; the bias is left out
                st = {k: v for k, v in self.state[path].items() if k not in replaced}
                return Delta(self.name, self.config, {path: st}, self.module_types, self.base).update(path, None, False)
            raise UnsupportedError(f"PEFT adapter {self.name!r} stores {self.replaced} that replace the base model's at "
                                   f"{path!r}; their change needs the base: pass base= (or dt.load it)")
        lookup = base_lookup(base, self.module_types)
        st = self._relative(path, lookup)
        return Delta(self.name, self.config, {path: st}, self.module_types, self.base).update(path, lookup, with_bias)

    @property
    def needs_model(self) -> str:  # type: ignore[override]
        if not self.absolute:
            return ""
        return (f"PEFT adapter {self.name!r} stores {self.replaced} that replace the base model's; their change needs "
                f"the base: load it onto the model first (dt.load, then dt.save; or `deltatune convert --base MODEL_DIR`)")


# --- a delta whose tensors need the module sizes --------------------------------------------------------------------
class SizedDelta(Delta):
    """A Delta read from a PEFT file whose state can only be made once the adapted modules' [out, in] sizes are known
    (peft's shared projections are sliced per module, and the file does not record the sizes): `complete(delta,
    sizes)` gives the concrete Delta; `for_model` calls it with the model's sizes."""

    complete: Any = None

    def placed_each(self, sizes: dict[str, tuple[int, int]], place: Callable[[str, dict, int, int], dict],
                    whole: Callable[[str, dict], bool]) -> Delta:
        """The concrete Delta: each module's state replaced by `place(path, state, d_out, d_in)`, except the modules
        kept whole (`whole(path, state)`: peft's modules_to_save), which stay as they are."""
        state = {p: st if whole(p, st) else place(p, st, *sizes[p]) for p, st in self.state.items()}
        return Delta(self.name, self.config, state, dict(self.module_types), dict(self.base))

    def sizes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        lookup = base_lookup(model, self.module_types)
        return {p: tuple(int(v) for v in lookup(p)[0].shape) for p in self.state}  # type: ignore[misc]

    def for_model(self, model: nn.Module) -> Delta:
        return type(self).complete(self, self.sizes(model))

    def update(self, path: str, base: Any = None, with_bias: bool = True) -> tuple[DeltaTensor, Tensor | None]:
        if not isinstance(base, nn.Module):
            raise UnsupportedError(f"PEFT adapter {self.name!r} needs the adapted modules' sizes to place its shared "
                                   f"tensors; pass base= a model (or dt.load it)")
        return self._placed(base).update(path, base, with_bias)

    def _placed(self, model: nn.Module) -> Delta:
        """`for_model(model)`, made once per model: `update` is asked per module path, and completing the delta
        walks every module."""
        cached = getattr(self, "_placed_on", None)
        if cached is None or cached[0]() is not model:
            cached = (weakref.ref(model), self.for_model(model))
            self._placed_on = cached
        return cached[1]

    @property
    def needs_model(self) -> str:  # type: ignore[override]
        return (f"PEFT adapter {self.name!r} needs the adapted modules' sizes to place its shared tensors; load it onto "
                f"the model first (dt.load, then dt.save; or `deltatune convert --base MODEL_DIR`)")


def shared_tensor(parts: dict[str, tuple[tuple[slice, ...], Tensor]], shape: tuple[int, ...], where: str,
                  what: str) -> Tensor:
    """One tensor of `shape` holding every module's `parts[path] = (slices, tensor)` at its slices, as peft's shared
    projections hold every module's; an UnsupportedError names a module whose tensor disagrees with another's where
    their slices overlap (then no single shared tensor gives both)."""
    first = next(iter(parts.values()))[1]
    out = torch.zeros(shape, dtype=first.dtype)
    written = torch.zeros(shape, dtype=torch.bool)
    for path, (where_in, t) in parts.items():
        seen = written[where_in]
        if bool(seen.any()) and not torch.equal(out[where_in][seen], t.to(out.dtype)[seen]):
            raise UnsupportedError(f"{where}: the {what} of {path!r} differ from another module's where peft's single "
                                   f"shared tensor would hold both; it has no PEFT form")
        out[where_in] = t.to(out.dtype)
        written[where_in] = True
    return out


# --- reading -----------------------------------------------------------------------------------------------------
def _load_config(path: Path) -> tuple[dict[str, Any], PeftKind]:
    file = path / CONFIG_FILE
    cfg = read_json(file, error=CorruptFileError)
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{str(file)!r} is not a PEFT adapter config (a JSON object), got {type(cfg).__name__}")
    where = repr(str(file))
    kind = kind_of_type(cfg.get("peft_type"), where)
    check_fields(cfg, where, _FIELD_TYPES)
    mapping = cfg.get("auto_mapping") or {}
    expect(mapping.get("base_model_class") is None or isinstance(mapping["base_model_class"], str), where,
           "auto_mapping.base_model_class", "a class name or null", mapping.get("base_model_class"))
    return cfg, kind


def _check_supported(cfg: dict[str, Any], kind: PeftKind, where: str) -> None:
    active = [f"{feature} ({k}={short(cfg[k])})" for k, feature in kind.refuse.items()
              if cfg.get(k) not in (None, False, [], {})]
    if active:
        raise UnsupportedError(f"{where} uses {'; '.join(active)}, which deltatune cannot represent exactly; it was not "
                               f"loaded")
    if kind.check is not None:
        kind.check(cfg, where)
    unknown = sorted(k for k in set(cfg) - COMMON_FIELDS - kind.fields - set(kind.refuse)
                     if cfg[k] not in (None, False, [], {}, ""))  # a newer peft's option left at its default is harmless
    if unknown:
        warnings.warn(f"{where} sets config keys deltatune does not know for PEFT {kind.peft_type} ({', '.join(unknown)}); "
                      f"they were ignored — if a newer peft gave them a meaning, the result may differ", stacklevel=4)


def _save_roots(cfg: dict[str, Any]) -> tuple[str, ...]:
    roots = cfg.get("modules_to_save") or []  # checked: a name or a list of names
    return (roots,) if isinstance(roots, str) else tuple(roots)


def _whole_modules(file: PeftFile) -> dict[str, dict[str, Tensor]]:
    """The tensors left after the kind's reader that belong to `modules_to_save` modules: {path: {param: t}}; any
    other tensor refuses the file."""
    roots = _save_roots(file.cfg)
    whole: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for name, t in file.tensors.items():
        mod, _, param = name.rpartition(".")
        parts = mod.split(".")
        if roots and mod and any(matches(roots, ".".join(parts[: i + 1])) for i in range(len(parts))):
            whole.setdefault(mod, {})[param] = t
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedError(f"{file.where} holds tensors deltatune's PEFT {file.cfg.get('peft_type')} mapping does not "
                               f"know, e.g. {sorted(unknown)[:4]}; it was not loaded")
    return whole


def read_peft(path: Path, header_only: bool = False) -> Delta:
    """A PEFT adapter directory of any mapped type as a detached Delta (with header_only, of meta tensors read from
    the safetensors header: every check but finiteness)."""
    path = Path(path)
    where = f"PEFT adapter {str(path)!r}"
    cfg, kind = _load_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise UnsupportedError(f"{where} holds only {PICKLE_FILE}, a pickle; deltatune never unpickles files. Convert "
                                   f"it once in a trusted environment: PeftModel.from_pretrained(base, dir)"
                                   f".save_pretrained(new_dir) writes {WEIGHTS_FILE}")
        raise DeltaNotFoundError(f"{where} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    _check_supported(cfg, kind, where)
    flat = read_tensors(weights, header_only=header_only)[0]
    check_finite(flat, str(weights))
    tensors = {(k[len(kind.prefix):] if k.startswith(kind.prefix) else k): t for k, t in flat.items()}
    file = PeftFile(path, where, cfg, tensors, header_only)
    delta = kind.read(file)
    whole = _whole_modules(file)
    if whole:
        try:
            delta.config = delta.config.replace(modules_to_save=tuple(whole))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        for mpath, params in whole.items():
            delta.state[mpath] = params
            delta.module_types[mpath] = "Linear" if params.get("weight") is not None and params["weight"].dim() == 2 else "?"
    if not delta.state:
        raise CorruptFileError(f"{where} holds no adapter tensors")
    return delta


# --- writing -----------------------------------------------------------------------------------------------------
def _auto_mapping(model_class: str | None) -> dict[str, str] | None:
    if not model_class:
        return None
    try:
        import transformers

        cls = getattr(transformers, model_class, None)
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return {"base_model_class": model_class, "parent_library": cls.__module__} if cls is not None else None


#: peft's task type by the end of a transformers model class name (prompt kinds need it to rebuild the model)
_TASKS = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
          ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
          ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type(model_class: str | None) -> str | None:
    """peft's task_type for a transformers model class name, None when it names none of them."""
    for ending, task in _TASKS:
        if model_class and model_class.endswith(ending):
            return task
    return None


def layer_type(fan_in_fan_out: object) -> str:
    """The module type peft's `fan_in_fan_out` flag says a file's weights were made for: transformers' Conv1D
    (weights stored [in, out]) when set, nn.Linear otherwise."""
    return "Conv1D" if fan_in_fan_out else "Linear"


def fan_in_fan_out(delta: Delta, paths: list[str]) -> bool:
    """peft's `fan_in_fan_out` for the delta's modules at `paths`: whether they are Conv1D (peft then sets it per
    module as the module's type needs)."""
    return any(delta.module_types.get(p) == "Conv1D" for p in paths)


def module_key(path: str, name: str) -> str:
    """The peft key of tensor `name` of the module at `path`."""
    return f"{PREFIX}{path}.{name}"


def linear_tensors(delta: Delta, paths: list[str], names: dict[str, str], where: str) -> dict[str, Tensor]:
    """peft's flat tensors of a kind whose peft layers adapt nn.Linear only: each module's state under peft's key
    (`names`: our state name -> peft's tensor name); a module of another type is refused by name."""
    flat: dict[str, Tensor] = {}
    for mpath in paths:
        if delta.module_types.get(mpath) != "Linear":
            raise UnsupportedError(f"{where}: module {mpath!r} is a {delta.module_types.get(mpath)}; peft's "
                                   f"{delta.config.kind} adapts nn.Linear modules only")
        flat.update({module_key(mpath, names[k]): t for k, t in delta.state[mpath].items()})
    return flat


def write_peft(delta: Delta, path: Path) -> Path:
    """Write `delta` as a PEFT adapter directory that `PeftModel.from_pretrained` loads to the same model, with an
    integrity manifest beside the two files (peft ignores it); the directory is replaced as a whole."""
    path = Path(path)
    check_output(path)  # an unsafe output is refused before any work
    kind = kind_of_config(delta.config, delta.name)
    whole_cls = whole_module_config()
    flat: dict[str, Tensor] = {}
    own, save_paths = [], []
    for mpath, st in delta.state.items():
        if isinstance(delta.config.for_module(mpath), whole_cls):
            save_paths.append(mpath)
            flat.update({f"{kind.prefix}{mpath}.{k}": t for k, t in st.items()})
        else:
            own.append(mpath)
    if not own:
        raise UnsupportedError(f"delta {delta.name!r} adapts no module with {delta.config.kind} (only whole modules "
                               f"kept: {save_paths}); the PEFT format needs at least one")
    tensors, fields = kind.write(delta, own, f"delta {delta.name!r}")
    flat.update(tensors)
    model_class = delta.base.get("model_class")
    config = {
        "peft_type": kind.peft_type,
        "task_type": None,  # a kind that needs one (prompts) sets it: task_type(model class)
        "base_model_name_or_path": delta.base.get("model_name"),
        "auto_mapping": _auto_mapping(model_class),
        "modules_to_save": save_paths or None,
        "inference_mode": True,
        **fields,
    }
    data = st_save({k: t.detach().contiguous() for k, t in flat.items()}, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_directory("peft", path, {WEIGHTS_FILE: data, CONFIG_FILE: text.encode("utf-8")})
    return path


register_format(Format("peft", CONFIG_FILE, read_peft, write_peft, "HF peft's adapter directory (every mapped kind)",
                       files=(CONFIG_FILE, WEIGHTS_FILE), companions=(PICKLE_FILE, "README.md"), manifest=True,
                       library="peft",  # any kind: the writer writes only mapped kinds, which peft loads
                       read_meta=lambda path: read_peft(path, header_only=True)))
