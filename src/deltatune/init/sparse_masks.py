"""Choosing the entries of a sparse delta from data, and attaching a Sparse delta at chosen entries.

`select_entries` keeps the largest scores (one global threshold or k per tensor) — LT-SFT scores with |ΔW|
of a dense phase, SHiRA's gradient mask with accumulated |∂L/∂W| (`gradient_mask`). `attach_sparse` attaches a
`Sparse` delta whose trainable entries are exactly the given flat indices (values start at 0: the base).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..runtime import attach, detach
from ..core.errors import ConfigError, ShapeMismatchError, TargetError
from ..runtime import slot_of
from ..core.layouts import layout_of
from ..methods.sparse.sparse import Sparse, SparsePiece
from ..core.targeting import resolve_targets

SELECTIONS = ("global", "per_tensor")

LossFn = Callable[[nn.Module, Any], Tensor]


def check_budget(k: int | None, density: float | None, selection: str, owner: str = "") -> None:
    """ConfigError unless exactly one of k (a positive count) or density (in (0, 1]) is given and selection is known."""
    if selection not in SELECTIONS:
        raise ConfigError(f"{owner}selection must be one of {SELECTIONS}, got {selection!r}")
    if (k is None) == (density is None):
        raise ConfigError(f"{owner}give exactly one of k (a count) or density (a fraction), got k={k!r}, "
                          f"density={density!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ConfigError(f"{owner}k must be a positive integer, got {k!r}")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0.0 < density <= 1.0):
        raise ConfigError(f"{owner}density must be a number in (0, 1], got {density!r}")


def entry_budget(numels: Mapping[str, int], k: int | None, density: float | None, selection: str) -> int | dict[str, int]:
    """How many entries to keep: one total (global) or one count per tensor (per_tensor).

    `k` is the total (global) or the count per tensor (per_tensor); `density` is the fraction of all entries
    (global) or of each tensor (per_tensor)."""
    check_budget(k, density, selection)
    if selection == "global":
        total = sum(numels.values())
        budget = k if k is not None else max(1, round(density * total))  # type: ignore[operator]
        if budget > total:
            raise ConfigError(f"k={budget} exceeds the {total} entries of the {len(numels)} scored weights; lower k")
        return budget
    out = {}
    for path, n in numels.items():
        kk = k if k is not None else max(1, round(density * n))  # type: ignore[operator]
        if kk > n:
            raise ConfigError(f"k={kk} exceeds the {n} entries of the weight at {path!r}; lower k or use density")
        out[path] = kk
    return out


def select_entries(scores: Mapping[str, Tensor], k: int | None = None, density: float | None = None,
                   selection: str = "global") -> dict[str, Tensor]:
    """Sorted flat int64 indices of the largest scores: the top-k over all tensors together (global) or of each
    tensor (per_tensor). Tensors left with no entry under a global threshold are left out."""
    if not scores:
        raise ConfigError("no scores to select entries from")
    budget = entry_budget({p: s.numel() for p, s in scores.items()}, k, density, selection)
    if isinstance(budget, dict):
        return {p: torch.sort(torch.topk(s.reshape(-1), budget[p]).indices).values for p, s in scores.items()}
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    top = torch.topk(flat, budget).indices
    out, start = {}, 0
    for path, s in scores.items():
        n = s.numel()
        mine = top[(top >= start) & (top < start + n)] - start
        if mine.numel():
            out[path] = torch.sort(mine).values.to(torch.int64)
        start += n
    return out


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ConfigError("the model's output has no .loss for this batch; pass batches with labels, or loss_fn="
                          "(model, batch) -> scalar loss")
    return loss


def gradient_mask(model: nn.Module, cfg: Sparse, batches: Iterable[Any], loss_fn: LossFn | None = None,
                  selection: str = "per_tensor", progress: bool = True) -> dict[str, Tensor]:
    """SHiRA's gradient mask: accumulate |∂L/∂W| over `batches` for every weight `cfg` targets, keep the top k.

    k per weight comes from `cfg` (k, density, k_pattern) with selection="per_tensor"; with selection="global"
    cfg.k is the total (or cfg.density the fraction of all targeted entries) under one threshold. Returns
    {path: sorted flat index in the [out, in] view}, ready for `attach_sparse`. Batches are model keyword
    dicts with labels (HF models) or anything `loss_fn(model, batch)` turns into a scalar loss. The model is
    left as it was: no .grad is written and requires_grad flags are restored."""
    from ..core.progress import Progress

    if not isinstance(cfg, Sparse):
        raise ConfigError(f"gradient_mask needs a dt.Sparse config (targets and k), got {type(cfg).__name__}")
    if selection not in SELECTIONS:
        raise ConfigError(f"gradient_mask: selection must be one of {SELECTIONS}, got {selection!r}")
    loss_fn = loss_fn or _default_loss
    targets = [(p, m, layout_of(m, p, SparsePiece.supported)) for p, m in resolve_targets(model, cfg)]
    weights = [m.weight for _, m, _ in targets]
    flags = [w.requires_grad for w in weights]
    scores = {p: torch.zeros(lay.shape(m), dtype=torch.float32, device=m.weight.device) for p, m, lay in targets}
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    seen = 0
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), Progress(total or 0, enabled=progress and bool(total), description="gradient mask") as bar:
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ConfigError(f"the loss for gradient_mask must be a scalar tensor, got "
                                      f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for (path, _, lay), g in zip(targets, grads):
                    if g is not None:
                        scores[path] += lay.from_native(g).abs().float()
                seen += 1
                bar.update(seen)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    if not seen:
        raise ConfigError("gradient_mask got no batches; pass an iterable of at least one batch")
    if selection == "global":
        return select_entries(scores, k=cfg.k, density=cfg.density, selection="global")
    numels = {p: s.numel() for p, s in scores.items()}
    return {p: torch.sort(torch.topk(s.reshape(-1), cfg.entries(p, numels[p])).indices).values
            for p, s in scores.items()}


def sparse_config_for(cfg: Sparse, indices: Mapping[str, Tensor]) -> Sparse:
    """`cfg` narrowed to the modules of `indices`, with k per module equal to the number of indices there."""
    ks = {p: int(i.numel()) for p, i in indices.items()}
    k = max(ks.values())
    return cfg.replace(targets=tuple(indices), exclude=None, layers=None, k=k, density=None,  # type: ignore[return-value]
                       k_pattern={re.escape(p): n for p, n in ks.items() if n != k})


def attach_sparse(model: nn.Module, cfg: Sparse, indices: Mapping[str, Tensor], name: str = "default", *,
                  activate: bool = True, trainable: bool = True) -> nn.Module:
    """Attach a `Sparse` delta whose entries at each path are exactly `indices[path]` (flat, [out, in] view).

    `cfg` supplies everything but the entries (bias, modules_to_save); targets and k per module come from
    `indices`. Values start at 0, so the model computes the base function. All checks run before the model
    changes; on failure it is left as it was."""
    if not isinstance(cfg, Sparse):
        raise ConfigError(f"attach_sparse needs a dt.Sparse config, got {type(cfg).__name__}")
    if not indices:
        raise ConfigError("attach_sparse got no indices; give {module path: flat int64 index}")
    modules = dict(model.named_modules())
    clean: dict[str, Tensor] = {}
    for path, idx in indices.items():
        if path not in modules:
            raise TargetError(f"{type(model).__name__} has no module {path!r}; the indices were made for another model")
        shape = layout_of(modules[path], path, SparsePiece.supported).shape(modules[path])
        if not isinstance(idx, Tensor) or idx.dtype != torch.int64 or idx.dim() != 1 or not idx.numel():
            raise ShapeMismatchError(f"indices[{path!r}] must be a non-empty 1-D int64 tensor of flat positions")
        idx = torch.sort(idx).values
        if int(idx[0]) < 0 or int(idx[-1]) >= math.prod(shape) or bool((idx[1:] == idx[:-1]).any()):
            raise ShapeMismatchError(f"indices[{path!r}] must be unique positions in [0, {math.prod(shape)}) of the "
                                     f"{shape[0]}x{shape[1]} weight")
        clean[path] = idx
    local = sparse_config_for(cfg, clean)
    found = {p for p, _ in resolve_targets(model, local)}
    if found != set(clean):
        raise TargetError(f"module paths {sorted(found ^ set(clean))[:3]} are ambiguous as targets (one path ends "
                          f"with another); attach these modules in separate deltas")
    attach(model, local, name, activate=activate, trainable=trainable)
    try:
        with torch.no_grad():
            for path, idx in clean.items():
                piece = slot_of(modules[path])[name]
                if piece.index.shape != idx.shape:
                    raise ShapeMismatchError(f"the Sparse piece at {path!r} holds {piece.index.numel()} entries, the "
                                             f"indices {idx.numel()}")
                piece.index.copy_(idx.to(piece.index.device))
    except BaseException:
        detach(model, name)
        raise
    return model
