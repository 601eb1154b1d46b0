"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

ΔW = s · P diag(Λ) Q per module, P [out, r], Λ [r], Q [r, in], s = alpha / init_r (fixed, so removing a zero
triplet never changes the output); Λ starts at 0, P and Q at N(0, 0.02²). Training adds the orthogonality penalty
γ (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F) per module (`regularizer`), and a rank allocator shared by the delta's pieces
masks and finally removes the least important triplets under a global, cubic budget (budget.py).

After pruning, `rank_pattern` (path → kept rank) records the ranks, so saved files hold only the kept triplets
and load into pieces of those ranks.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor, nn

from ...core.config import DeltaConfig, register
from ...core.errors import ConfigError, ShapeMismatchError, StateError, TargetError
from ...core.schema import NonNegative, Patterns, PositiveInt, Range, Scale
from ...core.layouts import Layout
from ...core.piece import Piece, master_dtype
from ...core.targeting import pattern_value
from ...core.tensors import DeltaTensor, LowRankDelta
from .budget import RankAllocator, resize

INIT_STD = 0.02
Steps = Annotated[int, Range(0, unit="steps")]
Smoothing = Annotated[float, Range(0, 1, low_open=True, high_open=True)]


@register("adalora")
@dataclass(frozen=True)
class AdaLoRA(DeltaConfig):
    """Rank-adaptive low-rank deltas: start at `init_r` per module, end at `target_r` per module on average.

    The budget stays at init_r · modules for `tinit` steps, falls cubically to target_r · modules until step
    total − `tfinal` (masking every `deltaT` steps), where the pruned triplets are removed. `beta1`/`beta2` smooth
    the importance scores, `orth_reg_weight` is γ. `total_step` overrides the training loop's planned step count.
    `rank_pattern` (module-name regex → rank) holds the ranks left after pruning; saves fill it in."""

    init_r: PositiveInt = 12
    target_r: Annotated[int, Range(1, "init_r")] = 8
    alpha: Scale = 8.0
    tinit: Steps = 0
    tfinal: Steps = 0
    deltaT: Annotated[int, Range(1, unit="steps")] = 1
    beta1: Smoothing = 0.85
    beta2: Smoothing = 0.85
    orth_reg_weight: NonNegative = 0.5
    total_step: Annotated[int | None, Range(1, unit="steps")] = None
    rank_pattern: Annotated[dict[str, int], Patterns(Range(0, "init_r"))] = field(default_factory=dict)

    def validate(self) -> None:
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"AdaLoRA: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                              f"total_step={self.total_step} (need tinit < total_step − tfinal)")

    @property
    def scale(self) -> float:
        return self.alpha / self.init_r

    def rank(self, path: str) -> int:
        return int(pattern_value(self.rank_pattern, path, self.init_r))

    @classmethod
    def example(cls) -> "AdaLoRA":
        return cls(init_r=4, target_r=2)  # ranks that fit small modules

    def piece_class(self, module: Any = None) -> type[Piece]:
        return AdaLoRAPiece

    def for_pieces(self, pieces: dict[str, Piece]) -> "AdaLoRA":
        """This config with `rank_pattern` set to the pieces' current (possibly pruned) ranks."""
        ranks = {p: piece.rank for p, piece in pieces.items() if isinstance(piece, AdaLoRAPiece)}
        pattern = {re.escape(p): r for p, r in ranks.items() if r != self.init_r}
        return self if pattern == self.rank_pattern else self.replace(rank_pattern=pattern)  # type: ignore[return-value]


class AdaLoRAPiece(Piece):
    supported: ClassVar[tuple[str, ...]] = ("Linear", "Conv1D")
    mergeable: ClassVar[bool] = True
    low_rank: ClassVar[bool] = True

    def __init__(self, base: nn.Module, path: str, cfg: AdaLoRA) -> None:
        super().__init__(base, path, cfg)
        w = self.layout.weight(base)
        d_out, d_in = (int(s) for s in w.shape)
        r = cfg.rank(path)
        if r > min(d_out, d_in):
            raise TargetError(f"AdaLoRA rank {r} exceeds min(out={d_out}, in={d_in}) of module {path!r}; lower init_r "
                              f"or exclude the module")
        dtype = master_dtype(w.dtype)
        self.scale = cfg.scale
        self.P = nn.Parameter(torch.randn(d_out, r, device=w.device).mul_(INIT_STD).to(dtype))
        self.Lambda = nn.Parameter(torch.zeros(r, dtype=dtype, device=w.device))
        self.Q = nn.Parameter(torch.randn(r, d_in, device=w.device).mul_(INIT_STD).to(dtype))
        self.allocator = RankAllocator([self])  # replaced by the delta's shared allocator in `link`
        self._grads: dict[str, Tensor] = {}
        self._watch: list[Any] = []

    @classmethod
    def link(cls, pieces: Sequence[Piece]) -> None:
        """All AdaLoRA pieces of one delta share one allocator: the rank budget is global."""
        allocator = RankAllocator(pieces)  # type: ignore[arg-type]
        for piece in pieces:
            piece.allocator = allocator  # type: ignore[attr-defined]

    @property
    def rank(self) -> int:
        return int(self.Lambda.shape[0])

    def triplet_params(self) -> dict[str, nn.Parameter]:
        return {"P": self.P, "Lambda": self.Lambda, "Q": self.Q}

    # --- forward and merging -------------------------------------------------------------------------
    def forward(self, x: Tensor, base_out: Tensor, acc: Tensor, base: nn.Module) -> Tensor:  # type: ignore[override]
        q = self.Q * self.Lambda[:, None]  # diag(Λ) Q, [r, in]
        if not torch.is_grad_enabled() and acc.dtype == q.dtype == x.dtype and acc.is_contiguous():
            t = x.reshape(-1, x.shape[-1]) @ q.t()
            acc.view(-1, acc.shape[-1]).addmm_(t, self.P.t(), alpha=self.scale)
            return acc
        y = (x.to(q.dtype) @ q.t()) @ self.P.t()
        return acc + (y * self.scale).to(acc.dtype)

    @classmethod
    def update(cls, state: dict[str, Tensor], cfg: AdaLoRA, layout: Layout, weight: Tensor | None = None,
               bias: Tensor | None = None) -> tuple[DeltaTensor, Tensor | None]:
        """s · P diag(Λ) Q at the triplets the state holds (pruned ones are gone; masked ones have λ = 0)."""
        return LowRankDelta(state["Q"] * state["Lambda"][:, None], state["P"], cfg.scale), None

    def regularizer(self) -> Tensor | None:
        """γ (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F)."""
        if self.cfg.orth_reg_weight == 0 or self.rank == 0:
            return None
        eye = torch.eye(self.rank, dtype=self.P.dtype, device=self.P.device)
        pen = (self.P.t() @ self.P - eye).square().sum() + (self.Q @ self.Q.t() - eye).square().sum()
        return self.cfg.orth_reg_weight * pen

    # --- training hooks: the shared allocator does the work -----------------------------------------
    def before_step(self, step: int, total: int | None = None) -> None:
        self.allocator.before_step(step, total)
        if not self.allocator.finished and not self._watch:
            for name, param in self.triplet_params().items():
                self._watch.append(param.register_post_accumulate_grad_hook(self._grab(name)))

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer | None, step: int, total: int | None = None) -> None:
        self.allocator.after_step(optimizer, step, total)

    def _grab(self, name: str):  # type: ignore[no-untyped-def]
        def hook(param: Tensor) -> None:
            self._grads[name] = param.grad  # the accumulated gradient; loops zero it before after_optimizer_step
        return hook

    def take_grads(self) -> dict[str, Tensor]:
        """This step's gradients of P, Λ, Q (captured at backward, or still on the parameters), then forgotten."""
        grads = {n: p.grad for n, p in self.triplet_params().items() if p.grad is not None}
        grads = {**self._grads, **grads}
        self._grads = {}
        return {n: g for n, g in grads.items() if g is not None and g.shape == self.triplet_params()[n].shape}

    def stop_watching(self) -> None:
        for handle in self._watch:
            handle.remove()
        self._watch, self._grads = [], {}

    @torch.no_grad()
    def apply_mask(self, kept: Tensor) -> None:
        """λ_i := 0 for triplets not kept."""
        self.Lambda[~kept.to(self.Lambda.device)] = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Take the rank of a saved state (e.g. a checkpoint written after pruning), refusing inconsistent shapes."""
        shapes = {k: tuple(state_dict[prefix + k].shape) for k in ("P", "Lambda", "Q") if prefix + k in state_dict}
        if len(shapes) == 3:
            d_out, d_in = self.P.shape[0], self.Q.shape[1]
            r = shapes["Lambda"][0] if len(shapes["Lambda"]) == 1 else -1
            if shapes["P"] != (d_out, r) or shapes["Q"] != (r, d_in) or r > self.cfg.init_r:
                raise ShapeMismatchError(f"the AdaLoRA delta at {self.path!r} holds P {shapes['P']}, Λ "
                                         f"{shapes['Lambda']}, Q {shapes['Q']}; this module needs P [{d_out}, r], Λ [r], "
                                         f"Q [r, {d_in}] with r <= init_r={self.cfg.init_r} — the file is damaged or "
                                         f"belongs to another model")
            if r != self.rank:
                for name, param in self.triplet_params().items():
                    resize(param, param.data.new_zeros(shapes[name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"path={self.path!r}, rank={self.rank}"


def finalize(model: nn.Module, name: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Prune delta `name` to its target budget now (training stopped before total − tfinal, or no planned total):
    keep the target_r · modules best triplets by the importance gathered so far, remove the rest."""
    from ...runtime.step_hooks import trained_pieces

    allocators = {id(p.allocator): p.allocator for p in trained_pieces(model, [name]) if isinstance(p, AdaLoRAPiece)}
    if not allocators:
        raise StateError(f"delta {name!r} has no unmerged AdaLoRA pieces on this model; nothing to finalize — pass "
                         f"the name of an attached AdaLoRA delta")
    for allocator in allocators.values():
        if not allocator.finished:
            allocator.prune(optimizer)
