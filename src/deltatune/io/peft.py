"""The PEFT-LoRA codec: PEFT adapter directories (adapter_config.json + adapter_model.safetensors) to and from
`Delta` objects with a `LoRA` config.

Per adapted module at `path` (PEFT prefixes every key with `base_model.model.`):

| PEFT tensor                                     | deltatune piece state                                  |
|-------------------------------------------------|--------------------------------------------------------|
| `<path>.lora_A.weight` [r, in]                  | `lora_A`                                               |
| `<path>.lora_B.weight` [out, r]                 | `lora_B`                                               |
| `<path>.lora_embedding_A` [r, num] / `_B` [dim, r] | `lora_A` / `lora_B` of an Embedding                 |
| `<path>.lora_magnitude_vector` [out] (DoRA)     | `magnitude`                                            |
| `<path>.lora_B.bias` (lora_bias=True): + s·b    | `bias` = s·b (a change of the output bias)             |
| `<path>.base_layer.bias` (bias="lora_only")     | `bias` = file − base: PEFT *replaces* the base's bias, |
|                                                 | so this needs the model (`Delta.for_model`)            |
| `<path>.weight`, `<path>.bias` (modules_to_save) | a `Full` piece: the trained module, saved whole      |

Scales are s = alpha / r (alpha / √r with use_rslora), with per-module r and alpha from rank_pattern /
alpha_pattern; PEFT's rule for a pattern key is `(.*\\.)?key$` on the module path, which is also ours
(`targeting.pattern_value`), so the patterns carry over as they are.

Writing: LoRA with a weight-derived init (PiSSA/MiLoRA/OLoRA) keeps frozen (A0, B0) and its update is
s·(B A − B0 A0); PEFT gets it as a rank-2r LoRA A' = [A; A0], B' = [B, −B0] whose alpha keeps s unchanged.
Bias changes are written as PEFT's lora_B.bias = Δb / s (lora_bias=True), which needs no base weights.
Nothing is ever unpickled, and nothing but safetensors and JSON is written.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from .delta import Delta, base_lookup
from ..core.tensors import DeltaTensor
from ..core.errors import ConfigError, CorruptFileError, DeltaNotFoundError, ShapeMismatchError, UnsupportedError
from ..methods.full import Full
from ..methods.lora.lora import LoRA
from ..core import regex
from ..core.parsing import expect, read_json, short
from ..core.targeting import matches, pattern_value
from .formats import Format, check_output, register_format, write_directory
from .safetensors_io import check_finite, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."

# PEFT tensor-name suffix -> (what it is, "dense" | "embedding" | None)
_SUFFIXES: dict[str, tuple[str, str | None]] = {
    ".lora_A.weight": ("lora_A", "dense"),
    ".lora_B.weight": ("lora_B", "dense"),
    ".lora_B.bias": ("lora_bias", "dense"),
    ".lora_embedding_A": ("lora_A", "embedding"),
    ".lora_embedding_B": ("lora_B", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_magnitude_vector.weight": ("magnitude", None),  # older PEFT versions
    ".base_layer.bias": ("base_bias", None),
    ".base_layer.weight": ("base_weight", None),
}
# Config fields that, when set, make a PEFT LoRA compute something deltatune's LoRA does not: field -> feature
_UNSUPPORTED_FIELDS = {
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "use_qalora": "QA-LoRA",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "trainable_token_indices": "trainable tokens",
}
# inits after which PEFT's adapter only makes sense on top of base weights PEFT modified at init
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# --- reading -------------------------------------------------------------------------------------------
@dataclass
class PeftDelta(Delta):
    """A Delta read from a PEFT file whose biases at `absolute_bias` paths are the trained biases themselves
    (PEFT bias="lora_only" replaces the base's bias); `for_model` turns them into changes."""

    absolute_bias: tuple[str, ...] = ()

    def for_model(self, model: nn.Module) -> Delta:
        modules = dict(model.named_modules())
        state = {p: dict(st) for p, st in self.state.items()}
        for path, st in state.items():
            local = self.config.for_module(path)
            if isinstance(local, Full):
                continue
            base_bias = getattr(modules.get(path), "bias", None)
            if "bias" not in st:
                if isinstance(base_bias, Tensor) and getattr(local, "bias", "none") == "lora_only":
                    st["bias"] = torch.zeros(base_bias.shape)  # the piece holds a bias here; the file left it as is
                continue
            b = st["bias"]
            if not isinstance(base_bias, Tensor):
                if path not in self.absolute_bias and not bool(b.any()):
                    del st["bias"]  # PEFT's lora_B.bias on a module without bias, left at zero: nothing to add
                    continue
                raise ShapeMismatchError(f"PEFT adapter {self.name!r} changes the bias of {path!r}, but that "
                                         f"{type(modules.get(path)).__name__} has no bias; deltatune's LoRA can only "
                                         f"change existing biases")
            if tuple(base_bias.shape) != tuple(b.shape):
                raise ShapeMismatchError(f"PEFT adapter {self.name!r}: bias of {path!r} has shape {tuple(b.shape)} in "
                                         f"the file but {tuple(base_bias.shape)} on this model")
            if path in self.absolute_bias:
                st["bias"] = b.float() - base_bias.detach().float().to(b.device)
        return Delta(self.name, self.config, state, dict(self.module_types), dict(self.base))

    def update(self, path: str, base: Any = None, with_bias: bool = True) -> tuple[DeltaTensor, Tensor | None]:
        dw, db = super().update(path, base)
        if path in self.absolute_bias and db is not None and with_bias:
            if base is None:
                raise UnsupportedError(f"PEFT adapter {self.name!r} stores trained biases (bias='lora_only') that replace "
                                       f"the base model's; their change needs the base: pass base= (or dt.load it)")
            base_bias = base_lookup(base, self.module_types)(path)[1]
            db = db.float() - base_bias.float().to(db.device) if base_bias is not None else db
        return dw, db

    def write(self, path: str | Path) -> Path:
        if self.absolute_bias:
            raise UnsupportedError(f"PEFT adapter {self.name!r} stores trained biases (bias='lora_only') that replace the "
                                   f"base model's; their change needs the base: dt.load it into the model and dt.save")
        return super().write(path)


def _load_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    cfg = read_json(file, error=CorruptFileError)
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{str(file)!r} is not a PEFT adapter config (a JSON object), got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedError(f"{str(file)!r} is a PEFT {short(peft_type)} adapter; deltatune reads PEFT LoRA/DoRA "
                               f"adapters (peft_type 'LORA') only")
    _check_fields(cfg, repr(str(file)))
    return cfg


# the type of every config field the reader uses: field -> (accepts?, what is expected)
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "lora_dropout": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "bias": (lambda v: v is None or isinstance(v, str), "'none', 'all' or 'lora_only'"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or the name of an init"),
    "modules_to_save": (lambda v: v is None or isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(m, str) and m for m in v)), "a list of module names or null"),
    "base_model_name_or_path": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "auto_mapping": (lambda v: v is None or isinstance(v, dict), "an object or null"),
}


def _check_fields(cfg: dict[str, Any], where: str) -> None:
    for key, (ok, expected) in _FIELD_TYPES.items():
        if key in cfg:
            expect(ok(cfg[key]), where, key, expected, cfg[key])
    mapping = cfg.get("auto_mapping") or {}
    expect(mapping.get("base_model_class") is None or isinstance(mapping["base_model_class"], str), where,
           "auto_mapping.base_model_class", "a class name or null", mapping.get("base_model_class"))


def _check_supported(cfg: dict[str, Any], where: str) -> None:
    active = [f"{_UNSUPPORTED_FIELDS[k]} ({k}={short(cfg[k])})" for k in _UNSUPPORTED_FIELDS
              if cfg.get(k) not in (None, False, [], {})]
    if cfg.get("init_lora_weights") == "mica":
        active.append("MiCA (init_lora_weights='mica')")
    if cfg.get("bias", "none") not in ("none", "lora_only"):
        active.append(f"bias={short(cfg['bias'])} (PEFT then stores every bias of the model, not a delta)")
    if cfg.get("lora_bias") and cfg.get("use_dora"):
        active.append("lora_bias=True with use_dora=True (PEFT then folds the bias into DoRA's weight norm)")
    if active:
        raise UnsupportedError(f"{where} uses {'; '.join(active)}, which deltatune's LoRA cannot represent exactly; "
                               f"it was not loaded")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        warnings.warn(f"{where} was made with init_lora_weights={init!r}, which modifies the base weights; unless it was "
                      f"saved with path_initial_model_for_weight_conversion it only reproduces the fine-tuned model on "
                      f"that modified base", stacklevel=4)


def _number(cfg: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = cfg.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or (kind is int and not isinstance(value, int)):
        raise CorruptFileError(f"{where}: {key}={short(value)} is not a {'whole ' if kind is int else ''}number")
    return value


def _patterns(cfg: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise CorruptFileError(f"{where}: {key} must be an object mapping module patterns to values, got {short(value)}")
    for pattern in value:
        try:
            regex.check(pattern)
        except regex.RegexError as e:
            raise CorruptFileError(f"{where}: {key} key {short(pattern)} {e}") from None
    return value


def _group_tensors(flat: dict[str, Tensor], cfg: dict[str, Any], where: str) -> tuple[dict, dict, set[str], list[str]]:
    """Split file tensors into LoRA modules {path: {what: t}}, modules_to_save {path: {param: t}}, the embedding
    paths among the LoRA modules, and the ignored base-weight keys."""
    lora: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, set[str]] = {}
    rest: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, t in flat.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if ".lora_velora_" in name:  # VeLoRA's training-time activation compression state
            continue
        for suffix, (what, kind) in _SUFFIXES.items():
            if name.endswith(suffix):
                path = name[: -len(suffix)]
                if what in lora.setdefault(path, {}):
                    raise CorruptFileError(f"{where} holds {what} of {path!r} twice (e.g. {key!r})")
                lora[path][what] = t
                if kind:
                    kinds.setdefault(path, set()).add(kind)
                break
        else:
            rest[name] = t
    save_roots = cfg.get("modules_to_save") or []  # checked by _check_fields: a name or a list of names
    if isinstance(save_roots, str):
        save_roots = [save_roots]
    full: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for name, t in rest.items():
        mod, _, param = name.rpartition(".")
        if mod in lora and param == "bias" and "base_bias" not in lora[mod]:  # bias="lora_only" before PEFT 0.7
            lora[mod]["base_bias"] = t
        elif save_roots and any(matches(tuple(save_roots), ".".join(mod.split(".")[:i + 1]))
                                for i in range(len(mod.split(".")))):
            full.setdefault(mod, {})[param] = t
        else:
            unknown.append(name)
    if unknown:
        raise UnsupportedError(f"{where} holds tensors deltatune's LoRA does not know, e.g. {sorted(unknown)[:4]}; it was "
                               f"not loaded")
    for path, parts in list(lora.items()):
        if "base_weight" in parts:
            ignored.append(f"{path}.base_layer.weight")
            del parts["base_weight"]
        if not parts:
            del lora[path]
            continue
        missing = {"lora_A", "lora_B"} - set(parts)
        if missing:
            raise CorruptFileError(f"{where} lacks {sorted(missing)} for module {path!r}")
        if len(kinds[path]) > 1:
            raise CorruptFileError(f"{where} mixes lora_A/B and lora_embedding_A/B for module {path!r}")
    embeddings = {p for p in lora if kinds[p] == {"embedding"}}
    return lora, full, embeddings, ignored


def read_peft(path: Path, header_only: bool = False) -> Delta:
    """A PEFT LoRA/DoRA adapter directory as a detached Delta with a LoRA config (with header_only, of meta tensors
    read from the safetensors header: every check but finiteness)."""
    path = Path(path)
    where = f"PEFT adapter {str(path)!r}"
    cfg = _load_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise UnsupportedError(f"{where} holds only {PICKLE_FILE}, a pickle; deltatune never unpickles files. Convert "
                                   f"it once in a trusted environment: PeftModel.from_pretrained(base, dir)"
                                   f".save_pretrained(new_dir) writes {WEIGHTS_FILE}")
        raise DeltaNotFoundError(f"{where} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    _check_supported(cfg, where)
    flat = read_tensors(weights, header_only=header_only)[0]
    check_finite(flat, str(weights))
    lora, full, embeddings, ignored = _group_tensors(flat, cfg, where)
    for mpath, parts in lora.items():
        for what, t in parts.items():
            if not t.is_floating_point():
                raise CorruptFileError(f"{where}: {what} of module {short(mpath)} holds {t.dtype} values; LoRA factors, "
                                       f"magnitudes and biases are floating point")
    if ignored:
        warnings.warn(f"{where} holds copies of base weights ({ignored[:3]}{', ...' if len(ignored) > 3 else ''}), as PEFT "
                      f"saves for targeted embeddings; they are ignored — deltatune keeps the model's own weights. If the "
                      f"embeddings were resized or trained, load those into the base model first", stacklevel=3)
    if not lora and not full:
        raise CorruptFileError(f"{where} holds no LoRA tensors")

    r0, alpha0 = _number(cfg, "r", int, where), _number(cfg, "lora_alpha", float, where)
    dropout = cfg.get("lora_dropout") or 0.0  # a number (checked by _check_fields)
    rank_pattern, alpha_pattern = _patterns(cfg, "rank_pattern", where), _patterns(cfg, "alpha_pattern", where)
    dora, lora_bias = bool(cfg.get("use_dora")), bool(cfg.get("lora_bias"))
    absolute = cfg.get("bias", "none") == "lora_only"
    has_bias = any("lora_bias" in p or "base_bias" in p for p in lora.values())
    try:
        config = LoRA(targets=tuple(lora) or tuple(full), r=r0, alpha=float(alpha0), dropout=float(dropout),
                      rslora=bool(cfg.get("use_rslora")), dora=dora, bias="lora_only" if has_bias else "none",
                      rank_pattern=dict(rank_pattern), alpha_pattern=dict(alpha_pattern), modules_to_save=tuple(full))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None

    state: dict[str, dict[str, Tensor]] = {}
    types: dict[str, str] = {}
    absolute_paths = []
    for mpath, parts in lora.items():
        a, b, embedding = parts["lora_A"], parts["lora_B"], mpath in embeddings
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedError(f"{where}: module {mpath!r} has lora_A {tuple(a.shape)}; deltatune's LoRA adapts "
                                   f"Linear, Conv1D and Embedding modules, not convolutions")
        if a.shape[0] != b.shape[1]:
            raise CorruptFileError(f"{where}: module {mpath!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                                   f"whose ranks differ")
        local = config.resolve(mpath)
        if local.r != a.shape[0]:
            raise CorruptFileError(f"{where}: module {mpath!r} has rank {a.shape[0]} in the tensors but {local.r} by the "
                                   f"config's r/rank_pattern")
        st = {"lora_A": a, "lora_B": b}
        if dora:
            if embedding:
                raise UnsupportedError(f"{where}: DoRA on the embedding {mpath!r}; deltatune's DoRA adapts Linear and "
                                       f"Conv1D modules only")
            if "magnitude" not in parts:
                raise CorruptFileError(f"{where}: use_dora is set but module {mpath!r} has no lora_magnitude_vector")
            if tuple(parts["magnitude"].shape) != (b.shape[0],):
                raise CorruptFileError(f"{where}: lora_magnitude_vector of {mpath!r} has shape "
                                       f"{tuple(parts['magnitude'].shape)}, expected ({b.shape[0]},)")
            st["magnitude"] = parts["magnitude"]
        elif "magnitude" in parts:
            raise CorruptFileError(f"{where}: module {mpath!r} has a DoRA magnitude but use_dora is not set")
        bias = None
        if "lora_bias" in parts:
            if not lora_bias:
                raise CorruptFileError(f"{where}: module {mpath!r} has lora_B.bias but lora_bias is not set")
            bias = parts["lora_bias"].float() * local.scale
        if "base_bias" in parts:
            if not absolute:
                raise UnsupportedError(f"{where} stores the base bias of {mpath!r} (bias={cfg.get('bias')!r}); deltatune "
                                       f"keeps the model's own weights")
            bias = parts["base_bias"].float() + (bias if bias is not None else 0.0)
            absolute_paths.append(mpath)
        if bias is not None:
            if bias.shape != (b.shape[0],):
                raise CorruptFileError(f"{where}: bias of {mpath!r} has shape {tuple(bias.shape)}, expected ({b.shape[0]},)")
            st["bias"] = bias
        state[mpath] = st
        types[mpath] = "Embedding" if embedding else ("Conv1D" if cfg.get("fan_in_fan_out") else "Linear")
    for mpath, params in full.items():
        state[mpath] = params
        types[mpath] = "Linear" if params.get("weight") is not None and params["weight"].dim() == 2 else "?"

    mapping = cfg.get("auto_mapping") if isinstance(cfg.get("auto_mapping"), dict) else {}
    base = {"model_class": mapping.get("base_model_class"), "model_name": cfg.get("base_model_name_or_path"),
            "weight_shapes": {}}
    name = re.sub(r"[./]", "_", path.resolve().name) or "default"
    return PeftDelta(name, config, state, types, base, absolute_bias=tuple(absolute_paths))


# --- writing -------------------------------------------------------------------------------------------
def _pattern_dicts(values: dict[str, tuple[int, float]]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """Default (r, alpha) and the fewest exact-path patterns that give every module its own (r, alpha)."""
    r0, alpha0 = Counter(values.values()).most_common(1)[0][0]
    for key in (lambda p: p, lambda p: "^" + re.escape(p)):  # plain paths read best; anchored ones never collide
        ranks = {key(p): r for p, (r, _) in values.items() if r != r0}
        alphas = {key(p): a for p, (_, a) in values.items() if a != alpha0}
        if all(pattern_value(ranks, p, r0) == r and pattern_value(alphas, p, alpha0) == a for p, (r, a) in values.items()):
            return r0, alpha0, ranks, alphas
    raise AssertionError("anchored exact-path patterns always resolve")  # pragma: no cover


def _auto_mapping(model_class: str | None) -> dict[str, str] | None:
    if not model_class:
        return None
    try:
        import transformers

        cls = getattr(transformers, model_class, None)
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return {"base_model_class": model_class, "parent_library": cls.__module__} if cls is not None else None


def write_peft(delta: Delta, path: Path) -> Path:
    """Write `delta` as a PEFT LoRA adapter directory that `PeftModel.from_pretrained` loads to the same model, with an
    integrity manifest beside the two files (peft ignores it); the directory is replaced as a whole."""
    path = Path(path)
    check_output(path)  # an unsafe output is refused before any work
    cfg = delta.config
    if not isinstance(cfg, LoRA):
        raise UnsupportedError(f"delta {delta.name!r} is a {cfg.kind!r} delta; the PEFT format holds LoRA/DoRA "
                               f"adapters only — save it with format='native'")
    if isinstance(delta, PeftDelta) and delta.absolute_bias:
        raise UnsupportedError(f"PEFT adapter {delta.name!r} stores trained biases (bias='lora_only') that replace the "
                               f"base model's; load it with dt.load(model, path) and save from the model")
    flat: dict[str, Tensor] = {}
    values: dict[str, tuple[int, float]] = {}
    lora_paths, save_paths, conv1d, lora_bias = [], [], False, False
    for mpath, st in delta.state.items():
        local = cfg.for_module(mpath)
        if isinstance(local, Full):
            save_paths.append(mpath)
            flat.update({f"{PREFIX}{mpath}.{k}": t for k, t in st.items()})
            continue
        mtype = delta.module_types.get(mpath)
        if mtype not in ("Linear", "Conv1D", "Embedding"):
            raise UnsupportedError(f"delta {delta.name!r}: module {mpath!r} has type {mtype!r}; the PEFT format needs "
                                   f"Linear, Conv1D or Embedding")
        a, b = st["lora_A"], st["lora_B"]
        if "init_A" in st:  # s·(B A − B0 A0) as one plain LoRA of rank 2r
            a, b = torch.cat([a, st["init_A"]]), torch.cat([b, -st["init_B"]], 1)
        r = int(a.shape[0])
        alpha = local.alpha if r == local.r else local.scale * (math.sqrt(r) if cfg.rslora else r)
        values[mpath] = (r, float(alpha))
        lora_paths.append(mpath)
        conv1d |= mtype == "Conv1D"
        if mtype == "Embedding":
            flat[f"{PREFIX}{mpath}.lora_embedding_A"] = a
            flat[f"{PREFIX}{mpath}.lora_embedding_B"] = b
        else:
            flat[f"{PREFIX}{mpath}.lora_A.weight"] = a
            flat[f"{PREFIX}{mpath}.lora_B.weight"] = b
        if cfg.dora:
            flat[f"{PREFIX}{mpath}.lora_magnitude_vector"] = st["magnitude"]
        if "bias" in st:
            if cfg.dora:
                raise UnsupportedError(f"delta {delta.name!r}: DoRA with bias changes has no exact PEFT form (PEFT folds "
                                       f"lora_bias into DoRA's weight norm); save it with format='native'")
            lora_bias = True
            flat[f"{PREFIX}{mpath}.lora_B.bias"] = st["bias"] / local.scale  # PEFT adds s · lora_B.bias
    if not lora_paths:
        raise UnsupportedError(f"delta {delta.name!r} adapts no module with LoRA; the PEFT format needs at least one")
    if lora_bias:  # PEFT then gives every targeted module a lora_B.bias; zeros where ours has none
        for mpath in lora_paths:
            key = f"{PREFIX}{mpath}.lora_B.bias"
            if key not in flat:
                if delta.module_types[mpath] == "Embedding":
                    raise UnsupportedError(f"delta {delta.name!r}: bias changes together with the embedding {mpath!r} "
                                           f"have no PEFT form (lora_bias is unsupported on embeddings)")
                flat[key] = torch.zeros(flat[f"{PREFIX}{mpath}.lora_B.weight"].shape[0],
                                        dtype=flat[f"{PREFIX}{mpath}.lora_B.weight"].dtype)
    r0, alpha0, ranks, alphas = _pattern_dicts(values)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": delta.base.get("model_name"),
        "auto_mapping": _auto_mapping(delta.base.get("model_class")),
        "r": r0,
        "lora_alpha": alpha0,
        "target_modules": lora_paths,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "lora_dropout": cfg.dropout,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": conv1d,
        "modules_to_save": save_paths or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    data = st_save({k: t.detach().contiguous() for k, t in flat.items()}, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    write_directory("peft", path, {WEIGHTS_FILE: data, CONFIG_FILE: text.encode("utf-8")})
    return path


register_format(Format("peft", CONFIG_FILE, read_peft, write_peft, "HF peft's adapter directory (LoRA/DoRA)",
                       files=(CONFIG_FILE, WEIGHTS_FILE), companions=(PICKLE_FILE, "README.md"), manifest=True,
                       read_meta=lambda path: read_peft(path, header_only=True)))
