"""The AdapterHub codec: directories that AdapterHub's `adapters` (1.x) writes with `save_adapter(...,
use_safetensors=True)` — adapter_config.json + adapter.safetensors — to and from `Delta` objects.

Reading maps each AdapterHub method onto the deltatune method that computes the same function (docs/formats.md,
"AdapterHub", has the derivations); a config whose computation has no deltatune equivalent is refused by name:

| AdapterHub config                                   | deltatune                                                |
|-----------------------------------------------------|----------------------------------------------------------|
| bottleneck, original_ln_before=False (Houlsby, `double_seq_bn`) | Houlsby / Pfeiffer series pieces on the projections: h -> h + s·f(h) |
| bottleneck, original_ln_before=True, residual_before_ln=True (Pfeiffer, `seq_bn`) | the same with original_ln_before: on the block's LayerNorm, z -> z + s·f(LN(z)) (BERT-style blocks) |
| bottleneck, is_parallel (`par_bn`)                  | ParallelAdapter on the block, its residual argument: r -> r + s·f(r) (BERT-style blocks) |
| LoRA (composition_mode "add")                       | LoRA: ΔW = alpha/r · B A on the same modules             |
| prefix tuning (flat or through its MLP)             | PrefixTuning: the pool's prefixes computed once, per layer, as plain keys and values |

Per bottleneck adapter `<site>.adapters.<name>.adapter_down.0.{weight,bias}` / `adapter_up.{weight,bias}` are
D, b_D, U, b_U. AdapterHub stores prefixes for all layers in one pool whose shape depends on the model's key/value
heads, which the file does not record: a prefix delta read from a file holds them as [1, n, layers·2·d_kv] at the
first attention module and is made concrete by `for_model` (so `dt.load` reads it; conversion without a model
refuses it). Writing supports the bottleneck adapters (the other direction of the first three rows); LoRA goes to
PEFT (`format="peft"`). A pickle-only directory (pytorch_adapter.bin) is refused: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import CorruptFileError, DeltaNotFoundError, ShapeMismatchError, TargetError, UnsupportedError
from ..core.parsing import expect, read_json, short
from ..methods.adapters.adapters import NON_LINEARITIES, Houlsby, ParallelAdapter, Pfeiffer, _Series
from ..methods.lora.lora import LoRA
from ..methods.prompts.prompts import PrefixTuning, attention_shape
from .delta import Delta
from .formats import Format, check_output, register_format, write_directory
from .safetensors_io import check_finite, read_tensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
VERSION = "adapters.1.3.0"  # the version the writer's files are checked against (tests/fixtures/adapterhub)

# --- where AdapterHub puts things, per model_type ---------------------------------------------------------------
# bottleneck sites: the key's module path below the layer -> the module deltatune adapts, for series adapters on the
# projection ("series"), on the block's LayerNorm ("norm") and parallel adapters on the block ("parallel", whose
# residual argument is input_arg 1). Absent: AdapterHub computes something there that deltatune cannot (see docs).
_BERT = {"layer": r"(?P<root>.*?)(?P<layer>encoder\.layer\.\d+)\.",
         "attention": "encoder.layer.{i}.attention.self",  # where prefix tuning's keys and values go
         "sites": {"attention.output": {"series": "attention.output.dense", "norm": "attention.output.LayerNorm",
                                        "parallel": "attention.output"},
                   "output": {"series": "output.dense", "norm": "output.LayerNorm", "parallel": "output"}}}
_LLAMA = {"layer": r"(?P<root>.*?)(?P<layer>layers\.\d+)\.",
          "attention": None,  # adapters 1.3 does not apply prefix tuning on Llama (docs/formats.md)
          "sites": {"attention_adapters": {"series": "self_attn.o_proj"},
                    "output_adapters": {"series": "mlp.down_proj"}},
          # pre-LN blocks have no LayerNorm after the residual add: AdapterHub's adapters there read the residual stream
          "why": {"norm": "reads the residual stream h + r (there is no LayerNorm after the add); deltatune's series "
                          "adapters read the projection's output",
                  "parallel": "reads the un-normalised residual stream; deltatune's parallel adapter reads the FFN "
                              "block's (normalised) input"}}
ARCHITECTURES: dict[str, dict[str, Any]] = {"bert": _BERT, "roberta": _BERT, "llama": _LLAMA}  # those tested
# AdapterHub activation names (transformers' get_activation, lower-cased) -> deltatune's
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
_BN_PARAMS = {"adapter_down.0.weight": "down_weight", "adapter_down.0.bias": "down_bias",
              "adapter_up.weight": "up_weight", "adapter_up.bias": "up_bias"}
# bottleneck options that add parts deltatune's adapters do not have: field -> (value that is fine, what it adds)
_BN_REFUSED = {"phm_layer": (False, "PHM (Compacter) projections"), "use_gating": (False, "a gate (UniPELT)"),
               "ln_before": (False, "a LayerNorm of its own before the bottleneck"),
               "ln_after": (False, "a LayerNorm of its own after the bottleneck"),
               "inv_adapter": (None, "invertible adapters on the embeddings"),
               "cross_adapter": (False, "cross-attention adapters")}
_LORA_REFUSED = {"use_gating": (False, "a gate"), "use_dora": (False, "DoRA"), "vera_d": (None, "VeRA"),
                 "vera_b": (None, "VeRA"), "composition_mode": ("add", "composition_mode 'scale' ((IA)³)")}


def claims(path: Path) -> bool:
    """An AdapterHub directory: its adapter_config.json is an object with `config` and no PEFT `peft_type`."""
    try:
        cfg = read_json(path / CONFIG_FILE, error=CorruptFileError)
    except (CorruptFileError, OSError):
        return False
    return isinstance(cfg, dict) and "config" in cfg and "peft_type" not in cfg


# --- reading ------------------------------------------------------------------------------------------------------
def _config(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    file = path / CONFIG_FILE
    where = repr(str(file))
    meta = read_json(file, error=CorruptFileError)
    expect(isinstance(meta, dict), where, "the file", "an AdapterHub adapter config (a JSON object)", meta)
    cfg = meta.get("config")
    expect(isinstance(cfg, dict), where, "config", "the adapter's config as an object", cfg)
    name = meta.get("name")
    expect(isinstance(name, str) and bool(name), where, "name", "the adapter's name", name)
    return meta, cfg, where


def _check(cfg: dict[str, Any], refused: dict[str, tuple[Any, str]], where: str, what: str) -> None:
    for key, (fine, adds) in refused.items():
        if cfg.get(key, fine) not in (fine, None if fine is False else fine):
            raise UnsupportedError(f"{where}: the AdapterHub {what} sets {key}={short(cfg[key])}, which adds {adds}; "
                                   f"deltatune has no equivalent, so it cannot load this adapter")


def _activation(cfg: dict[str, Any], where: str) -> str:
    act = cfg.get("non_linearity")
    expect(isinstance(act, str), where, "config.non_linearity", "an activation name", act)
    if act.lower() not in _ACTIVATIONS:
        raise UnsupportedError(f"{where}: the AdapterHub activation {short(act)} has no deltatune equivalent (deltatune's "
                               f"adapters use {sorted(_ACTIVATIONS)})")
    return _ACTIVATIONS[act.lower()]


def _architecture(meta: dict[str, Any], where: str) -> dict[str, Any]:
    kind = meta.get("model_type")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise UnsupportedError(f"{where}: model_type {short(kind)}; deltatune maps AdapterHub adapters of "
                               f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[kind]


def _tensors(path: Path, where: str, header_only: bool) -> dict[str, Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise UnsupportedError(f"{str(path)!r} holds the AdapterHub adapter only as a pickle ({PICKLE_FILE}), which "
                                   f"deltatune never loads (unpickling runs code from the file). Re-save it with "
                                   f"safetensors where `adapters` is installed: name = model.load_adapter({str(path)!r}); "
                                   f"model.save_adapter(OUT_DIR, name, use_safetensors=True)")
        raise DeltaNotFoundError(f"{str(path)!r} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    flat, _ = read_tensors(weights, header_only=header_only)
    check_finite(flat, str(weights))
    return flat


def _bottleneck(meta: dict, cfg: dict, flat: dict[str, Tensor], name: str, where: str) -> tuple[DeltaConfig, dict]:
    _check(cfg, _BN_REFUSED, where, "bottleneck adapter")
    scaling = cfg.get("scaling", 1.0)
    if isinstance(scaling, str) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise UnsupportedError(f"{where}: the AdapterHub adapter learns its scaling ({short(scaling)}); deltatune's "
                               f"adapters scale by a fixed number")
    if not cfg.get("original_ln_after", True):
        raise UnsupportedError(f"{where}: original_ln_after=false drops the block's residual connection and LayerNorm "
                               f"after the adapter, which no deltatune adapter does")
    parallel, before = bool(cfg.get("is_parallel")), bool(cfg.get("original_ln_before"))
    if not parallel and before and cfg.get("residual_before_ln", True) is not True:
        raise UnsupportedError(f"{where}: with original_ln_before, residual_before_ln={short(cfg.get('residual_before_ln'))} "
                               f"adds the block's residual twice or the normalised sum to the adapter's output; deltatune "
                               f"supports residual_before_ln=true there (AdapterHub's seq_bn)")
    if not parallel and not before and cfg.get("residual_before_ln", True) == "post_add":
        raise UnsupportedError(f"{where}: residual_before_ln='post_add' needs original_ln_before")
    mode = "parallel" if parallel else "norm" if before else "series"
    arch = _architecture(meta, where)
    layer = re.compile(arch["layer"])
    state: dict[str, dict[str, Tensor]] = {}
    sep = f".adapters.{name}."
    for key, t in flat.items():
        site, found, param = key.partition(sep)
        m = layer.match(site)
        if not found or m is None or param not in _BN_PARAMS:
            raise CorruptFileError(f"{where}: tensor {short(key)} is not a part of bottleneck adapter {short(name)}")
        local = site[m.end():]
        target = arch["sites"].get(local, {}).get(mode)
        if target is None:
            why = arch.get("why", {}).get(mode, "is at a place deltatune's adapters do not go")
            raise UnsupportedError(f"{where}: the AdapterHub {'Pfeiffer-placed (original_ln_before)' if mode == 'norm' else mode} "
                                   f"adapter at {short(local)} of a {meta.get('model_type')} model {why} "
                                   f"(docs/formats.md, 'AdapterHub')")
        state.setdefault(f"{m.group('root')}{m.group('layer')}.{target}", {})[_BN_PARAMS[param]] = t
    if not state:
        raise CorruptFileError(f"{where}: {WEIGHTS_FILE} holds no tensors of adapter {short(name)}")
    widths = {int(st["down_weight"].shape[0]) for st in state.values() if "down_weight" in st}
    common = dict(targets=tuple(sorted(state)), bottleneck=widths.pop() if len(widths) == 1 else None,
                  non_linearity=_activation(cfg, where), scaling=float(scaling),
                  init="kaiming" if cfg.get("init_weights") == "mam_adapter" else "normal")
    rf = cfg.get("reduction_factor")
    if isinstance(rf, (int, float)) and not isinstance(rf, bool) and rf > 0:
        common["reduction_factor"] = float(rf)
    if common["bottleneck"] is None:
        raise UnsupportedError(f"{where}: the adapter's bottleneck width differs between layers (reduction_factor "
                               f"{short(rf)}); a deltatune adapter has one width")
    if parallel:
        config: DeltaConfig = ParallelAdapter(input_arg=1, **common)
    else:
        cls = Houlsby if cfg.get("mh_adapter") else Pfeiffer
        config = cls(original_ln_before=before, **common)
    return config, state


def _lora(meta: dict, cfg: dict, flat: dict[str, Tensor], name: str, where: str) -> tuple[DeltaConfig, dict]:
    _check(cfg, _LORA_REFUSED, where, "LoRA")
    r, alpha = cfg.get("r"), cfg.get("alpha")
    expect(type(r) is int and r > 0, where, "config.r", "a positive integer", r)
    expect(isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha != 0, where, "config.alpha",
           "a non-zero number", alpha)
    state: dict[str, dict[str, Tensor]] = {}
    sep = f".loras.{name}."
    for key, t in flat.items():
        module, found, param = key.partition(sep)
        if not found or param not in ("lora_A", "lora_B"):
            raise CorruptFileError(f"{where}: tensor {short(key)} is not a part of LoRA adapter {short(name)}")
        state.setdefault(module, {})[param] = t
    ranks = {int(st["lora_A"].shape[0]) for st in state.values() if "lora_A" in st}
    if ranks - {r}:
        raise ShapeMismatchError(f"{where}: config.r is {r} but the tensors have rank {sorted(ranks)}")
    dropout = cfg.get("dropout") or 0.0
    expect(isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1, where,
           "config.dropout", "a probability", dropout)
    return LoRA(targets=tuple(sorted(state)), r=r, alpha=float(alpha), dropout=float(dropout or 0.0)), state


def _prefix(meta: dict, cfg: dict, flat: dict[str, Tensor], name: str, where: str) -> tuple[DeltaConfig, dict]:
    if cfg.get("use_gating"):
        raise UnsupportedError(f"{where}: the AdapterHub prefix tuning gates its prefixes (use_gating, UniPELT); "
                               f"deltatune's prefixes have no gate")
    arch = _architecture(meta, where)
    if arch["attention"] is None:
        raise UnsupportedError(f"{where}: AdapterHub prefix tuning on {meta.get('model_type')} models is not read: "
                               f"adapters 1.3 (with transformers 4.57) does not apply these prefixes — its outputs equal "
                               f"the base model's — so no deltatune delta reproduces what the adapter does there "
                               f"(docs/formats.md, 'AdapterHub')")
    leave_out = cfg.get("leave_out") or []
    expect(isinstance(leave_out, list) and all(type(i) is int for i in leave_out), where, "config.leave_out",
           "a list of layer indices", leave_out)
    length = cfg.get("prefix_length")
    expect(type(length) is int and length > 0, where, "config.prefix_length", "a positive integer", length)
    pool = re.compile(rf"(?P<root>.*?)prefix_tuning\.prefix_tunings\.{re.escape(name)}\.(?P<loc>[^.]+)\.(?P<param>.+)")
    parts: dict[str, Tensor] = {}
    root = ""
    for key, t in flat.items():
        m = pool.fullmatch(key)
        if m is None:
            raise CorruptFileError(f"{where}: tensor {short(key)} is not a part of prefix tuning {short(name)}")
        if m.group("loc") != "self_prefix":
            raise UnsupportedError(f"{where}: prefixes at {short(m.group('loc'))}; deltatune reads self-attention "
                                   f"prefixes (self_prefix) only")
        parts[m.group("param")] = t
        root = m.group("root")
    flat_pool = bool(cfg.get("flat"))
    need = {"control_trans"} if flat_pool else {"wte.weight", "control_trans.0.weight", "control_trans.0.bias",
                                                "control_trans.2.weight", "control_trans.2.bias"}
    if set(parts) != need:
        raise CorruptFileError(f"{where}: prefix tuning {short(name)} (flat={flat_pool}) holds {short(sorted(parts))}; "
                               f"expected {sorted(need)}")
    try:
        if flat_pool:
            kv = parts["control_trans"].float().reshape(length, -1)
        else:  # the MLP the pool runs on its embedding of positions 0..n-1
            act = _activation(cfg, where)
            h = F.linear(parts["wte.weight"].float(), parts["control_trans.0.weight"].float(),
                         parts["control_trans.0.bias"].float())
            kv = F.linear(NON_LINEARITIES[act](h), parts["control_trans.2.weight"].float(),
                          parts["control_trans.2.bias"].float())
    except RuntimeError as e:  # shapes that do not chain
        raise CorruptFileError(f"{where}: the prefix pool's tensors do not fit together ({short(str(e), 120)})") from None
    if kv.shape[0] != length:
        raise CorruptFileError(f"{where}: the prefix pool makes {kv.shape[0]} positions; config.prefix_length is {length}")
    first = root + arch["attention"].format(i=_layers(cfg, 1)[0])
    config = PrefixTuning(targets=(first,), n_tokens=length)
    return config, {first: {"pool": kv.unsqueeze(0).contiguous()}}


def _layers(cfg: dict[str, Any], n: int) -> list[int]:
    """The first `n` layer indices not in leave_out: the layers the pool's prefixes belong to, in order."""
    out, i, skip = [], 0, set(cfg.get("leave_out") or [])
    while len(out) < n:
        if i not in skip:
            out.append(i)
        i += 1
    return out


@dataclass
class AdapterHubDelta(Delta):
    """A delta read from an AdapterHub directory; a prefix-tuning pool is split per layer on a model (until then
    `needs_model` says so, and every writer refuses it)."""

    hub: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def for_model(self, model: nn.Module) -> Delta:
        moved = self._rooted(model)
        if moved is not self:
            return moved.for_model(model)
        (first,) = self.state if len(self.state) == 1 else (None,)
        if first is None or set(self.state[first]) != {"pool"}:
            return self
        kv = self.state[first]["pool"][0]  # [n, layers·2·d_kv]
        arch, cfg = self.hub["arch"], self.hub["config"]
        modules = dict(model.named_modules())
        root = first[: len(first) - len(arch["attention"].format(i=_layers(cfg, 1)[0]))]
        start = modules.get(first)
        if start is None:
            raise TargetError(f"AdapterHub prefix tuning {self.name!r} targets {first!r}, which this "
                              f"{type(model).__name__} lacks; it was saved from a {self.hub.get('model_class')}")
        heads, head_dim, _ = attention_shape(start, first)
        n, total = kv.shape
        per_layer = 2 * heads * head_dim
        if total % per_layer:
            raise ShapeMismatchError(f"AdapterHub prefix tuning {self.name!r}: its pool of width {total} does not split "
                                     f"into layers of {heads} key/value heads of {head_dim} on this model")
        count = total // per_layer
        kv = kv.view(n, count * 2, heads, head_dim).permute(1, 2, 0, 3)  # [layers·2, heads, n, head_dim]
        state = {}
        for j, i in enumerate(_layers(cfg, count)):
            path = root + arch["attention"].format(i=i)
            if path not in modules:
                raise TargetError(f"AdapterHub prefix tuning {self.name!r} has prefixes for {count} layers; this "
                                  f"{type(model).__name__} has no {path!r}")
            state[path] = {"prefix_keys": kv[2 * j].contiguous(), "prefix_values": kv[2 * j + 1].contiguous()}
        config = self.config.replace(targets=tuple(state))
        return Delta(self.name, config, state, {p: "Attention" for p in state}, dict(self.base))

    def _rooted(self, model: nn.Module) -> "AdapterHubDelta":
        """This delta with module paths for `model` where it was saved from the model's base model or a model with
        a head around it (AdapterHub keeps the saving model's paths): `base_model_prefix` added or removed."""
        names = {p for p, _ in model.named_modules()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        if not prefix or all(p in names for p in self.state):
            return self
        for move in (lambda p: f"{prefix}.{p}", lambda p: p[len(prefix) + 1:] if p.startswith(prefix + ".") else p):
            state = {move(p): st for p, st in self.state.items()}
            if all(p in names for p in state):
                targets = tuple(move(p) for p in self.config.targets)
                out = AdapterHubDelta(self.name, self.config.replace(targets=targets), state,
                                      {move(p): t for p, t in self.module_types.items()}, dict(self.base))
                out.hub, out.needs_model = self.hub, self.needs_model
                return out
        return self


def read_adapterhub(path: Path, header_only: bool = False) -> Delta:
    meta, cfg, where = _config(path)
    name = meta["name"]
    flat = _tensors(path, where, header_only)
    architecture = cfg.get("architecture")
    readers = {None: _bottleneck, "lora": _lora, "prefix_tuning": _prefix}
    if not (architecture is None or isinstance(architecture, str)) or architecture not in readers:
        raise UnsupportedError(f"{where}: AdapterHub architecture {short(architecture)}; deltatune reads bottleneck "
                               f"adapters, LoRA and prefix tuning")
    if architecture == "prefix_tuning" and header_only:
        raise UnsupportedError(f"{where}: AdapterHub prefix tuning needs its tensors' values to be read")
    config, state = readers[architecture](meta, cfg, flat, name, where)
    types = {"lora": "Linear", "houlsby": "Linear", "pfeiffer": "LayerNorm" if getattr(config, "original_ln_before", 0)
             else "Linear"}.get(config.kind, "?")
    base = {"model_class": meta.get("model_class"), "model_name": meta.get("model_name"),
            "model_type": meta.get("model_type")}
    leave_out = cfg.get("leave_out")
    if architecture is None and isinstance(leave_out, list) and all(type(i) is int for i in leave_out):
        base["leave_out"] = sorted(leave_out)  # the layers it has no adapter on, beyond those below the last adapted
    delta = AdapterHubDelta(name, config, state, {p: types for p in state}, base)
    delta.hub = {"arch": ARCHITECTURES.get(meta.get("model_type"), {}), "config": cfg,
                 "model_class": meta.get("model_class")}
    if architecture == "prefix_tuning":
        delta.needs_model = (f"AdapterHub prefix tuning {name!r}: its prefixes are split per layer by the model's "
                             f"key/value heads, which the file does not record; load it onto the model first (dt.load, "
                             f"or `deltatune convert --base MODEL_DIR`)")
    return delta


# --- writing (bottleneck adapters) --------------------------------------------------------------------------------
def _model_type(delta: Delta) -> tuple[str, dict[str, Any]]:
    """AdapterHub's model_type for the delta's model (`base["model_class"]`'s transformers config, else the type an
    AdapterHub file recorded) and its site map; refused when it names no architecture the codec maps, since
    AdapterHub then reads the file as another model's or not at all."""
    name = delta.base.get("model_class")
    model_type = None
    if isinstance(name, str) and name.isidentifier():
        import transformers

        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model_type = getattr(cls.config_class, "model_type", None)
    if model_type is None:
        model_type = delta.base.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise UnsupportedError(f"delta {delta.name!r} was saved from a {short(name)} (model_type {short(model_type)}); "
                               f"deltatune writes AdapterHub adapters for {sorted(ARCHITECTURES)} models, whose "
                               f"adapter sites it maps")
    return model_type, ARCHITECTURES[model_type]


def _leave_out(delta: Delta, arch: dict[str, Any], roots: set[str], adapted: set[int]) -> list[int]:
    """The layers AdapterHub must not give an adapter (it adds a fresh one to every other layer): those of the model
    the delta was taken from (`delta.source`, which dt.save sets) without one; without the model, the leave_out the
    delta's AdapterHub file recorded, when it agrees with the adapted layers. The layer count is refused as unknown
    otherwise."""
    if delta.source is not None:
        layers = {int(m.group("layer").rsplit(".", 1)[1]) for p, _ in delta.source.named_modules()
                  if (m := re.match(arch["layer"], p)) is not None and m.group("root") in roots}
        if layers >= adapted:
            return sorted(set(range(max(layers) + 1)) - adapted)
    recorded = delta.base.get("leave_out")
    if (isinstance(recorded, list) and all(type(i) is int for i in recorded) and not set(recorded) & adapted
            and set(range(max(adapted))) - adapted <= set(recorded)):
        return sorted(recorded)
    raise UnsupportedError(f"delta {delta.name!r} adapts layers {sorted(adapted)} of a model whose layer count it does "
                           f"not record; AdapterHub adds an adapter to every layer not in leave_out, so the count is "
                           f"needed: save it from the model (dt.save(model, path, name, format='adapters')) or convert "
                           f"with --base MODEL_DIR")


def _hub_config(config: DeltaConfig, mh: bool, out: bool) -> dict[str, Any]:
    parallel = isinstance(config, ParallelAdapter)
    before = bool(getattr(config, "original_ln_before", False))
    act = config.non_linearity
    return {
        "mh_adapter": mh, "output_adapter": out, "reduction_factor": None, "non_linearity": act,
        "original_ln_before": before, "original_ln_after": True, "ln_before": False, "ln_after": False,
        "init_weights": "mam_adapter" if config.init == "kaiming" else "bert", "init_weights_seed": None,
        "is_parallel": parallel, "scaling": float(config.scaling), "use_gating": False, "residual_before_ln": True,
        "adapter_residual_before_ln": False, "inv_adapter": None, "inv_adapter_reduction_factor": None,
        "cross_adapter": False, "leave_out": [], "dropout": 0.0, "phm_layer": False, "phm_dim": 4,
        "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True, "factorized_phm_rule": False,
        "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
        "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0}


def write_adapterhub(delta: Delta, path: Path) -> Path:
    """Bottleneck adapters as an AdapterHub directory `adapters` 1.3 loads (`model.load_adapter(path)`)."""
    check_output(path)
    config = delta.config
    if not isinstance(config, (_Series, ParallelAdapter)) or config.modules_to_save:
        raise UnsupportedError(f"delta {delta.name!r} ({config.kind}) cannot be written as an AdapterHub adapter: the "
                               f"writer handles bottleneck adapters (series and parallel, no modules_to_save); write "
                               f"LoRA as PEFT (format='peft')")
    mode = "parallel" if isinstance(config, ParallelAdapter) else "norm" if config.original_ln_before else "series"
    if mode == "parallel" and config.input_arg != 1:
        raise UnsupportedError(f"delta {delta.name!r}: AdapterHub's parallel adapter on BERT-style blocks reads the "
                               f"block's residual argument (input_arg=1); this one reads argument {config.input_arg!r}")
    model_type, arch = _model_type(delta)
    flat: dict[str, Tensor] = {}
    widths, locations, roots = set(), set(), set()
    per_layer: dict[int, set[str]] = {}
    for module, st in delta.state.items():
        m = re.match(arch["layer"], module)
        local = module[m.end():] if m is not None else None
        hub = next((loc for loc, sites in arch["sites"].items() if sites.get(mode) == local), None)
        if m is None or hub is None:
            raise UnsupportedError(f"delta {delta.name!r} adapts {module!r}, which is not where AdapterHub puts a "
                                   f"{mode} bottleneck adapter in a {model_type} model")
        locations.add(hub)
        roots.add(m.group("root"))
        per_layer.setdefault(int(m.group("layer").rsplit(".", 1)[1]), set()).add(hub)
        base = f"{m.group('root')}{m.group('layer')}.{hub}.adapters.{delta.name}."
        for ours, theirs in {v: k for k, v in _BN_PARAMS.items()}.items():
            flat[base + theirs] = st[ours].detach().float().contiguous()
        widths.add((int(st["down_weight"].shape[1]), int(st["down_weight"].shape[0])))
    if len(widths) != 1:
        raise UnsupportedError(f"delta {delta.name!r}: AdapterHub writes one bottleneck width; this delta has widths "
                               f"{sorted(widths)}")
    if any(sites != locations for sites in per_layer.values()):
        raise UnsupportedError(f"delta {delta.name!r} adapts different sites in different layers; AdapterHub puts the same "
                               f"adapters ({', '.join(sorted(locations))}) in every layer it does not leave out")
    (d, m), = widths
    mh = any(loc.startswith("attention") for loc in locations)
    cfg = _hub_config(config, mh=mh, out=any(not loc.startswith("attention") for loc in locations))
    cfg["reduction_factor"] = d / m if d % m else d // m
    cfg["leave_out"] = _leave_out(delta, arch, roots, set(per_layer))
    model_class = delta.base.get("model_class") or ""
    meta = {"config": cfg, "hidden_size": d, "model_class": model_class or None,
            "model_name": delta.base.get("model_name"), "model_type": model_type, "name": delta.name,
            "version": VERSION}
    data = st_save(flat)
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_directory("adapters", path, {WEIGHTS_FILE: data, CONFIG_FILE: text.encode("utf-8")})
    return path


register_format(Format("adapters", CONFIG_FILE, read_adapterhub, write_adapterhub,
                       "AdapterHub's adapters: adapter_config.json + adapter.safetensors",
                       files=(CONFIG_FILE, WEIGHTS_FILE),
                       companions=(PICKLE_FILE, "head_config.json", "model_head.safetensors"),
                       claims=claims, library="adapters",
                       kinds=("houlsby", "pfeiffer", "parallel_adapter", "lora", "prefix")))
