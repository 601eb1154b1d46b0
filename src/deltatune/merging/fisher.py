"""Diagonal empirical Fisher of a delta's modules, for Fisher-weighted merging; saved as safetensors.

F[path] = (1/B) Σ_b (∂L_b / ∂W)², the mean over the B batches of the squared gradient of the batch loss with
respect to the module's base weight W in the [out, in] view, computed with the delta active. For deltas that
add to the weight (LoRA, dense, sparse) this is the gradient with respect to the effective weight W + ΔW.
With batches of one example it is the per-example empirical Fisher of Matena & Raffel.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn

from ..runtime import active
from ..core.errors import ConfigError, CorruptFileError, DeltaNameError, StateError, TargetError
from ..runtime import state_of
from ..io.atomic import write_bytes
from ..io.safetensors_io import check_finite, read_tensors
from ..core.layouts import layout_of
from ..core.progress import Progress

FORMAT = "deltatune.fisher"

LossFn = Callable[[nn.Module, Any], Tensor]


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if not isinstance(batch, dict):
        raise ConfigError(f"estimate_fisher: a batch is a {type(batch).__name__}; the default loss calls "
                          f"model(**batch).loss, so pass dict batches (with labels) or a loss_fn(model, batch)")
    return model(**batch).loss


def estimate_fisher(model: nn.Module, delta_name: str, batches: Iterable[Any], loss_fn: LossFn | None = None,
                    modules: Sequence[str] | None = None, progress: bool = True) -> dict[str, Tensor]:
    """Diagonal empirical Fisher per targeted module of delta `delta_name`: {path: float32 [out, in]} for each
    weight and {"<path>.bias": float32 [out]} for each bias (what merging asks for when deltas change biases).

    `loss_fn(model, batch)` returns a scalar loss (default `model(**batch).loss`); `modules` restricts the paths
    (default: every module the delta targets). The model is left exactly as it was: active deltas, merged state,
    requires_grad flags and `.grad` of every parameter (gradients are taken with torch.autograd.grad). The
    model's train/eval mode is not changed: call model.eval() first to estimate without dropout."""
    st = state_of(model)
    if st is None or delta_name not in st.deltas:
        raise DeltaNameError(f"estimate_fisher: no delta {delta_name!r} is attached "
                             f"(attached: {sorted(st.deltas) if st else []}); attach or load it first")
    others = [n for n in st.merged if n != delta_name]
    if others:
        raise StateError(f"estimate_fisher: delta(s) {others} are merged into the weights, so the Fisher of "
                         f"{delta_name!r} alone cannot be taken; unmerge them first (dt.unmerge(model))")
    paths = list(st.deltas[delta_name].paths)
    if modules is not None:
        unknown = [p for p in modules if p not in paths]
        if unknown:
            raise TargetError(f"estimate_fisher: module(s) {unknown[:5]} are not targeted by delta {delta_name!r}; "
                              f"it targets {paths[:5]}{' …' if len(paths) > 5 else ''}")
        paths = [p for p in paths if p in set(modules)]
    named = dict(model.named_modules())
    layouts = {p: layout_of(named[p], p) for p in paths}
    # one entry per tensor: the weight ([out, in] view) under the module's path, its bias under "<path>.bias"
    entries: list[tuple[str, Tensor, Callable[[Tensor], Tensor]]] = []
    for p in paths:
        entries.append((p, named[p].weight, layouts[p].from_native))
        bias = layouts[p].bias(named[p])
        if bias is not None:
            entries.append((f"{p}.bias", bias, lambda g: g))
    params = [t for _, t, _ in entries]
    loss_fn = _default_loss if loss_fn is None else loss_fn
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]

    flags = {id(t): t.requires_grad for t in params}
    sums = [torch.zeros(tuple(view(t.detach()).shape), dtype=torch.float32, device=t.device) for _, t, view in entries]
    count = 0
    try:
        for t in params:
            t.requires_grad_(True)
        with active(model, delta_name), torch.enable_grad(), \
                Progress(total, enabled=progress, description="fisher") as bar:  # type: ignore[arg-type]
            for batch in batches:
                loss = loss_fn(model, batch)
                if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise ConfigError(f"estimate_fisher: loss_fn must return a scalar tensor that depends on the "
                                      f"model's weights, got {type(loss).__name__}"
                                      f"{tuple(loss.shape) if isinstance(loss, Tensor) else ''}")
                grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
                for i, ((_, _, view), g) in enumerate(zip(entries, grads)):
                    if g is not None:
                        sums[i].add_(view(g.detach()).float().square())
                count += 1
                bar.update(count, loss=float(loss.detach()))
    finally:
        for t in params:
            t.requires_grad_(flags[id(t)])
    if count == 0:
        raise ConfigError("estimate_fisher: `batches` yielded no batch; pass at least one")
    return {key: s / count for (key, _, _), s in zip(entries, sums)}


def save_fisher(fisher: dict[str, Tensor], path: str | Path) -> Path:
    """Write a Fisher dict ({module path: tensor}) as one safetensors file, atomically."""
    path = Path(path)
    bad = [k for k, t in fisher.items() if not isinstance(t, Tensor) or not t.is_floating_point()]
    if bad:
        raise ConfigError(f"save_fisher: entries {bad[:5]} are not floating-point tensors")
    check_finite(fisher, "the Fisher dict to save")
    data = st_save({k: t.detach().float().contiguous().cpu() for k, t in fisher.items()}, metadata={"format": FORMAT})
    write_bytes(path, data)
    return path


def load_fisher(path: str | Path) -> dict[str, Tensor]:
    """Read a Fisher dict written by `save_fisher` (safetensors only, never unpickled)."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != FORMAT:
        raise CorruptFileError(f"{str(path)!r} is a safetensors file but not a deltatune Fisher file (its metadata "
                               f"lacks format={FORMAT!r}); write it with deltatune.merging.save_fisher")
    check_finite(tensors, str(path))
    if any(bool((t < 0).any()) for t in tensors.values()):
        raise CorruptFileError(f"{str(path)!r} holds negative values; a diagonal Fisher is non-negative")
    return tensors

