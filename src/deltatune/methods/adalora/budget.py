"""AdaLoRA's rank allocator (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

One allocator serves all AdaLoRA pieces of one delta (the global budget); the pieces reach it from their training
hooks, and the first piece called after an optimizer step does the step's work for all of them:

* importance, per entry w of P, Λ and Q: sensitivity I = |w · ∂L/∂w| (post-step value, the step's gradient),
  smoothed Ī ← β₁ Ī + (1 − β₁) I and uncertainty Ū ← β₂ Ū + (1 − β₂) |I − Ī|; entry score s = Ī · Ū.
  Triplet i of a module scores S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij).
* budget (total kept triplets) b(t) after t steps done, with b₀ = Σ ranks, b_T = target_r · modules and
  F = T − tfinal: b₀ for t ≤ tinit; b_T + ⌊(b₀ − b_T) · ((F − t) / (F − tinit))³⌋ for tinit < t < F; b_T from F on.
* every `deltaT` steps in (tinit, F), λ_i := 0 for all but the b(t) best-scoring triplets across all modules
  (ties: the earlier module in attach order, then the lower index, is kept); masked triplets keep training and
  may come back at the next allocation, as in the paper.
* at t = F the best b_T triplets are kept and the rest are *removed*: P, Λ, Q (and their per-element optimizer
  state and gradients) shrink in place — the Parameters stay the same objects, so the optimizer keeps them.
  Scores are updated at steps t < F (as peft does), and the allocator then stops.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ...core.errors import ConfigError, StateError

if TYPE_CHECKING:
    from .adalora import AdaLoRA, AdaLoRAPiece

RANK_DIM = {"P": 1, "Lambda": 0, "Q": 0}  # the dimension of each tensor that indexes triplets


def budget(step: int, tinit: int, final: int, start: int, target: int) -> int:
    """Kept triplets after `step` steps done: the cubic schedule from `start` to `target` over (tinit, final)."""
    if step <= tinit:
        return start
    if step >= final:
        return target
    return target + (start - target) * (final - step) ** 3 // (final - tinit) ** 3  # exact integer floor


class EntryScore:
    """Smoothed sensitivity Ī and uncertainty Ū of one tensor's entries."""

    def __init__(self) -> None:
        self.ema: Tensor | None = None
        self.unc: Tensor | None = None

    def update(self, w: Tensor, grad: Tensor | None, beta1: float, beta2: float) -> None:
        w = w.detach().float()
        sens = (w * grad.float()).abs() if grad is not None else torch.zeros_like(w)
        if self.ema is None or self.ema.shape != w.shape or self.ema.device != w.device:
            self.ema, self.unc = torch.zeros_like(w), torch.zeros_like(w)
        self.ema.mul_(beta1).add_(sens, alpha=1 - beta1)
        self.unc.mul_(beta2).add_((sens - self.ema).abs_(), alpha=1 - beta2)

    def score(self, shape: torch.Size, device: torch.device) -> Tensor:
        return self.ema * self.unc if self.ema is not None else torch.zeros(shape, device=device)

    def keep(self, dim: int, idx: Tensor) -> None:
        if self.ema is not None and self.unc is not None:
            self.ema, self.unc = self.ema.index_select(dim, idx), self.unc.index_select(dim, idx)


def unwrap(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    return optimizer


@torch.no_grad()
def shrink(param: nn.Parameter, dim: int, idx: Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Keep the slices `idx` along `dim` of `param`, its gradient and its per-element optimizer state, in place."""
    optimizer = unwrap(optimizer)
    state = optimizer.state.get(param) if optimizer is not None else None
    for key, value in (state or {}).items():
        if isinstance(value, Tensor) and value.shape == param.shape:
            state[key] = value.index_select(dim, idx.to(value.device)).contiguous()
    grad = param.grad.index_select(dim, idx).contiguous() if param.grad is not None else None
    param.grad = None
    resize(param, param.data.index_select(dim, idx).contiguous())
    param.grad = grad


@torch.no_grad()
def resize(param: nn.Parameter, new: Tensor) -> None:
    """Give `param` the (differently shaped) values `new`, keeping the Parameter object (optimizers hold it).

    `param.data = new` alone keeps a live gradient accumulator (a previous loss's graph holds it) with the old
    shape, which rejects the next backward; set_data drops it only on a change of dtype or device, so the data
    passes through another dtype first."""
    param.data = torch.empty(0, dtype=torch.float64 if new.dtype != torch.float64 else torch.float32, device=new.device)
    param.data = new


class RankAllocator:
    """The global rank budget of one AdaLoRA delta (see the module docstring)."""

    def __init__(self, pieces: Sequence["AdaLoRAPiece"]) -> None:
        self.pieces = list(pieces)
        self.scores: list[dict[str, EntryScore]] = [{k: EntryScore() for k in RANK_DIM} for _ in self.pieces]
        self.last_step: int | None = None
        self.updates = 0  # importance updates done
        self.finished = False

    @property
    def cfg(self) -> "AdaLoRA":
        return self.pieces[0].cfg

    def start_budget(self) -> int:
        return sum(p.rank for p in self.pieces)  # ranks change only when pruning ends the schedule

    def target_budget(self) -> int:
        return min(self.cfg.target_r * len(self.pieces), self.start_budget())

    def final_step(self, total: int | None) -> int:
        """F = T − tfinal; ConfigError when T is unknown or leaves no budgeting phase."""
        cfg = self.cfg
        total = cfg.total_step if cfg.total_step is not None else total
        if total is None:
            raise ConfigError("AdaLoRA needs the planned number of training steps for its budget schedule; the training "
                              "loop gave none — set AdaLoRA(total_step=...) (or max_steps in the Trainer)")
        if cfg.tinit >= total - cfg.tfinal:
            raise ConfigError(f"AdaLoRA: tinit={cfg.tinit} and tfinal={cfg.tfinal} leave no budgeting phase in "
                              f"{total} steps (need tinit < total − tfinal); lower tinit/tfinal or train longer")
        return total - cfg.tfinal

    # --- per step ------------------------------------------------------------------------------
    def before_step(self, step: int, total: int | None) -> None:
        if not self.finished and self.start_budget() <= self.target_budget():
            self.finish()  # nothing to prune (a delta loaded after pruning, or target_r = init_r)
        if not self.finished:
            self.final_step(total)  # fail before the step's forward, with the model untouched

    def after_step(self, optimizer: torch.optim.Optimizer | None, step: int, total: int | None) -> None:
        """The step's work for the whole delta; later calls for the same step (the other pieces) do nothing."""
        if self.finished or step == self.last_step:
            return
        self.last_step = step
        cfg, final = self.cfg, self.final_step(total)
        if step < final:
            self.update_scores()
        if step >= final:
            self.prune(optimizer)
        elif step > cfg.tinit and step % cfg.deltaT == 0:
            self.mask(budget(step, cfg.tinit, final, self.start_budget(), self.target_budget()))

    @torch.no_grad()
    def update_scores(self) -> None:
        cfg = self.cfg
        for piece, scores in zip(self.pieces, self.scores):
            grads = piece.take_grads()
            for name, param in piece.triplet_params().items():
                scores[name].update(param, grads.get(name), cfg.beta1, cfg.beta2)
        self.updates += 1

    def triplet_scores(self) -> list[Tensor]:
        """S per triplet, one [rank] tensor per piece."""
        out = []
        for piece, scores in zip(self.pieces, self.scores):
            params = piece.triplet_params()
            s = {k: scores[k].score(params[k].shape, params[k].device) for k in RANK_DIM}
            out.append(s["Lambda"] + s["P"].mean(0) + s["Q"].mean(1) if piece.rank else s["Lambda"])
        return out

    def choose(self, keep: int) -> list[Tensor]:
        """Boolean kept-masks per piece: the `keep` best triplets over all pieces (stable ties)."""
        scores = self.triplet_scores()
        flat = torch.cat([s.float().cpu() for s in scores]) if scores else torch.zeros(0)
        order = torch.sort(flat, descending=True, stable=True).indices[:keep]
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[order] = True
        return list(torch.split(kept, [s.numel() for s in scores]))

    @torch.no_grad()
    def mask(self, keep: int) -> None:
        for piece, kept in zip(self.pieces, self.choose(keep)):
            piece.apply_mask(kept)

    @torch.no_grad()
    def prune(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep the target budget's best triplets and remove the others; the allocator is done afterwards."""
        if self.start_budget() <= self.target_budget():  # already pruned (e.g. resumed from a later checkpoint)
            self.finish()
            return
        if not self.updates:
            raise StateError("AdaLoRA has no importance scores yet: prune after training steps that call the pieces' "
                             "step hooks (dt.train, DeltaCallback, or deltatune.runtime.step_hooks in a custom loop)")
        for piece, scores, kept in zip(self.pieces, self.scores, self.choose(self.target_budget())):
            idx = torch.nonzero(kept.to(piece.Lambda.device)).view(-1)
            for name, param in piece.triplet_params().items():
                shrink(param, RANK_DIM[name], idx, optimizer)
                scores[name].keep(RANK_DIM[name], idx)
            piece.apply_mask(torch.ones(piece.rank, dtype=torch.bool))
        self.finish()

    def finish(self) -> None:
        self.finished = True
        for piece in self.pieces:
            piece.stop_watching()
