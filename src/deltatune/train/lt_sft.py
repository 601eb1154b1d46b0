"""LT-SFT (Ansell et al., 2022): dense phase, keep the K largest |ΔW|, reset, retrain only those entries.

1. Phase 1 trains a `dense` delta (a full ΔW per targeted weight: full fine-tuning of those weights) through
   the ordinary loop, into `output_dir/dense` (metrics only; its delta is not saved).
2. The K entries with the largest |ΔW| are selected — under one global threshold over every targeted weight,
   or K per weight — and the dense delta is removed: the model is back at its pretrained weights.
3. Phase 2 trains a `sparse` delta at exactly those entries, values starting at 0 (the pretrained weights),
   optionally pulled toward 0 by an L1 penalty λ·Σ|values|, into `output_dir` (the delta is saved there).

Options (`procedure: {kind: lt_sft, ...}` in a training YAML, `dt.train(..., procedure={"kind": "lt_sft", ...})`,
or `train_lt_sft`): see `LtSft`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from ..runtime import attach, detach
from ..core.errors import ConfigError
from ..runtime import slot_of, state_of
from ..core.schema import Fraction, NonNegative, OneOf, Positive, PositiveInt, Range, validate_fields
from ..core.suggest import did_you_mean
from ..init.sparse_masks import SELECTIONS, attach_sparse, check_budget, entry_budget, select_entries, sparse_config_for
from ..io.atomic import write_text
from ..core.layouts import layout_of
from ..methods.dense import Dense, DensePiece
from ..methods.sparse.sparse import Sparse, SparsePiece
from ..core.targeting import resolve_targets
from .config import TrainConfig
from .distributed import Dist
from .loop import TrainResult, load_model, load_splits, train, trained_whole, with_head
from .procedures import options, register_procedure

DENSE_SUFFIX = "-dense"


@dataclass(frozen=True)
class LtSft:
    """LT-SFT options.

    k / density: entries kept — with selection "global" the total over all targeted weights (or the fraction
    of all their entries), with "per_tensor" the count per weight (or the fraction of each weight).
    dense_epochs / dense_max_steps / dense_lr: phase 1's budget and learning rate (default: the run's
    max_steps if set, else dense_epochs; the run's lr). Phase 2 uses the run's epochs/max_steps and lr.
    l1 / dense_l1: λ of the L1 pull λ·Σ|Δ| toward the pretrained weights in phase 2 / phase 1."""

    k: PositiveInt | None = None
    density: Fraction | None = None
    selection: Annotated[str, OneOf(SELECTIONS)] = "global"
    dense_epochs: Positive = 1.0
    dense_max_steps: Annotated[int | None, Range(1, unit="steps")] = None
    dense_lr: Positive | None = None
    l1: NonNegative = 0.0
    dense_l1: NonNegative = 0.0

    def __post_init__(self) -> None:
        validate_fields(self)  # each option converted to its declared type and checked (core/schema.py)
        check_budget(self.k, self.density, self.selection, "lt_sft: ")

    @classmethod
    def from_dict(cls, data: Any) -> "LtSft":
        if isinstance(data, LtSft):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"lt_sft options must be a mapping such as {{density: 0.01, selection: global}}, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"unknown lt_sft option(s) {unknown}{did_you_mean(unknown[0], known)}; known: "
                              f"{sorted(known)}")
        return cls(**data)


def check_train_config(cfg: TrainConfig) -> LtSft:
    """The LtSft options of a TrainConfig, after checking the run can do LT-SFT (ConfigError otherwise)."""
    lt = LtSft.from_dict(options(cfg.procedure))
    delta = cfg.delta_config()
    if not isinstance(delta, Dense):
        raise ConfigError(f"with lt_sft, `delta` is phase 1's dense delta: set delta: {{kind: dense, targets: ...}} "
                          f"(got kind {delta.kind!r}); phase 2's sparse delta is built from it")
    if cfg.checkpoint_every or cfg.resume:
        raise ConfigError("lt_sft runs do not support checkpoint_every/resume yet; leave them unset")
    return lt


def add_l1_pull(params: list[nn.Parameter], strength: float) -> list[Any]:
    """Add ∂(strength·Σ|p|)/∂p = strength·sign(p) to each parameter's gradient; returns the hook handles."""
    if strength <= 0:
        return []
    return [p.register_hook(lambda g, p=p: g + strength * torch.sign(p.detach())) for p in params]


def _pieces(model: nn.Module, name: str, kind: type) -> dict[str, nn.Module]:
    return {path: slot_of(m)[name] for path, m in model.named_modules()
            if slot_of(m) is not None and name in slot_of(m) and isinstance(slot_of(m)[name], kind)}


def train_lt_sft(cfg: TrainConfig | dict | str | None = None, *, model: nn.Module | None = None, tokenizer: Any = None,
                 splits: Any = None, prepare: Any = None, **overrides: Any) -> TrainResult:
    """Run LT-SFT as configured by `cfg.procedure` (see the module docstring); returns phase 2's TrainResult, whose
    metrics also hold phase 1's (`dense`) and the number of selected entries."""
    cfg = TrainConfig.coerce(cfg, **overrides)
    if cfg.procedure is None or cfg.procedure.get("kind") != "lt_sft":
        raise ConfigError("train_lt_sft needs procedure={'kind': 'lt_sft', ...options}, e.g. {'kind': 'lt_sft', "
                          "'density': 0.01}")
    if prepare is not None:
        raise ConfigError("lt_sft attaches its own deltas; prepare= cannot be combined with it")
    lt = check_train_config(cfg)
    dense_cfg: Dense = cfg.delta_config()  # type: ignore[assignment]
    splits = splits or load_splits(cfg)
    task = splits.task if cfg.task == "auto" else cfg.task
    if model is None:
        model, tokenizer = load_model(cfg, task, len(splits.labels) if splits.labels else None,
                                      trained_whole(dense_cfg, task))
    if tokenizer is None:
        raise ConfigError("pass tokenizer= together with model=")
    numels = {}
    for path, module in resolve_targets(model, dense_cfg):  # phase 2 must be able to hold them: fail before training
        numels[path] = layout_of(module, path, SparsePiece.supported).weight(module).numel()
    entry_budget(numels, lt.k, lt.density, lt.selection)  # a k the weights cannot hold fails now, not after phase 1
    out = Path(cfg.output_dir)
    common = {**cfg.to_dict(), "procedure": None, "checkpoint_every": None, "resume": False}

    # phase 1: dense ΔW, attached under a name of its own so the loop does not save it
    dense_name = cfg.name + DENSE_SUFFIX
    hooks: list[Any] = []

    def dense_phase(m: nn.Module) -> None:
        attach(m, with_head(dense_cfg, m, task), dense_name)
        hooks.extend(add_l1_pull([piece.delta for piece in _pieces(m, dense_name, DensePiece).values()],
                                 lt.dense_l1 / cfg.grad_accum))  # the ΔW entries (the docs' λ·Σ|Δ|), not Δb

    phase1 = TrainConfig.from_dict({**common, "output_dir": str(out / "dense"), "epochs": lt.dense_epochs,
                                    "max_steps": lt.dense_max_steps or cfg.max_steps, "lr": lt.dense_lr or cfg.lr})
    try:
        dense = train(phase1, model=model, tokenizer=tokenizer, splits=splits, prepare=dense_phase)
    except BaseException:
        st = state_of(model)
        if st is not None and dense_name in st.deltas:  # leave a caller's model as it came
            detach(model, dense_name)
        raise
    finally:
        for h in hooks:
            h.remove()
        hooks.clear()
    modules = dict(model.named_modules())
    scores = {path: piece.delta_weight(modules[path]).to_dense().abs().float()  # on the run's device
              for path, piece in _pieces(model, dense_name, DensePiece).items()}
    detach(model, dense_name)  # back to the pretrained weights
    indices = select_entries(scores, lt.k, lt.density, lt.selection)
    selected = sum(int(i.numel()) for i in indices.values())

    # phase 2: the selected entries only, from the pretrained values
    sparse_base = with_head(Sparse(k=1, bias=dense_cfg.bias, modules_to_save=dense_cfg.modules_to_save), model, task)

    def sparse_phase(m: nn.Module) -> None:
        attach_sparse(m, sparse_base, indices, cfg.name)  # type: ignore[arg-type]
        hooks.extend(add_l1_pull([piece.values for piece in _pieces(m, cfg.name, SparsePiece).values()],
                                 lt.l1 / cfg.grad_accum))

    phase2 = TrainConfig.from_dict({**common, "delta": sparse_config_for(sparse_base, indices).to_dict()})  # type: ignore[arg-type]
    try:
        result = train(phase2, model=model, tokenizer=tokenizer, splits=splits, prepare=sparse_phase)
    finally:
        for h in hooks:
            h.remove()
    result.metrics["dense"] = dense.metrics
    result.metrics["selected_entries"] = selected
    record = {"options": asdict(lt), "selected_entries": selected,
              "scored_entries": sum(s.numel() for s in scores.values()),
              "smallest_selected_abs_delta": min(float(scores[p].reshape(-1)[i].min()) for p, i in indices.items()),
              "entries_per_module": {p: int(i.numel()) for p, i in indices.items()}, "dense_metrics": dense.metrics}
    if Dist.from_env().main:
        write_text(out / "lt_sft.json", json.dumps(record, indent=2) + "\n")
        write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2))  # the run as asked, not phase 2's
    return result



register_procedure("lt_sft", check_train_config, train_lt_sft)
