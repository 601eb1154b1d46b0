"""A meta-device copy of the base model: its module tree, weight shapes and dtypes, with no memory behind them.
Registration validates a delta against it exactly as `dt.load` validates against the model (module paths, weight
shapes, pieces built from the config and compared with the file's tensors), without touching the real model."""
from __future__ import annotations

import copy

import torch
from torch import nn


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are meta tensors of the same shapes and dtypes."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)
