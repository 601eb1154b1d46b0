"""LoRA-GA: LoRA factors from the SVD of the full weight gradient (Wang, Yu & Li 2024, "LoRA-GA: Low-Rank
Adaptation with Gradient Approximation", arXiv:2407.05000).

G = ∂L/∂W averaged over the given batches, G = U S Vᵀ. Direction "ArB2r" (the paper's and its reference code's
default): A = c·V[:, :r]ᵀ, B = c·U[:, r:2r]; "A2rBr" swaps the halves (A = c·V[:, r:2r]ᵀ, B = c·U[:, :r]).
Scale c: "stable" c = d_out^¼/√γ (the paper's stable output scaling, γ = gamma), "unit" c = 1, "gd" c = 1/|s|.
Because BBᵀ and AᵀA project onto disjoint singular directions, the first plain-SGD step of learning rate η moves
the adapter by s(B·dA + dB·A) = −η ζ G₂ᵣ, ζ = s²c², with G₂ᵣ = Σ_{k<2r} S_k U_k V_kᵀ the best rank-2r approximation
of the full gradient: LoRA's first step points along full fine-tuning's. The paper subtracts s·B·A from the base
weight; here the piece keeps (A, B) as a frozen offset instead (LoRA init="given"), so the model is unchanged at
step 0 and the base weights stay exact.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, TargetError
from ..methods.lora.lora import LoRA
from .lora_factors import build_lora, check_lora, install_factors
from .statistics import DEFAULT_MEMORY, LossFn, weight_gradients

DIRECTIONS = ("ArB2r", "A2rBr")
SCALES = ("stable", "unit", "gd")


def lora_ga(model: nn.Module, cfg: LoRA, batches: Iterable[Any], name: str = "default", *,
            loss_fn: LossFn | None = None, direction: str = "ArB2r", scale: str = "stable", gamma: float = 16.0,
            memory: int | None = DEFAULT_MEMORY, activate: bool = True, trainable: bool = True,
            progress: bool = True) -> nn.Module:
    """Attach LoRA delta `name` (config `cfg`, Linear/Conv1D targets) initialised by LoRA-GA. Returns `model`.

    `batches` are dicts with labels for model(**batch) (or anything `loss_fn(model, batch)` turns into a scalar
    loss); gradients are taken in the model's current mode (train/eval). Needs 2r <= min(out, in) per module.
    `memory`: bytes of gradients held at once (see init/statistics.py). Saved with init="given"."""
    check_lora(model, cfg, name, "dt.init.lora_ga")
    if direction not in DIRECTIONS:
        raise ConfigError(f"dt.init.lora_ga: direction must be one of {DIRECTIONS}, got {direction!r}")
    if scale not in SCALES:
        raise ConfigError(f"dt.init.lora_ga: scale must be one of {SCALES}, got {scale!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0:
        raise ConfigError(f"dt.init.lora_ga: gamma must be a positive number, got {gamma!r}")
    cfg = cfg.replace(init="given")  # type: ignore[assignment]
    built, lora = build_lora(model, cfg)
    for path, (module, layout) in lora.items():
        r = cfg.resolve(path).r
        if 2 * r > min(layout.shape(module)):
            raise TargetError(f"LoRA-GA takes 2r={2 * r} singular directions of the gradient, more than the "
                              f"{'x'.join(map(str, layout.shape(module)))} weight of {path!r} has; lower r or use "
                              f"rank_pattern")
    factors = {}
    with closing(weight_gradients(model, lora, batches, loss_fn=loss_fn, memory=memory, progress=progress,
                                  description="LoRA-GA: gradients")) as stream:  # closed on errors too
        for path, grad in stream:
            local = cfg.resolve(path)
            factors[path] = lora_ga_factors(grad, local.r, local.scale, direction, scale, gamma)
    return install_factors(model, name, cfg, built, factors, activate=activate, trainable=trainable)


def lora_ga_factors(grad: Tensor, r: int, s: float, direction: str = "ArB2r", scale: str = "stable",
                    gamma: float = 16.0) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) from the mean gradient G [out, in] (see the module docstring)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    first, second = slice(0, r), slice(r, 2 * r)
    a, b = (vh[first], u[:, second]) if direction == "ArB2r" else (vh[second], u[:, first])
    c = {"stable": grad.shape[0] ** 0.25 / math.sqrt(gamma), "unit": 1.0, "gd": 1.0 / abs(s)}[scale]
    return (signed(a) * c).contiguous(), (signed(b.t()).t() * c).contiguous()


def signed(rows: Tensor) -> Tensor:
    """Each row times the sign of its largest-magnitude entry. A and B pair singular vectors of different singular
    values, so unlike u·vᵀ their product depends on the arbitrary signs an SVD returns (which differ between CPU
    and GPU); this fixes them."""
    pick = rows.gather(1, rows.abs().argmax(dim=1, keepdim=True))
    return rows * torch.where(pick < 0, -1.0, 1.0).to(rows.dtype)
