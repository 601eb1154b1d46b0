"""Extraction: a LoRA delta from two full checkpoints, W_tuned − W_base factored module by module.

The model's skeleton is built on the meta device from the base's config.json (module paths and types, e.g. GPT-2's
transposed Conv1D, without loading weights); each targeted module's two weights are read, their difference is
factored by SVD in float32 and truncated (rank cap or energy fraction). Modules asked to stay dense (embeddings,
heads) become the delta's `modules_to_save`: pieces that hold the module's whole tuned weight and bias. Tensors
that changed but that no piece can hold (norm weights, tied heads, untargeted modules) are listed in the report.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig, Targets, storage_kind
from ..io.delta import Delta
from ..core.errors import (ConfigError, CorruptFileError, DeltaNotFoundError, NonFiniteError, ShapeMismatchError, TargetError,
                      UnsupportedError)
from ..io.checkpoints import CheckpointReader, as_float
from ..core.layouts import layout_by_name, layout_of
from ..core.targeting import matches, resolve_targets
from ..core.tensors import DenseDelta, LowRankDelta
from .compress import ModuleReport, Report, check_rank_options, distance, low_rank, state_bytes


@dataclass
class Planned:
    path: str
    module: nn.Module            # on the meta device
    module_type: str             # layout name: Linear, Conv1D or Embedding
    dense: bool
    weight_key: str
    bias_key: str | None         # same key prefix as the weight in both checkpoints


def model_skeleton(model_dir: str | Path) -> nn.Module:
    """The model of an HF directory built on the meta device from its config.json: paths and types, no weights."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise DeltaNotFoundError(f"{str(model_dir)!r} has no config.json; extraction builds the model's skeleton from "
                                 f"it to learn module paths and types — pass an HF model directory (save_pretrained)")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, OSError, KeyError) as e:
        raise UnsupportedError(f"cannot read the model config in {str(model_dir)!r} ({e})") from None
    arch = next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def _spec(value: Any, what: str) -> Targets:
    """A pattern spec as configs take it: a full-match regex string or a tuple of name suffixes."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
    DeltaConfig(targets=value if value else "all-linear")  # validates regexes / suffix lists with a clear error
    if not isinstance(value, (str, tuple)):
        raise ConfigError(f"{what} must be a regex string or a list of module-name suffixes, got {value!r}")
    return value


def _plan(skeleton: nn.Module, base: CheckpointReader, tuned: CheckpointReader, targets: Targets,
          dense: Targets) -> tuple[list[Planned], list[str]]:
    notes: list[str] = []
    modules = dict(skeleton.named_modules())
    chosen = {p: m for p, m in resolve_targets(skeleton, DeltaConfig(targets=targets))}
    dense_paths = set()
    if dense:
        weighted = {p: m for p, m in modules.items() if p and _layout(m, p) is not None}
        dense_paths = {p for p in weighted if matches(dense, p)}
        unmatched = [s for s in dense if not any(matches((s,), p) for p in weighted)] if isinstance(dense, tuple) else (
            [dense] if not dense_paths else [])
        if unmatched:
            raise ConfigError(f"dense pattern(s) {unmatched} match no Linear/Conv1D/Embedding module of "
                              f"{type(skeleton).__name__}; paths look like {list(weighted)[:6]}")
        chosen.update({p: weighted[p] for p in dense_paths})
    order = {p: i for i, p in enumerate(modules)}
    owners: dict[int, list[str]] = {}
    for p, m in modules.items():
        if isinstance(m._parameters.get("weight"), nn.Parameter):
            owners.setdefault(id(m._parameters["weight"]), []).append(p)
    plan = []
    for path, module in sorted(chosen.items(), key=lambda kv: order[kv[0]]):
        layout = _layout(module, path)
        if layout is None:
            notes.append(f"{path}: a {type(module).__name__}, not a Linear/Conv1D/Embedding module; skipped")
            continue
        key = base.key_for(path)
        if key is None:
            notes.append(f"{path}: no weight in the base checkpoint (tied to another module?); skipped")
            continue
        if key not in tuned:
            raise ShapeMismatchError(f"the tuned checkpoint {str(tuned.path)!r} has no tensor {key!r} (module {path!r}), "
                                     f"which the base has; base and tuned must be the same architecture")
        bias = key[: -len("weight")] + "bias"
        has_bias = getattr(module, "bias", None) is not None and layout.module_type != "Embedding"
        if has_bias and (bias not in base or bias not in tuned):
            raise CorruptFileError(f"module {path!r} has a bias but {bias!r} is missing from the base or tuned checkpoint")
        plan.append(Planned(path, module, layout.module_type, path in dense_paths, key, bias if has_bias else None))
        tied = [q for q in owners.get(id(module.weight), []) if q != path]
        if tied:
            notes.append(f"{path}: its weight is tied to {tied}; the delta changes {path} only, so a tuned tied "
                         f"weight is not reproduced at {tied}")
    if not plan:
        raise TargetError(f"targets={targets!r} leave no module to extract from {str(base.path)!r}")
    return plan, notes


def _layout(module: nn.Module, path: str):
    try:
        return layout_of(module, path)
    except TargetError:
        return None


def _check_shapes(base: CheckpointReader, tuned: CheckpointReader) -> list[str]:
    """ShapeMismatchError for tensors whose shapes differ; notes for tensors present in only one checkpoint."""
    bad = [f"{k}: base {list(base.shape(k))} vs tuned {list(tuned.shape(k))}" for k in tuned.keys()
           if k in base and base.shape(k) != tuned.shape(k)]
    if bad:
        raise ShapeMismatchError(f"base {str(base.path)!r} and tuned {str(tuned.path)!r} differ in the shape of "
                                 f"{len(bad)} tensor(s), e.g. {bad[:3]}; extraction needs two checkpoints of one architecture")
    only = sorted(set(tuned.keys()) ^ set(base.keys()))
    return [f"{k}: only in the {'tuned' if k in tuned else 'base'} checkpoint; ignored" for k in only[:20]] + (
        [f"... and {len(only) - 20} more tensors in only one checkpoint"] if len(only) > 20 else [])


def _whole_module(item: Planned, weight: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """Saved state of the piece `modules_to_save` builds on this module holding its tuned weight and bias."""
    module = copy.deepcopy(item.module).to_empty(device="cpu")
    module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias, requires_grad=False)
    local = DeltaConfig(targets=(item.path,), modules_to_save=(item.path,)).for_module(item.path)
    piece = local.piece_class(module)(module, item.path, local)
    return {k: v.detach().clone().contiguous() for k, v in piece.state_dict().items()}


def _bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def extract(base_dir: str | Path, tuned_dir: str | Path, *, rank: int | None = None, energy: float | None = None,
            dense: Targets = (), targets: Targets = "all-linear", name: str = "extracted",
            progress: bool = False) -> tuple[Delta, Report]:
    """A LoRA delta approximating tuned − base, module by module (one module's two weights in memory at a time).

    `rank` caps every module's rank; `energy` keeps, per module, the smallest rank whose singular values hold that
    fraction of ‖ΔW‖². `targets` picks modules ("all-linear", a regex, or name suffixes); modules matching `dense`
    (e.g. ("embed_tokens", "lm_head")) are kept whole as `modules_to_save`. The report gives each module's rank and
    relative Frobenius error, and lists changed tensors the delta does not hold."""
    from ..core.progress import Progress

    check_rank_options(rank, energy, required=True)
    targets, dense = _spec(targets, "targets"), _spec(dense, "dense")
    base, tuned = CheckpointReader(base_dir), CheckpointReader(tuned_dir)
    notes = _check_shapes(base, tuned)
    skeleton = model_skeleton(base.path)
    plan, more = _plan(skeleton, base, tuned, targets, dense)
    notes += more
    tensors: dict[str, LowRankDelta] = {}
    bias_deltas: dict[str, Tensor] = {}
    whole: dict[str, dict[str, Tensor]] = {}
    rows: list[ModuleReport] = []
    types: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    with Progress(len(plan), enabled=progress, description="extract") as bar:
        for i, item in enumerate(plan):
            layout = layout_by_name(item.module_type)
            w_tuned = tuned.get(item.weight_key)
            b_tuned = tuned.get(item.bias_key) if item.bias_key else None
            original = _bytes(w_tuned, b_tuned)
            shapes[item.path] = list(w_tuned.shape)
            types[item.path] = item.module_type
            if item.dense:
                whole[item.path] = _whole_module(item, w_tuned, b_tuned)
                rows.append(ModuleReport(item.path, "dense", original, state_bytes(whole[item.path]), 0.0, 0.0))
                bar.update(i + 1)
                continue
            dw = DenseDelta(layout.from_native(as_float(w_tuned) - as_float(base.get(item.weight_key))))
            db = as_float(b_tuned) - as_float(base.get(item.bias_key)) if item.bias_key else None
            if not bool(torch.isfinite(dw.weight).all()) or (db is not None and not bool(torch.isfinite(db).all())):
                raise NonFiniteError(f"W_tuned − W_base of {item.path!r} holds NaN/inf; one of the checkpoints is "
                                     f"damaged or diverged — nothing was extracted")
            if not bool(dw.weight.any()) and (db is None or not bool(db.any())):
                notes.append(f"{item.path}: identical in base and tuned; not in the delta")
                bar.update(i + 1)
                continue
            low = low_rank(dw, rank, energy)
            norm, error = distance(dw, low)
            tensors[item.path] = low
            if db is not None:
                bias_deltas[item.path] = db
            rows.append(ModuleReport(item.path, storage_kind(LowRankDelta), original, 0, norm, error, rank=low.rank))
            bar.update(i + 1)
    if not tensors:
        raise ConfigError(f"no targeted module differs between {str(base.path)!r} and {str(tuned.path)!r} (or all are "
                          f"kept dense); nothing to factor — check --tuned and --targets")
    biases = bias_deltas if any(bool(d.any()) for d in bias_deltas.values()) else {}
    identity = {"model_class": type(skeleton).__name__, "model_name": str(base.path), "weight_shapes": shapes}
    delta = Delta.from_tensors(name, tensors, biases, module_types=types, base=identity)
    if whole:
        delta.config = delta.config.replace(modules_to_save=tuple(whole))
        delta.state.update(whole)
        delta.module_types.update({p: types[p] for p in whole})
    # the file records the base shapes of the modules it adapts only (a module identical in both is not one)
    delta.base["weight_shapes"] = {p: s for p, s in shapes.items() if p in delta.state}
    for row in rows:
        row.bytes = row.bytes or state_bytes(delta.state[row.path])
    notes += _uncaptured(base, tuned, plan)
    what = f"rank {rank}" if rank is not None else f"energy {energy}"
    return delta, Report(f"extract: {what}, {len(tensors)} low-rank + {len(whole)} dense module(s)", rows, notes)


def _uncaptured(base: CheckpointReader, tuned: CheckpointReader, plan: list[Planned]) -> list[str]:
    """Tensors that differ between the checkpoints but belong to no extracted module."""
    used = {k for item in plan for k in (item.weight_key, item.bias_key) if k}
    notes = []
    for key in tuned.keys():
        if key in used or key not in base:
            continue
        a, b = as_float(tuned.get(key)), as_float(base.get(key))
        if not torch.equal(a, b):
            change = float((a.double() - b.double()).abs().max()) if a.is_floating_point() else float("nan")
            notes.append(f"{key}: changed (max |Δ| = {change:.3g}) but not in the delta — no targeted module holds it "
                         f"(widen targets, add it to dense, or it is a norm/bias no delta method adapts)")
    return notes


__all__ = ["extract", "model_skeleton"]
