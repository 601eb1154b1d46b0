"""Per-module statistics over batches, streamed: input moments (EVA, CorDA) and mean weight gradients (LoRA-GA).

Modules are processed in groups whose statistics fit a memory budget, one pass over the batches per group; each
module's statistics are handed to the caller as soon as its pass ends and are dropped when the caller moves on, so
at most one group's statistics (`memory` bytes, or one module's when that alone is larger) are held at a time.
Modules that receive the very same input tensor (q/k/v projections, gate/up projections) share one set of input
moments. Peak memory besides the model's own forward (and, for gradients, backward) on one batch:
max(memory, the largest module's statistics) + what the caller keeps per module.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..core.layouts import Layout

DEFAULT_MEMORY = 1 << 30  # bytes of statistics held at once
LossFn = Callable[[nn.Module, Any], Tensor]
TokenMask = Callable[[Any], Tensor | None]


@dataclass
class InputMoments:
    """Σ x xᵀ, Σ x and the number of input rows (tokens) one module saw, accumulated in float32."""

    xx: Tensor
    x: Tensor
    n: int = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.float()
        self.xx.addmm_(rows.t(), rows)
        self.x.add_(rows.sum(0))
        self.n += rows.shape[0]

    def second_moment(self) -> Tensor:
        """E[x xᵀ] (uncentered; CorDA's covariance)."""
        return self.xx / max(self.n, 1)

    def covariance(self) -> Tensor:
        """E[(x − μ)(x − μ)ᵀ] (centered, biased; PCA's)."""
        mean = self.x / max(self.n, 1)
        return self.second_moment() - torch.outer(mean, mean)


def default_token_mask(batch: Any) -> Tensor | None:
    """Which tokens count: the batch's attention_mask, and labels != -100 where labels are per token; None = all."""
    if not isinstance(batch, Mapping) or not isinstance(batch.get("attention_mask"), Tensor):
        return None
    mask = batch["attention_mask"].bool()
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask


def run_model(model: nn.Module, batch: Any) -> Any:
    """model(**batch) for keyword dicts, model(batch) otherwise."""
    return model(**batch) if isinstance(batch, Mapping) else model(batch)


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    loss = getattr(run_model(model, batch), "loss", None)
    if loss is None:
        raise ConfigError("the model's output has no .loss for this batch; pass batches with labels, or loss_fn="
                          "(model, batch) -> scalar loss")
    return loss


def reiterable(batches: Iterable[Any], owner: str) -> Sequence[Any] | Iterable[Any]:
    """`batches` itself when it can be iterated again (list, DataLoader), else a list of it; never empty."""
    if iter(batches) is batches:  # a generator or iterator: keep it for several passes
        batches = list(batches)
    if hasattr(batches, "__len__") and len(batches) == 0:  # type: ignore[arg-type]
        raise ConfigError(f"{owner} got no batches; pass an iterable of at least one batch (dicts for model(**batch))")
    return batches


def plan_passes(sizes: Mapping[str, int], memory: int | None) -> list[list[str]]:
    """Group keys (in order) into passes whose summed sizes stay within `memory` bytes (None: one pass)."""
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory < 1):
        raise ConfigError(f"memory must be a positive number of bytes or None (no limit), got {memory!r}")
    passes: list[list[str]] = []
    used = 0
    for key, size in sizes.items():
        if not passes or (memory is not None and used + size > memory):
            passes.append([])
            used = 0
        passes[-1].append(key)
        used += size
    return passes


@contextmanager
def _hooks(modules: Iterable[nn.Module], fn: Callable) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(fn(m), with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (dropout off) inside, each back to its own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _shared_inputs(model: nn.Module, modules: Mapping[str, nn.Module], batch: Any) -> dict[str, str]:
    """path -> the first path that received the very same input tensor objects on `batch` (itself if none)."""
    seen: dict[str, list[Tensor]] = {p: [] for p in modules}
    by_module = {id(m): p for p, m in modules.items()}

    def record(module: nn.Module):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[by_module[id(mod)]].append(_first_input(args, kwargs))
        return hook

    with _hooks(modules.values(), record), torch.no_grad():
        run_model(model, batch)
    owners: list[str] = []
    owner: dict[str, str] = {}
    for path, inputs in seen.items():
        same = [o for o in owners if inputs and len(seen[o]) == len(inputs) and all(a is b for a, b in zip(seen[o], inputs))]
        owner[path] = same[0] if same else path
        if not same:
            owners.append(path)
    return owner


def input_moments(model: nn.Module, modules: Mapping[str, tuple[nn.Module, Layout]], batches: Iterable[Any], *,
                  token_mask: TokenMask | None = default_token_mask, memory: int | None = DEFAULT_MEMORY,
                  progress: bool = True, description: str = "input statistics") -> Iterator[tuple[str, InputMoments]]:
    """(path, moments of the module's inputs over all batches) for every module, in eval mode and without grad.

    A module's inputs are its first positional argument, flattened to rows of its last dimension; where the batch
    gives a token mask of the input's leading shape only those rows count. Modules with identical inputs get the
    same InputMoments object."""
    from ..core.progress import Progress

    batches = reiterable(batches, description)
    mods = {p: m for p, (m, _) in modules.items()}
    with eval_mode(model):
        owner = _shared_inputs(model, mods, next(iter(batches)))
        groups: dict[str, list[str]] = {}
        for path, o in owner.items():
            groups.setdefault(o, []).append(path)
        dims = {o: modules[o][1].shape(mods[o])[1] for o in groups}
        passes = plan_passes({o: 4 * (d * d + d) for o, d in dims.items()}, memory)
        n_batches = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
        with Progress(len(passes) * n_batches, enabled=progress and bool(n_batches), description=description) as bar:
            done = 0
            for owners in passes:
                stats = {o: InputMoments(torch.zeros(dims[o], dims[o], device=mods[o].weight.device),
                                         torch.zeros(dims[o], device=mods[o].weight.device)) for o in owners}
                current: list[Tensor | None] = [None]
                by_module = {id(mods[o]): o for o in owners}

                def accumulate(module: nn.Module):
                    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                        x = _first_input(args, kwargs).detach()
                        mask = current[0]
                        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                            rows = x[mask.to(device=x.device, dtype=torch.bool)]
                        else:
                            rows = x.reshape(-1, x.shape[-1])
                        stats[by_module[id(mod)]].add(rows)
                    return hook

                with _hooks([mods[o] for o in owners], accumulate), torch.no_grad():
                    for batch in batches:
                        current[0] = token_mask(batch) if token_mask is not None else None
                        run_model(model, batch)
                        done += 1
                        bar.update(done)
                for o in owners:
                    if stats[o].n == 0:
                        raise ConfigError(f"module {o!r} saw no input rows over the batches (all masked out, or it "
                                          f"never ran); check the batches or token_mask")
                    for path in groups[o]:
                        yield path, stats[o]
                    del stats[o]


def weight_gradients(model: nn.Module, modules: Mapping[str, tuple[nn.Module, Layout]], batches: Iterable[Any], *,
                     loss_fn: LossFn | None = None, memory: int | None = DEFAULT_MEMORY, progress: bool = True,
                     description: str = "weight gradients") -> Iterator[tuple[str, Tensor]]:
    """(path, ∂L/∂W averaged over batches, float32 in the [out, in] view) for every module, in the model's own mode.

    Gradients come from torch.autograd.grad (no .grad is written); requires_grad flags are restored after."""
    from ..core.progress import Progress

    loss_fn = loss_fn or default_loss
    batches = reiterable(batches, description)
    passes = plan_passes({p: 4 * m.weight.numel() for p, (m, _) in modules.items()}, memory)
    n_batches = len(batches) if hasattr(batches, "__len__") else 0  # type: ignore[arg-type]
    with Progress(len(passes) * n_batches, enabled=progress and bool(n_batches), description=description) as bar:
        done = 0
        for paths in passes:
            weights = [modules[p][0].weight for p in paths]
            flags = [w.requires_grad for w in weights]
            sums = {p: torch.zeros(modules[p][1].shape(modules[p][0]), device=w.device) for p, w in zip(paths, weights)}
            seen = 0
            try:
                for w in weights:
                    w.requires_grad_(True)
                with torch.enable_grad():
                    for batch in batches:
                        loss = loss_fn(model, batch)
                        if not isinstance(loss, Tensor) or loss.numel() != 1:
                            raise ConfigError(f"the loss must be a scalar tensor, got "
                                              f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
                        grads = torch.autograd.grad(loss, weights, allow_unused=True)
                        for p, g in zip(paths, grads):
                            if g is not None:
                                sums[p] += modules[p][1].from_native(g).float()
                        seen += 1
                        done += 1
                        bar.update(done)
            finally:
                for w, flag in zip(weights, flags):
                    w.requires_grad_(flag)
            for p in paths:
                yield p, sums.pop(p) / max(seen, 1)
