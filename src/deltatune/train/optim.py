"""Optimizer parameter groups, including LoRA+ (a larger learning rate for the pieces' "fast" parameters)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..runtime import slot_of


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, lr_ratio: float = 1.0) -> list[dict[str, Any]]:
    """Groups of trainable parameters for torch.optim: with lr_ratio > 1 (LoRA+, e.g. 16) each piece's fast
    parameters (LoRA's B) get lr · lr_ratio; every other trainable parameter gets lr."""
    fast_ids = set()
    for module in model.modules():
        slot = slot_of(module)
        if slot is not None:
            for piece in slot.values():
                fast_ids.update(id(p) for p in piece.fast_params())
    slow, fast = [], []
    for p in model.parameters():
        if p.requires_grad:
            (fast if id(p) in fast_ids and lr_ratio != 1.0 else slow).append(p)
    groups = [{"params": slow, "lr": lr, "weight_decay": weight_decay}] if slow else []
    if fast:
        groups.append({"params": fast, "lr": lr * lr_ratio, "weight_decay": weight_decay})
    return groups
