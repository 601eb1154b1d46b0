"""The Delta object: a delta detached from any model — config, per-module saved state, base identity.

It is what files hold (`read`/`write`), what `save`/`load` pass through, and what merging and compression
act on via `tensors()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, config_class, storage_kind
from ..core.errors import ConfigError, CorruptFileError, DeltaNameError, TargetError, UnsupportedError
from ..runtime import slot_of, state_of
from ..core.layouts import layout_by_name, layout_of
from . import formats
from .formats import format_named
from ..core.tensors import DeltaTensor, DenseDelta, LowRankDelta, SparseDelta



@dataclass
class Delta:
    """A named delta: `state[path][param]` tensors for each adapted module, plus what it was made for."""

    name: str
    config: DeltaConfig
    state: dict[str, dict[str, Tensor]]
    module_types: dict[str, str] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)
    #: the live model the delta was just taken from (`dt.save` sets it; never saved or compared): writers of formats
    #: that store values relative to nothing (a PEFT file's tuned LayerNorm weights) read the base weights there
    source: nn.Module | None = field(default=None, repr=False, compare=False)
    #: why this delta must be placed on a model (`for_model`) before any writer can write it; "" when it is complete.
    #: Deltas read from files that hold absolute values or need the model's sizes set it (a property there);
    #: `formats.Format.write` refuses such a delta with this reason
    needs_model = ""

    # --- algebra view ----------------------------------------------------------------------------
    def update(self, path: str, base: BaseWeights = None, with_bias: bool = True) -> tuple[DeltaTensor, Tensor | None]:
        """(ΔW, Δb) of one module in the [out, in] view. `base` gives the base weights when the update depends on
        them (DoRA, full copies): a model, or a callable path -> (weight [out, in], bias or None). With
        with_bias=False, Δb may be left out (None) where computing it would need the base."""
        local = self.config.for_module(path)
        piece_cls = local.piece_class()
        if not piece_cls.mergeable:  # not a weight update (bottleneck adapters, prompts)
            raise UnsupportedError(f"delta {self.name!r} ({self.config.kind}) at {path!r} is not a weight update, so it has "
                                   f"no ΔW for arithmetic, merging, compression or extraction; use it as a delta on a model")
        layout = layout_by_name(self.module_types.get(path, "Linear"))
        weight = bias = None
        if piece_cls.needs_base or piece_cls.needs_shape:  # the base is read only for updates that depend on it
            lookup = base_lookup(base, self.module_types)
            if lookup is None:
                raise UnsupportedError(f"delta {self.name!r} ({self.config.kind}) at {path!r} needs the base weights to "
                                       f"express its update (e.g. DoRA, full copies); pass base= (a model or a model "
                                       f"directory's weights)")
            weight, bias = lookup(path)
        dw, db = piece_cls.update(self.state[path], local, layout, weight, bias)
        values = ([dw.A, dw.B] if isinstance(dw, LowRankDelta) else [dw.weight] if isinstance(dw, DenseDelta)
                  else [dw.values] if isinstance(dw, SparseDelta) else []) + ([db] if db is not None else [])
        bad = next((t.dtype for t in values if not t.is_floating_point()), None)
        if bad is not None:
            raise CorruptFileError(f"delta {self.name!r} ({self.config.kind}) at {path!r}: its update has {bad} values; "
                                   f"a weight update is floating point — the delta's tensors are of the wrong type "
                                   f"(a damaged file, or one not written for this method)")
        return dw, db

    def tensors(self, base: BaseWeights = None) -> dict[str, DeltaTensor]:
        """ΔW per module path as delta tensors in the [out, in] view (see `update` for `base`)."""
        concrete = self.for_model(base) if isinstance(base, nn.Module) else self
        if concrete is not self:  # a format whose file places its tensors only relative to the model
            return concrete.tensors(base)
        lookup = base_lookup(base, self.module_types)
        return {path: self.update(path, lookup, with_bias=False)[0] for path in self.state}

    def biases(self, base: BaseWeights = None) -> dict[str, Tensor]:
        concrete = self.for_model(base) if isinstance(base, nn.Module) else self
        if concrete is not self:
            return concrete.biases(base)
        out = {}
        lookup = base_lookup(base, self.module_types)
        for path in self.state:
            _, db = self.update(path, lookup)
            if db is not None:
                out[path] = db
        return out

    @classmethod
    def from_tensors(cls, name: str, tensors: dict[str, DeltaTensor], biases: dict[str, Tensor] | None = None, *,
                     module_types: dict[str, str] | None = None, base: dict[str, Any] | None = None,
                     whole: dict[str, dict[str, Tensor]] | None = None,
                     modules_to_save: tuple[str, ...] = (), kind: str | None = None) -> "Delta":
        """A delta holding exactly these updates, stored by the kind that keeps their storage (dense ΔW, sparse
        index/values, or LoRA factors). All tensors must be of one storage kind. `whole` carries the saved state of
        modules kept whole (`modules_to_save`, e.g. a classification head) unchanged. `kind` names the storing
        method instead (e.g. "ternary" for sparse updates of one magnitude); it refuses updates it cannot hold."""
        biases = dict(biases or {})
        types_of = {type(t) for t in tensors.values()}
        if kind is None and len(types_of) != 1:
            raise ConfigError(f"from_tensors needs updates of one storage kind, got {sorted(t.__name__ for t in types_of) or 'none'}; "
                              f"convert them first (to_dense(), svd(rank) or SparseDelta.from_dense)")
        config = config_class(kind or storage_kind(types_of.pop())).for_tensors(tensors, biases)
        whole = dict(whole or {})
        if whole:
            config = config.replace(modules_to_save=tuple(modules_to_save))
            outside = [p for p in whole if not config.saves_whole(p)]
            if outside or set(whole) & set(tensors):
                raise ConfigError(f"modules kept whole must match modules_to_save={modules_to_save!r} and have no ΔW; "
                                  f"got {sorted(outside or set(whole) & set(tensors))[:3]}")
        types = {p: (module_types or {}).get(p, "Linear") for p in [*tensors, *whole]}
        state = {p: dict(st) for p, st in whole.items()}
        for path, dw in tensors.items():
            piece_cls = config.for_module(path).piece_class()
            if not piece_cls.mergeable:
                raise UnsupportedError(f"a {config.kind!r} delta is not a weight update; it cannot store ΔW at {path!r}")
            if piece_cls.supported is not None and types[path] not in piece_cls.supported:
                raise UnsupportedError(f"{path!r} is a {types[path]}; a {config.kind!r} delta's pieces adapt only "
                                       f"{', '.join(piece_cls.supported)} modules — store it low-rank or dense, or leave it out")
            state[path] = piece_cls.tensors_to_state(dw, biases.get(path), layout_by_name(types[path]))
        shapes = {p: list(layout_by_name(types[p]).to_native(torch.empty(t.shape, device="meta")).shape)
                  for p, t in tensors.items() if p in (module_types or {})}  # only where the layout is known
        shapes.update({p: list(st["weight"].shape) for p, st in whole.items() if "weight" in st})
        return cls(name, config, state, types, dict(base or {"weight_shapes": shapes}))

    def for_model(self, model: nn.Module) -> "Delta":
        """This delta made concrete for `model`, without changing it. Formats whose files hold values relative to
        the base (e.g. PEFT's trained biases, which replace the base's) override this; the default is `self`."""
        return self

    @property
    def num_params(self) -> int:
        return sum(t.numel() for st in self.state.values() for t in st.values())

    # --- from / to a model -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None, model_name: str | None = None) -> "Delta":
        st = state_of(model)
        if st is None or not st.deltas:
            raise DeltaNameError(f"no delta is attached to this {type(model).__name__}; nothing to save")
        if name is None:
            if len(st.deltas) != 1:
                raise DeltaNameError(f"several deltas are attached ({sorted(st.deltas)}); pass name=")
            name = next(iter(st.deltas))
        if name not in st.deltas:
            raise DeltaNameError(f"unknown delta {name!r}; attached: {sorted(st.deltas)}")
        rec = st.deltas[name]
        modules = dict(model.named_modules())
        state, types, shapes = {}, {}, {}
        for path in rec.paths:
            module = modules[path]
            piece = slot_of(module)[name]
            state[path] = {k: _full(v).detach().contiguous() for k, v in piece.state_dict().items()}
            layout = piece.layout
            types[path] = layout.saved_type if layout is not None else type(module).__name__
            if getattr(module, "weight", None) is not None:
                shapes[path] = list(layout.native_shape(module) if layout is not None else module.weight.shape)
        if model_name is None:
            model_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        base = {"model_class": model_class_name(model), "model_name": model_name, "weight_shapes": shapes}
        config = rec.config.for_pieces({p: slot_of(modules[p])[name] for p in rec.paths})  # e.g. pruned ranks
        return cls(name, config, state, types, base)

    # --- files -------------------------------------------------------------------------------------
    def write(self, path: str | Path) -> Path:
        """Write this delta in the native format (delta.safetensors and delta.json; the directory replaced as a whole)."""
        return format_named("native").write(self, Path(path))

    @classmethod
    def read(cls, path: str | Path) -> "Delta":
        """Read a delta directory of any registered format (native, PEFT, ...) without a model."""
        return formats.read(path)

    @classmethod
    def read_meta(cls, path: str | Path) -> "Delta":
        """The delta in `path` with meta tensors: config, modules, shapes and dtypes, from the metadata and the
        tensor file's header only (no tensor data is read). Raises the same typed errors as `read` for everything
        that needs no data (the data's hash and finiteness are checked by `read`)."""
        return formats.read(Path(path), meta=True)


BaseWeights = nn.Module | Callable[[str], tuple[Tensor, Tensor | None]] | str | Path | Any | None


def base_lookup(base: BaseWeights, module_types: dict[str, str] | None = None) -> Callable[[str], tuple[Tensor, Tensor | None]] | None:
    """path -> (W [out, in], bias) from a model, a model directory or a CheckpointReader (module_types give the
    checkpoint's layouts); a callable or None is returned as is."""
    if isinstance(base, (str, Path)):
        from .checkpoints import CheckpointReader

        base = CheckpointReader(base)
    if hasattr(base, "module_weights"):  # a CheckpointReader
        return base.module_weights(module_types or {})
    if base is None or not isinstance(base, nn.Module):
        return base
    modules = dict(base.named_modules())

    def from_model(path: str) -> tuple[Tensor, Tensor | None]:
        if path not in modules:
            raise TargetError(f"the base model has no module {path!r}")
        layout = layout_of(modules[path], path, ("Linear", "Conv1D", "Embedding", "Norm"))
        b = layout.bias(modules[path])
        return layout.weight(modules[path]).detach(), None if b is None else b.detach()

    return from_model


def model_class_name(model: nn.Module) -> str:
    """The model's own class name, looking through wrapper subclasses made at run time (FSDP2's `FSDP<Name>`)."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed") and not cls.__name__.startswith("FSDP"):
            return cls.__name__
    return type(model).__name__


def _full(t: Tensor) -> Tensor:
    """A sharded (FSDP2 / DTensor) tensor gathered to its full value; plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
