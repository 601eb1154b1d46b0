"""SpIEL drop/regrow for sparse deltas (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models").

Every `regrow_every` steps a piece drops the n = ⌊k·p⌋ entries of smallest |value| and regrows n positions
that are not kept, chosen by a score gathered over the last `regrow_window` steps before the regrow:

* "accumulated" (SpIEL-AG): score = |Σ_t G_t|, the magnitude of the dense gradient of ΔW summed over the
  window. Memory: one fp32 [out, in] accumulator per piece, alive only during the window (allocated at the
  window's first backward, freed at the regrow) — for the whole model, the size of one full gradient.
* "momentum" (SpIEL-MA, memory-lean): score = r_i · c_j with r_i = Σ_t Σ_j G_t[i, j]² and c_j = Σ_t Σ_i G_t[i, j]²,
  the rank-1 (Adafactor-style) factorisation of the second moment that the paper takes from SM3's row and
  column accumulators. Memory: out + in numbers per piece; exact ranking when the gradient is rank 1.

G_t = gᵀx exists in the sparse autograd's backward anyway (transiently, one layer at a time); nothing of size
out × in is gathered outside the window. At the regrow itself the score is materialised per layer, one layer at
a time, and dropped.

The fraction p decays over training: p = regrow_fraction · (1 − t/T) ("linear", the paper's default), or
· (1 + cos πt/T)/2 ("cosine"), or stays ("constant", also used when the total T is unknown).

Slots are stable: a new entry takes over a dropped entry's slot in the same `values` Parameter (the tensor is
kept, `index` is changed in place and is not kept sorted); its value and its per-element optimizer state are
zeroed; kept entries keep value and state exactly. A dropped position that is chosen again stays in its slot
untouched. Scalar optimizer state (AdamW's per-tensor `step`) is left alone: kept entries need it, so new entries
are bias-corrected with the tensor's step count, not their own age (their first updates are larger than a fresh
Adam's by up to (1 − β₁)/√(1 − β₂) ≈ 3.2 with the default betas, fading out over about 1/(1 − β₂) steps).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

REGROWS = ("accumulated", "momentum")
DECAYS = ("linear", "cosine", "constant")


class GradientSum:
    """SpIEL-AG: Σ_t G_t over the window, dense fp32 [out, in] (allocated at the first backward)."""

    def __init__(self) -> None:
        self.sum: Tensor | None = None
        self.count = 0

    def add(self, grad: Tensor) -> None:
        if self.sum is None:
            self.sum = grad.detach().float().clone()
        else:
            self.sum.add_(grad.detach())
        self.count += 1

    def tensors(self) -> list[Tensor]:
        return [self.sum] if self.sum is not None else []

    def scores(self) -> Tensor:
        assert self.sum is not None
        return self.sum.abs().view(-1)


class RowColSquares:
    """SpIEL-MA: per-row and per-column sums of G_t² over the window (out + in numbers)."""

    def __init__(self) -> None:
        self.rows: Tensor | None = None
        self.cols: Tensor | None = None
        self.count = 0

    def add(self, grad: Tensor) -> None:
        g = grad.detach().float()
        r = torch.linalg.vector_norm(g, dim=1).square_()  # reductions: no [out, in] temporary
        c = torch.linalg.vector_norm(g, dim=0).square_()
        if self.rows is None or self.cols is None:
            self.rows, self.cols = r, c
        else:
            self.rows.add_(r)
            self.cols.add_(c)
        self.count += 1

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.rows, self.cols) if t is not None]

    def scores(self) -> Tensor:
        assert self.rows is not None and self.cols is not None
        return torch.outer(self.rows, self.cols).view(-1)


def new_stats(kind: str) -> GradientSum | RowColSquares:
    return GradientSum() if kind == "accumulated" else RowColSquares()


def sync_stats(stats: GradientSum | RowColSquares) -> None:
    """Sum the statistics over data-parallel ranks, so every rank regrows the same positions."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in stats.tensors():
            dist.all_reduce(t)


def fraction(p0: float, decay: str, step: int, total: int | None) -> float:
    """The fraction of k to replace at `step` (steps done) of `total`."""
    if total is None or decay == "constant":
        return p0
    t = min(max(step / total, 0.0), 1.0)
    if decay == "linear":
        return p0 * (1.0 - t)
    return p0 * 0.5 * (1.0 + math.cos(math.pi * t))


def count(k: int, p: float) -> int:
    """n = ⌊k·p⌋ entries to replace (guarding against 0.35·20 = 6.999…)."""
    return int(math.floor(k * p + 1e-9))


def in_window(step: int, every: int, window: int, total: int | None) -> bool:
    """Whether the step after `step` steps done (its number is step + 1) gathers statistics for a regrow."""
    s = step + 1
    due = math.ceil(s / every) * every  # the regrow this step leads up to
    return (s - 1) % every >= every - window and (total is None or due < total)


def plan(index: Tensor, values: Tensor, scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(slots, positions): which slots of `values` take which new flat positions.

    Drops the n entries of smallest |value| (ties: lower slot first) and picks the n highest-scoring positions
    among those not kept (dropped ones included). Dropped positions picked again stay in their slots; the rest
    of the dropped slots, in ascending order, take the new positions in ascending order."""
    k = index.numel()
    n = min(n, k)
    empty = index.new_empty(0)
    if n <= 0:
        return empty, empty
    drop = torch.sort(values.detach().abs(), stable=True).indices[:n]
    dropped = index[drop]
    kept = torch.zeros(scores.numel(), dtype=torch.bool, device=index.device)
    kept[index] = True
    kept[dropped] = False
    chosen = torch.topk(scores.masked_fill(kept, -math.inf), n).indices
    again = torch.isin(chosen, dropped)
    slots = torch.sort(drop[~torch.isin(dropped, chosen)]).values
    positions = torch.sort(chosen[~again]).values
    return slots, positions


def reset_optimizer_slots(optimizer: torch.optim.Optimizer | None, param: nn.Parameter, slots: Tensor) -> None:
    """Zero the per-element optimizer state of `param` at `slots` (exp_avg, exp_avg_sq, momentum buffers, ...);
    scalar state such as AdamW's `step` is left alone."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value[slots] = 0


@torch.no_grad()
def regrow(index: Tensor, values: nn.Parameter, stats: GradientSum | RowColSquares, n: int,
           optimizer: torch.optim.Optimizer | None) -> int:
    """Drop and regrow n entries in place (see module docstring); returns the number of slots replaced."""
    sync_stats(stats)
    slots, positions = plan(index, values, stats.scores(), n)
    if slots.numel():
        index[slots] = positions
        values[slots] = 0
        if values.grad is not None:
            values.grad[slots] = 0
        reset_optimizer_slots(optimizer, values, slots)
    return int(slots.numel())
