"""Merging full checkpoints (HF model directories of safetensors shards), streamed one tensor at a time.

For every tensor key of the base, the base tensor W and the same key of every input are read — nothing
else — and merged as task vectors τ_i = W_i − W (float32); the result W + merge(τ) is written in the base's
dtype through `CheckpointWriter` (size-capped shards, published atomically), so memory holds one key per
input plus the writer's current shard. Inputs may also be deltas: a delta's task vector is its exact update
ΔW (or Δb) on the keys of the modules it adapts and zero elsewhere, so `apply_delta` (base + one delta -> a
full model) is the same stream with a single input.

Decisions:
* non-float tensors (integer buffers) and keys outside include/exclude are copied from the base unchanged;
* a key whose shape differs between the base and an input, a key an input lacks, and a key an input has but
  the base lacks raise ShapeMismatchError before anything is written (exclude such keys to keep the base's);
* keys of modules with a known layout (Linear/Conv1D/Embedding, from the base's config.json) are merged in the
  [out, in] view that deltas use, so random methods draw the same masks whether inputs are models or deltas;
* the module filters match module paths: a key's path is the key without its last component.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io.delta import Delta
from ..core.errors import ConfigError, DeltaNotFoundError, ShapeMismatchError, TargetError, UnsupportedError
from ..io import formats
from ..io.atomic import dir_bytes as atomic_dir_bytes
from ..io.checkpoints import CheckpointReader, CheckpointWriter, as_float, check_output_dir
from ..io.checkpoints import owns as checkpoint_owns
from ..core.layouts import Layout, layout_by_name, layout_of
from ..core.tensors import DeltaTensor, DenseDelta
from ..core.progress import Progress
from .extract import model_skeleton
from .combine import check_storage, method_params, module_filter, resolve_method, to_storage

Source = CheckpointReader | Delta
LAYOUTS = ("Linear", "Conv1D", "Embedding")


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def open_source(x: Any) -> Source:
    """A model directory as a CheckpointReader; a native or PEFT delta directory as a Delta; objects as they are."""
    if isinstance(x, (CheckpointReader, Delta)):
        return x
    if not Path(x).is_dir():
        raise DeltaNotFoundError(f"input {str(x)!r} is not a directory (a model directory, a delta or a PEFT adapter)")
    return CheckpointReader(x) if is_model_dir(x) else Delta.read(x)


def module_types_of(reader: CheckpointReader) -> tuple[dict[str, str], list[set[str]]]:
    """(module path -> layout name, groups of module paths sharing one weight) of the model a checkpoint
    belongs to, from its meta-device skeleton; ({}, []) when config.json is missing or names no known model."""
    try:
        model = model_skeleton(reader.path)
    except Exception as e:  # noqa: BLE001 - any failure only means the layouts are unknown
        warnings.warn(f"could not build the model of {str(reader.path)!r} from its config.json to learn its module "
                      f"layouts ({type(e).__name__}: {e}); tensors are merged in their stored layout", stacklevel=3)
        return {}, []
    types = {}
    for path, module in model.named_modules():
        try:
            types[path] = layout_of(module, path).module_type
        except TargetError:  # not a weight-bearing module
            continue
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    return types, [set(v) for v in owners.values() if len(v) > 1]


@dataclass
class _Slot:
    """What one base key is: its module path, its parameter, and the delta modules that change it."""

    key: str
    module: str             # the module path: a delta's own path where one changes this key, else the key's prefix
    param: str
    layout: Layout | None
    deltas: dict[int, str]  # source index -> the delta's module path
    kept: bool              # inside the include/exclude filters


class CheckpointMerge:
    """The per-key merge of a base checkpoint and its inputs; every check runs in the constructor."""

    def __init__(self, base: CheckpointReader | str | Path, sources: Sequence[Any], method: Any,
                 checked: dict[str, Any], *, include: str | None = None, exclude: str | None = None) -> None:
        self.base = base if isinstance(base, CheckpointReader) else CheckpointReader(base)
        self.sources = [open_source(s) for s in sources]
        if not self.sources:
            raise ConfigError("merging needs at least one input")
        self.method, self.checked = method, checked
        self.keep = module_filter(include, exclude)
        # the model's skeleton (layouts of every key, tied weights) costs a transformers import: only model
        # directories (whose every key is merged) and deltas on embeddings (tied to output heads) need it
        needs_layouts = any(isinstance(src, CheckpointReader) or "Embedding" in src.module_types.values()
                            for src in self.sources)
        self.types, self.tied = module_types_of(self.base) if needs_layouts else ({}, [])
        self.slots = self._plan(self.tied)
        self.changed = 0  # keys written with a merged update (see write_model)
        self._last: dict[int, tuple[str, Any]] = {}  # input -> (module path, its update), see _update

    def _plan(self, tied: list[set[str]]) -> list[_Slot]:
        base = self.base
        tied_keys = {key: group for group in tied for key in {base.key_for(p) for p in group} if key is not None}
        owner: dict[str, dict[int, str]] = {}
        for i, src in enumerate(self.sources):
            if isinstance(src, CheckpointReader):
                continue
            for path in src.state:
                if not self.keep(path):
                    continue
                key = base.key_for(path)
                if key is None:
                    raise ShapeMismatchError(f"input {i} (delta {src.name!r}) adapts {path!r}, which the base "
                                             f"checkpoint {str(base.path)!r} has no weight for")
                shared = tied_keys.get(key)
                if shared is not None:
                    raise UnsupportedError(f"input {i} (delta {src.name!r}) changes {path!r}, whose weight {key!r} is "
                                           f"shared by {sorted(shared)} (tied embeddings); writing W + ΔW would change "
                                           f"all of them. Exclude it, or untie the weights first")
                owner.setdefault(key, {})[i] = path
                bias_key = base.key_for(path, "bias")
                if bias_key is not None:
                    owner.setdefault(bias_key, {})[i] = path
        slots = []
        for key in base.keys():
            module, _, param = key.rpartition(".")
            deltas = owner.get(key, {})
            mtype = next((self.sources[i].module_types.get(p) for i, p in deltas.items()), None) or self.types.get(module)
            layout = layout_by_name(mtype) if mtype in LAYOUTS and param == "weight" else None
            path = next(iter(deltas.values()), module)  # deltas' paths may carry a prefix the checkpoint's keys drop
            slots.append(_Slot(key, path, param, layout, deltas, bool(deltas) or self.keep(module)))
        for i, src in enumerate(self.sources):
            if isinstance(src, CheckpointReader):
                self._check_model(i, src, [s.key for s in slots if s.kept])
        return slots

    def _check_model(self, i: int, src: CheckpointReader, kept: list[str]) -> None:
        base = self.base
        extra = sorted(k for k in src.keys() if k not in base and self.keep(k.rpartition(".")[0]))
        if extra:
            raise ShapeMismatchError(f"input {i} ({str(src.path)!r}) has {len(extra)} tensor(s) the base lacks, e.g. "
                                     f"{extra[:3]}; they would be lost — exclude them or merge models of one architecture")
        for key in kept:
            if key not in src:
                raise ShapeMismatchError(f"input {i} ({str(src.path)!r}) lacks the tensor {key!r} of the base; exclude "
                                         f"its module to keep the base's")
            if src.shape(key) != base.shape(key):
                raise ShapeMismatchError(f"tensor {key!r} has shape {list(src.shape(key))} in input {i} "
                                         f"({str(src.path)!r}) but {list(base.shape(key))} in the base; exclude its "
                                         f"module (e.g. a resized vocabulary) to keep the base's")

    # --- per key ------------------------------------------------------------------------------------------
    def _update(self, i: int, src: Delta, path: str) -> tuple[Any, Tensor | None]:
        """Input i's (ΔW, Δb) at `path`, computed once for the module's weight and bias keys (kept for the last
        module only, so memory stays at one module per input)."""
        last = self._last.get(i)
        if last is None or last[0] != path:
            last = (path, src.update(path, self.base.module_weights(src.module_types)))
            self._last[i] = last
        return last[1]

    def merged(self, slot: _Slot) -> tuple[Tensor, Tensor | None]:
        """(base tensor, merged task vector in the native layout, or None when nothing changes this key)."""
        w = self.base.get(slot.key)
        if not w.is_floating_point() or not slot.kept:
            return w, None
        taus = [self._task_vector(i, src, slot, w) for i, src in enumerate(self.sources)]
        if all(t is None for t in taus):
            return w, None
        shape = slot.layout.from_native(w).shape if slot.layout is not None else w.shape
        inputs = [torch.zeros(shape) if t is None else t for t in taus]
        rand_key = slot.module if slot.param == "weight" else f"{slot.module}.{slot.param}"  # as merge_deltas
        tau = self.method(inputs, key=rand_key, **self.checked)
        return w, slot.layout.to_native(tau) if slot.layout is not None else tau

    def _task_vector(self, i: int, src: Source, slot: _Slot, w: Tensor) -> Tensor | None:
        """Input i's task vector for this key, in the [out, in] view where the layout is known."""
        if isinstance(src, CheckpointReader):
            tau = as_float(src.get(slot.key)) - as_float(w)
            return slot.layout.from_native(tau) if slot.layout is not None else tau
        path = slot.deltas.get(i)
        if path is None:
            return None
        dw, db = self._update(i, src, path)
        if slot.param == "weight":
            if db is not None and self.base.key_for(path, "bias") is None:
                raise ShapeMismatchError(f"input {i} (delta {src.name!r}) changes the bias of {path!r}, which has no bias "
                                         f"in the base checkpoint")
            return dw.to_dense().float()
        return None if db is None else db.float()


# --- entry points ------------------------------------------------------------------------------------------------
def merge_models(base_dir: CheckpointReader | str | Path, model_dirs: Sequence[Any], method: Any,
                 params: dict[str, Any] | None = None, out_dir: str | Path | None = None, *,
                 per_input: Sequence[dict[str, Any]] | None = None, include: str | None = None,
                 exclude: str | None = None, max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """Merge full checkpoints (and/or deltas) against `base_dir` into a full model directory `out_dir`.

    Every input is a task vector: a model directory's W_i − W_base, a delta's exact update on its modules.
    Returns `out_dir`, written as sharded safetensors with the base's config and tokenizer files."""
    if out_dir is None:
        raise ConfigError("merge_models needs out_dir, the model directory to write")
    method = resolve_method(method)
    checked = method_params(method, len(model_dirs), params, per_input)
    plan = CheckpointMerge(base_dir, model_dirs, method, checked, include=include, exclude=exclude)
    return write_model(plan, out_dir, max_shard_bytes=max_shard_bytes, progress=progress)


class _Single:
    """The one input's task vector itself: `apply_delta` as a one-input merge."""

    def validate(self, params: dict[str, Any], n: int) -> dict[str, Any]:
        return {}

    def __call__(self, tensors: list[Tensor], key: str = "") -> Tensor:
        return tensors[0]


def apply_delta(base_dir: CheckpointReader | str | Path, delta: Delta | str | Path, out_dir: str | Path, *,
                max_shard_bytes: int = 2 << 30, progress: bool = True) -> Path:
    """A full model directory holding W + ΔW (and b + Δb) of `delta` on the base checkpoint, key by key."""
    plan = CheckpointMerge(base_dir, [delta], _Single(), {})
    return write_model(plan, out_dir, max_shard_bytes=max_shard_bytes, progress=progress)


def check_output(path: str | Path, model: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse an unsafe merge output before any work (`OutputPathError` naming the path and why): a model checkpoint
    directory when `model`, else a delta directory of any registered format. Returns the real path."""
    return check_output_dir(Path(path), inputs) if model else formats.check_output(path, inputs)


def output_bytes(path: str | Path, model: bool) -> int:
    """The size of what a merge wrote to `path`: its checkpoint or delta files only (writers replace the directory as
    a whole, so nothing else is there; no walk of the tree, no symlinks followed)."""
    return atomic_dir_bytes(path, checkpoint_owns) if model else formats.written_bytes(path)


def write_model(plan: CheckpointMerge, out_dir: str | Path, *, max_shard_bytes: int = 2 << 30,
                progress: bool = True) -> Path:
    def one(slot: _Slot) -> Tensor:  # a function, so nothing of a key outlives it
        w, tau = plan.merged(slot)
        if tau is None:
            return w
        plan.changed += 1
        return (as_float(w) + tau).to(w.dtype)

    inputs = [src.path for src in plan.sources if isinstance(src, CheckpointReader)]
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, copy_from=plan.base.path, protect=inputs) as writer:
        with Progress(len(plan.slots), enabled=progress, description="merge") as bar:
            for i, slot in enumerate(plan.slots):
                writer.add(slot.key, one(slot))
                bar.update(i + 1, key=slot.key)
    return Path(out_dir)


def merge_models_to_delta(base_dir: CheckpointReader | str | Path, model_dirs: Sequence[Any], method: Any,
                          params: dict[str, Any] | None = None, *, per_input: Sequence[dict[str, Any]] | None = None,
                          output: str = "dense", rank: int | None = None, energy: float | None = None,
                          include: str | None = None, exclude: str | None = None, name: str = "merge",
                          progress: bool = True) -> Delta:
    """Merge full checkpoints (and/or deltas) against a base into a Delta of the merged updates of the base's
    Linear, Conv1D and Embedding modules (and their biases), stored as `output` (see `merge_deltas`).

    Changes of other tensors (layer norms, ...) have no place in a weight delta: they are dropped with a warning
    (write a full model to keep them). Modules whose merged update is exactly zero are left out."""
    method = resolve_method(method)
    checked = method_params(method, len(model_dirs), params, per_input)
    check_storage(output, rank, energy)
    plan = CheckpointMerge(base_dir, model_dirs, method, checked, include=include, exclude=exclude)
    return plan_to_delta(plan, output=output, rank=rank, energy=energy, name=name, progress=progress)


def plan_to_delta(plan: CheckpointMerge, *, output: str = "dense", rank: int | None = None,
                  energy: float | None = None, name: str = "merge", progress: bool = True) -> Delta:
    """The merged updates of a planned checkpoint merge as a Delta (see `merge_models_to_delta`)."""
    if not plan.types:
        raise UnsupportedError(f"the base {str(plan.base.path)!r} names no transformers class in config.json, so its "
                               f"module layouts are unknown; write a full model (format: model) instead")
    targets: dict[str, list[tuple[str, str]]] = {}  # key -> the (module path, param) it holds; tied: several
    for path, mtype in plan.types.items():
        for param in ("weight", "bias"):
            key = plan.base.key_for(path, param)
            if key is None and param == "weight":  # a tied weight is stored once, under another module's key
                group = next((g for g in plan.tied if path in g), set())
                key = next((k for k in (plan.base.key_for(p) for p in sorted(group)) if k is not None), None)
            if key is not None and not (param == "bias" and mtype == "Embedding"):
                targets.setdefault(key, []).append((path, param))

    weights: dict[str, DeltaTensor] = {}
    biases: dict[str, Tensor] = {}
    has_bias: set[str] = set()
    dropped: list[str] = []
    with Progress(len(plan.slots), enabled=progress, description="merge") as bar:
        for i, slot in enumerate(plan.slots):
            held = targets.get(slot.key, [])
            has_bias.update(path for path, param in held if param == "bias")
            _, tau = plan.merged(slot)
            if tau is not None and bool(tau.any()):
                if not held:
                    dropped.append(slot.key)
                for path, param in held:
                    if param == "weight":
                        view = layout_by_name(plan.types[path]).from_native(tau)
                        weights[path] = to_storage(DenseDelta(view), output, rank, energy)
                    else:
                        biases[path] = tau
            del tau
            bar.update(i + 1, key=slot.key)
    if dropped:
        warnings.warn(f"{len(dropped)} changed tensor(s) are not weights of Linear/Conv1D/Embedding modules or their "
                      f"biases and are not in the merged delta, e.g. {dropped[:4]}; write a full model to keep them",
                      stacklevel=2)
    for path in biases:
        if path not in weights:  # a piece holds a weight update wherever it holds a bias update
            shape = plan.base.shape(plan.base.key_for(path))
            weights[path] = to_storage(DenseDelta(layout_by_name(plan.types[path]).from_native(torch.zeros(shape))),
                                       output, rank, energy)
    if not weights:
        raise ConfigError("the merged update is zero on every Linear/Conv1D/Embedding module; there is no delta to write")
    if biases:
        for path in weights:
            if path in has_bias and path not in biases:
                biases[path] = torch.zeros(plan.base.shape(plan.base.key_for(path, "bias")))
    types = {p: plan.types[p] for p in weights}
    shapes = {p: list(layout_by_name(types[p]).to_native(torch.empty(weights[p].shape, device="meta")).shape)
              for p in weights}
    info = {"model_class": (plan.base.config.get("architectures") or [None])[0],
            "model_name": plan.base.config.get("_name_or_path") or None, "weight_shapes": shapes}
    return Delta.from_tensors(name, weights, biases, module_types=types, base=info)
