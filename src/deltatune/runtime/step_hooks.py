"""The pieces' per-step training hooks (Piece.before_step / after_optimizer_step), for any training loop.

dt.train calls these around every optimizer step; `DeltaCallback` (callback.py) does the same inside an HF
Trainer. A custom loop calls `before_step(model, step, total)` before each step's forward passes and
`after_optimizer_step(model, optimizer, step + 1, total)` after `optimizer.step()`, and adds
`regularization(model)` to each loss it backpropagates (methods with penalty terms, e.g. SORSA).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .slot import slot_of
from .state import state_of
from ..core.piece import Piece


def trained_pieces(model: nn.Module, names: Iterable[str] | None = None) -> list[Piece]:
    """The pieces of deltas `names` (default: every trainable attached delta) that are not merged."""
    st = state_of(model)
    if st is None and isinstance(getattr(model, "module", None), nn.Module):  # DDP and similar wrappers
        model = model.module
        st = state_of(model)
    if st is None:
        return []
    wanted = [n for n, rec in st.deltas.items() if rec.trainable] if names is None else list(names)
    out = []
    for module in model.modules():
        slot = slot_of(module)
        if slot is not None:
            out.extend(slot[n] for n in wanted if n in slot and n not in slot.internal.merged)
    return out


def before_step(model: nn.Module, step: int, total: int | None = None, names: Iterable[str] | None = None) -> None:
    """Before training step number step + 1 (`step` optimizer steps are done)."""
    for piece in trained_pieces(model, names):
        piece.before_step(step, total)


def regularization(model: nn.Module, names: Iterable[str] | None = None) -> torch.Tensor | float:
    """The sum of the trained pieces' `regularizer()` terms (0.0 when none has one): add it to the loss. Default
    names: the trainable deltas that are active (an inactive delta is not being trained)."""
    if names is None:
        st = state_of(model if state_of(model) is not None else getattr(model, "module", model))
        names = [n for n in (st.active if st is not None else ()) if n in st.deltas and st.deltas[n].trainable]
    total: torch.Tensor | float = 0.0
    for piece in trained_pieces(model, names):
        term = piece.regularizer()
        if term is not None:
            total = total + term
    return total


def after_optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int,
                         total: int | None = None, names: Iterable[str] | None = None) -> None:
    """After the optimizer step that makes `step` steps done."""
    for piece in trained_pieces(model, names):
        piece.after_optimizer_step(optimizer, step, total)
