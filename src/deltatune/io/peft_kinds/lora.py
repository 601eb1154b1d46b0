"""PEFT LORA <-> LoRA / DoRA.

Per adapted module at `path`:

| PEFT tensor                                     | deltatune piece state                                  |
|-------------------------------------------------|--------------------------------------------------------|
| `<path>.lora_A.weight` [r, in]                  | `lora_A`                                               |
| `<path>.lora_B.weight` [out, r]                 | `lora_B`                                               |
| `<path>.lora_embedding_A` [r, num] / `_B` [dim, r] | `lora_A` / `lora_B` of an Embedding                 |
| `<path>.lora_magnitude_vector` [out] (DoRA)     | `magnitude`                                            |
| `<path>.lora_B.bias` (lora_bias=True): + s·b    | `bias` = s·b (a change of the output bias)             |
| `<path>.base_layer.bias` (bias="lora_only")     | `bias` = file − base: PEFT *replaces* the base's bias, |
|                                                 | so this needs the model (`Delta.for_model`)            |

Scales are s = alpha / r (alpha / √r with use_rslora), with per-module r and alpha from rank_pattern /
alpha_pattern; PEFT's rule for a pattern key is `(.*\\.)?key$` on the module path, which is also ours
(`targeting.pattern_value`), so the patterns carry over as they are.

Writing: LoRA with a weight-derived init (PiSSA/MiLoRA/OLoRA) keeps frozen (A0, B0) and its update is
s·(B A − B0 A0); PEFT gets it as a rank-2r LoRA A' = [A; A0], B' = [B, −B0] whose alpha keeps s unchanged.
Bias changes are written as PEFT's lora_B.bias = Δb / s (lora_bias=True), which needs no base weights.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.errors import CorruptFileError, ShapeMismatchError, UnsupportedError
from ...core.parsing import short
from ...core.targeting import pattern_value
from ...methods.full import Full
from ...methods.lora.lora import LoRA
from ..delta import Delta
from ..peft import PeftDelta, PeftFile, PeftKind, fan_in_fan_out, layer_type, module_key, register_kind
from ..peft.codec import check_fields

_SUFFIXES = {
    ".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_B.bias": "lora_bias",
    ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",  # older PEFT versions
    ".base_layer.bias": "base_bias", ".base_layer.weight": "base_weight",
}
# Config fields that, when set, make a PEFT LoRA compute something deltatune's LoRA does not: field -> feature
_REFUSE = {
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
# config keys of peft's LoraConfig that need no reading here (training-time options, or describe the file)
_KNOWN = frozenset({
    "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_bias", "fan_in_fan_out", "bias",
    "init_lora_weights", "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config",
    "eva_config", "corda_config", "layers_pattern", "runtime_config", "qalora_group_size", "ensure_weight_tying",
    "lora_ga_config", "use_lora_ga", "bdlora_config", "velora_config",
})
# inits after which PEFT's adapter only makes sense on top of base weights PEFT modified at init
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_BOOL = (lambda v: v is None or isinstance(v, bool), "true or false")
_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "lora_dropout": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number"),
    "use_rslora": _BOOL, "use_dora": _BOOL, "lora_bias": _BOOL, "fan_in_fan_out": _BOOL,
    "bias": (lambda v: v is None or isinstance(v, str), "'none', 'all' or 'lora_only'"),
    "init_lora_weights": (lambda v: v is None or isinstance(v, (bool, str)), "true, false or the name of an init"),
}


def _check(cfg: dict[str, Any], where: str) -> None:
    check_fields(cfg, where, _FIELD_TYPES)
    active = []
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
                      f"that modified base", stacklevel=5)


@dataclass
class LoRAPeftDelta(PeftDelta):
    """PeftDelta for LoRA: a bias="lora_only" adapter holds the trained biases themselves (`absolute`); a LoRA
    config with bias="lora_only" also needs a (zero) bias change where the file left a module's bias as it was."""

    replaced = "trained biases (bias='lora_only')"

    def for_model(self, model: nn.Module) -> Delta:
        modules = dict(model.named_modules())
        state = {p: dict(st) for p, st in self.state.items()}
        for path, st in state.items():
            local = self.config.for_module(path)
            if isinstance(local, Full) or path not in modules:  # a module the model lacks: check_fits names it
                continue
            base_bias = getattr(modules.get(path), "bias", None)
            if "bias" not in st:
                if isinstance(base_bias, Tensor) and getattr(local, "bias", "none") == "lora_only":
                    st["bias"] = torch.zeros(base_bias.shape)  # the piece holds a bias here; the file left it as is
                continue
            b = st["bias"]
            if not isinstance(base_bias, Tensor):
                if path not in self.absolute and not bool(b.any()):
                    del st["bias"]  # PEFT's lora_B.bias on a module without bias, left at zero: nothing to add
                    continue
                raise ShapeMismatchError(f"PEFT adapter {self.name!r} changes the bias of {path!r}, but that "
                                         f"{type(modules.get(path)).__name__} has no bias; deltatune's LoRA can only "
                                         f"change existing biases")
            if tuple(base_bias.shape) != tuple(b.shape):
                raise ShapeMismatchError(f"PEFT adapter {self.name!r}: bias of {path!r} has shape {tuple(b.shape)} in "
                                         f"the file but {tuple(base_bias.shape)} on this model")
            if path in self.absolute:
                st["bias"] = b.float() - base_bias.detach().float().to(b.device)
        return Delta(self.name, self.config, state, dict(self.module_types), dict(self.base))


def read(file: PeftFile) -> Delta:
    where, cfg = file.where, file.cfg
    for key in [k for k in file.tensors if ".lora_velora_" in k]:  # VeLoRA's training-time activation compression
        del file.tensors[key]
    lora = file.take(_SUFFIXES)
    for mpath in list(lora):  # bias="lora_only" before PEFT 0.7: the trained bias under the module's own name
        if f"{mpath}.bias" in file.tensors and "base_bias" not in lora[mpath]:
            lora[mpath]["base_bias"] = file.tensors.pop(f"{mpath}.bias")
    ignored = []
    embeddings = set()
    for mpath, parts in list(lora.items()):
        if parts.pop("base_weight", None) is not None:
            ignored.append(f"{mpath}.base_layer.weight")
        if not parts:
            del lora[mpath]
            continue
        dense, emb = {"lora_A", "lora_B"} & set(parts), {"emb_A", "emb_B"} & set(parts)
        if dense and emb:
            raise CorruptFileError(f"{where} mixes lora_A/B and lora_embedding_A/B for module {mpath!r}")
        if emb:
            embeddings.add(mpath)
            parts["lora_A"], parts["lora_B"] = parts.pop("emb_A", None), parts.pop("emb_B", None)
            parts = {k: v for k, v in parts.items() if v is not None}
            lora[mpath] = parts
        missing = {"lora_A", "lora_B"} - set(parts)
        if missing:
            raise CorruptFileError(f"{where} lacks {sorted(missing)} for module {mpath!r}")
    file.floating(lora, "LoRA factors, magnitudes and biases")
    if ignored:
        warnings.warn(f"{where} holds copies of base weights ({ignored[:3]}{', ...' if len(ignored) > 3 else ''}), as PEFT "
                      f"saves for targeted embeddings; they are ignored — deltatune keeps the model's own weights. If the "
                      f"embeddings were resized or trained, load those into the base model first", stacklevel=4)

    r0, alpha0 = file.number("r", int), file.number("lora_alpha", float)
    dropout = cfg.get("lora_dropout") or 0.0
    rank_pattern, alpha_pattern = file.patterns("rank_pattern", int), file.patterns("alpha_pattern")
    dora, lora_bias = file.flag("use_dora"), file.flag("lora_bias")
    absolute = cfg.get("bias", "none") == "lora_only"
    has_bias = any("lora_bias" in p or "base_bias" in p for p in lora.values())
    targets = tuple(lora) or tuple(file.cfg.get("modules_to_save") or ()) or ("none",)
    config = file.config(LoRA, targets=targets, r=r0, alpha=float(alpha0), dropout=float(dropout),
                         rslora=file.flag("use_rslora"), dora=dora, bias="lora_only" if has_bias else "none",
                         rank_pattern=dict(rank_pattern), alpha_pattern=dict(alpha_pattern))
    state: dict[str, dict[str, Tensor]] = {}
    types: dict[str, str] = {}
    absolute_paths: dict[str, dict[str, str]] = {}
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
            st["magnitude"] = file.shape(parts["magnitude"], (b.shape[0],), "lora_magnitude_vector", mpath)
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
            absolute_paths[mpath] = {"bias": "bias"}
        if bias is not None:
            st["bias"] = file.shape(bias, (b.shape[0],), "bias", mpath)
        state[mpath] = st
        types[mpath] = "Embedding" if embedding else layer_type(cfg.get("fan_in_fan_out"))
    return LoRAPeftDelta(file.name(), config, state, types, file.base(), absolute=absolute_paths)


# --- writing -------------------------------------------------------------------------------------------
def pattern_dicts(values: dict[str, tuple[Any, ...]]) -> tuple[tuple[Any, ...], list[dict[str, Any]]]:
    """The most common tuple of per-module values and, for each position, the fewest exact-path patterns (peft's
    rank_pattern / alpha_pattern rule) that give every module its own value."""
    default = Counter(values.values()).most_common(1)[0][0]
    for key in (lambda p: p, lambda p: "^" + re.escape(p)):  # plain paths read best; anchored ones never collide
        dicts = [{key(p): v[i] for p, v in values.items() if v[i] != default[i]} for i in range(len(default))]
        if all(pattern_value(dicts[i], p, default[i]) == v[i] for p, v in values.items() for i in range(len(default))):
            return default, dicts
    raise AssertionError("anchored exact-path patterns always resolve")  # pragma: no cover


def write(delta: Delta, paths: list[str], where: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    cfg = delta.config
    flat: dict[str, Tensor] = {}
    values: dict[str, tuple[int, float]] = {}
    lora_bias = False
    for mpath in paths:
        st, local = delta.state[mpath], cfg.for_module(mpath)
        mtype = delta.module_types.get(mpath)
        if mtype not in ("Linear", "Conv1D", "Embedding"):
            raise UnsupportedError(f"{where}: module {mpath!r} has type {mtype!r}; the PEFT format needs "
                                   f"Linear, Conv1D or Embedding")
        a, b = st["lora_A"], st["lora_B"]
        if "init_A" in st:  # s·(B A − B0 A0) as one plain LoRA of rank 2r
            a, b = torch.cat([a, st["init_A"]]), torch.cat([b, -st["init_B"]], 1)
        r = int(a.shape[0])
        alpha = local.alpha if r == local.r else local.scale * (math.sqrt(r) if cfg.rslora else r)
        values[mpath] = (r, float(alpha))
        if mtype == "Embedding":
            flat[module_key(mpath, "lora_embedding_A")] = a
            flat[module_key(mpath, "lora_embedding_B")] = b
        else:
            flat[module_key(mpath, "lora_A.weight")] = a
            flat[module_key(mpath, "lora_B.weight")] = b
        if cfg.dora:
            flat[module_key(mpath, "lora_magnitude_vector")] = st["magnitude"]
        if "bias" in st:
            if cfg.dora:
                raise UnsupportedError(f"{where}: DoRA with bias changes has no exact PEFT form (PEFT folds lora_bias "
                                       f"into DoRA's weight norm); save it with format='native'")
            lora_bias = True
            flat[module_key(mpath, "lora_B.bias")] = st["bias"] / local.scale  # PEFT adds s · lora_B.bias
    if lora_bias:  # PEFT then gives every targeted module a lora_B.bias; zeros where ours has none
        for mpath in paths:
            key = module_key(mpath, "lora_B.bias")
            if key not in flat:
                if delta.module_types[mpath] == "Embedding":
                    raise UnsupportedError(f"{where}: bias changes together with the embedding {mpath!r} have no PEFT "
                                           f"form (lora_bias is unsupported on embeddings)")
                wb = flat[module_key(mpath, "lora_B.weight")]
                flat[key] = torch.zeros(wb.shape[0], dtype=wb.dtype)
    (r0, alpha0), (ranks, alphas) = pattern_dicts(values)
    return flat, {
        "r": r0, "lora_alpha": alpha0, "target_modules": paths, "rank_pattern": ranks, "alpha_pattern": alphas,
        "use_rslora": cfg.rslora, "use_dora": cfg.dora, "lora_dropout": cfg.dropout, "bias": "none",
        "lora_bias": lora_bias, "fan_in_fan_out": fan_in_fan_out(delta, paths), "init_lora_weights": True,
    }


register_kind(PeftKind("LORA", (LoRA,), read, write, fields=_KNOWN, refuse=_REFUSE, check=_check,
                       description="LoRA and DoRA (rsLoRA, rank/alpha patterns, lora_bias, bias='lora_only', embeddings)"))
