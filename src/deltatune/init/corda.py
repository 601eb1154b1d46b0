"""CorDA: LoRA factors from the context-oriented decomposition of each weight (Yang et al. 2024, "CorDA:
Context-Oriented Decomposition Adaptation of Large Language Models", arXiv:2406.05223).

With C = E[x xᵀ] the (uncentered) covariance of a module's inputs over the given batches, damped to
C' = C + λ·mean(diag C)·I (λ = damping, doubled until C' is positive definite), the SVD W C' = U Σ Vᵀ gives
W = U Σ (Vᵀ C'⁻¹) exactly. The adapted part is r components: the r largest in instruction-previewed mode ("ipm",
adapt what the data uses most) or the r smallest in knowledge-preserved mode ("kpm", freeze the principal components
that carry pre-trained knowledge). s·B·A = U_r Σ_r V_rᵀ C'⁻¹ with A = √(Σ_r/s) V_rᵀ C'⁻¹, B = U_r √(Σ_r/s).
Instead of writing the residual W − s·B·A into the base weight (as the paper and PEFT do), the piece keeps (A, B)
as a frozen offset that it subtracts (LoRA init="given"): the model is unchanged at step 0, and merge/unmerge,
save/load and the base weights stay exact.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..methods.lora.lora import LoRA
from .lora_factors import build_lora, check_lora, install_factors
from .statistics import DEFAULT_MEMORY, TokenMask, default_token_mask, input_moments

MODES = ("ipm", "kpm")


def corda(model: nn.Module, cfg: LoRA, batches: Iterable[Any], name: str = "default", *, mode: str = "ipm",
          damping: float = 0.01, token_mask: TokenMask | None = default_token_mask,
          memory: int | None = DEFAULT_MEMORY, activate: bool = True, trainable: bool = True,
          progress: bool = True) -> nn.Module:
    """Attach LoRA delta `name` (config `cfg`, Linear/Conv1D targets) initialised by CorDA in `mode`. Returns `model`.

    `batches`, `token_mask` and `memory` as for dt.init.eva. The delta is saved with init="given" (its frozen
    offset is part of the file)."""
    check_lora(model, cfg, name, "dt.init.corda")
    if mode not in MODES:
        raise ConfigError(f"dt.init.corda: mode must be 'ipm' (adapt the largest components) or 'kpm' (adapt the "
                          f"smallest, keep world knowledge), got {mode!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping <= 0:
        raise ConfigError(f"dt.init.corda: damping must be a positive number (a fraction of the mean input variance), "
                          f"got {damping!r}")
    cfg = cfg.replace(init="given")  # type: ignore[assignment]
    built, lora = build_lora(model, cfg)
    factors = {}
    with closing(input_moments(model, lora, batches, token_mask=token_mask, memory=memory, progress=progress,
                               description="CorDA: input covariances")) as stream:  # closed on errors too
        for path, moments in stream:
            module, layout = lora[path]
            local = cfg.resolve(path)
            factors[path] = corda_factors(layout.weight(module).detach(), moments.second_moment(), local.r,
                                          local.scale, mode, damping)
    return install_factors(model, name, cfg, built, factors, activate=activate, trainable=trainable)


def damped(c: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """(C' = C + λ·mean(diag C)·I, its Cholesky factor), float64, λ doubled from `damping` until C' is positive definite."""
    c = c.double()
    ridge = c.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny) * torch.eye(c.shape[0], dtype=c.dtype,
                                                                                        device=c.device)
    lam = damping
    while True:
        fixed = c + lam * ridge
        chol, info = torch.linalg.cholesky_ex(fixed)
        if int(info) == 0:
            return fixed, chol
        lam *= 2


def corda_factors(w: Tensor, c: Tensor, r: int, scale: float, mode: str, damping: float = 0.01) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) with scale·B·A = the r largest ("ipm") or smallest ("kpm") components of
    W = U Σ (Vᵀ C'⁻¹), from W [out, in] and the input covariance C [in, in]."""
    fixed, chol = damped(c, damping)
    # float64: kpm takes the smallest components, which float32 resolves only to eps·σ_max
    u, s, vh = torch.linalg.svd(w.double() @ fixed, full_matrices=False)
    n = s.numel()
    sl = slice(0, r) if mode == "ipm" else slice(n - r, n)
    right = torch.cholesky_solve(vh[sl].t(), chol).t()  # V_rᵀ C'⁻¹ (C' symmetric)
    root = (s[sl] / abs(scale)).sqrt()
    return (root[:, None] * right).float(), (u[:, sl] * (root * math.copysign(1.0, scale))[None, :]).float()
