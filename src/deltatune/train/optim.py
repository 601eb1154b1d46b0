"""Optimizer parameter groups: LoRA+ (a larger learning rate for the pieces' "fast" parameters) and a learning rate
of its own for the (new) output head."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..core.targeting import head_paths, matches
from ..runtime import slot_of


def head_param_ids(model: nn.Module, extra: tuple[str, ...] = ()) -> set[int]:
    """ids of the trainable parameters inside the model's output heads (`core.targeting.head_paths`: classifier,
    score, lm_head, ...) and inside modules matching `extra` (a delta's `modules_to_save`), pieces included."""
    roots = head_paths(model) | ({p for p, _ in model.named_modules() if p and matches(tuple(extra), p)} if extra else set())
    return {id(p) for n, p in model.named_parameters()
            if p.requires_grad and any(n.startswith(root + ".") for root in roots)}


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, lr_ratio: float = 1.0,
                 head_lr: float | None = None, head_modules: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Groups of trainable parameters for torch.optim: with lr_ratio > 1 (LoRA+, e.g. 16) each piece's fast
    parameters (LoRA's B) get lr · lr_ratio; with `head_lr` the head's parameters (`head_param_ids`) get it;
    every other trainable parameter gets lr."""
    fast_ids = set()
    for module in model.modules():
        slot = slot_of(module)
        if slot is not None:
            for piece in slot.values():
                fast_ids.update(id(p) for p in piece.fast_params())
    head_ids = head_param_ids(model, head_modules) if head_lr is not None else set()
    slow, fast, head = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            if id(p) in head_ids:
                head.append(p)
            else:
                (fast if id(p) in fast_ids and lr_ratio != 1.0 else slow).append(p)
    groups = [{"params": slow, "lr": lr, "weight_decay": weight_decay}] if slow else []
    if fast:
        groups.append({"params": fast, "lr": lr * lr_ratio, "weight_decay": weight_decay})
    if head:
        groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay})
    return groups
