"""EVA: LoRA's A from the principal directions of each module's inputs (Paischer et al. 2024, "One Initialization
to Rule Them All: Fine-tuning via Explained Variance Adaptation", arXiv:2410.07170).

For a module with inputs x (tokens of the given batches), A = the top-r right-singular vectors of the centered input
matrix (equivalently the top eigenvectors of the input covariance E[(x − μ)(x − μ)ᵀ]), B = 0: the model is unchanged
at step 0 and A starts on the directions that explain most of the input variance. With rho > 1 ranks are
redistributed: module i may take up to round(rho·rᵢ) components and the Σrᵢ components with the largest explained
variance ratio λ/tr(C) over all modules are kept (a module left with none is not adapted); the scale s = α/r (α/√r
with rslora) of each module stays as configured, so α is adjusted where the rank changes.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from contextlib import closing
from typing import Any

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError
from ..methods.lora.lora import LoRA
from .lora_factors import build_lora, check_lora, install_factors
from .statistics import DEFAULT_MEMORY, InputMoments, TokenMask, default_token_mask, input_moments


def eva(model: nn.Module, cfg: LoRA, batches: Iterable[Any], name: str = "default", *, rho: float = 2.0,
        whiten: bool = False, token_mask: TokenMask | None = default_token_mask, memory: int | None = DEFAULT_MEMORY,
        activate: bool = True, trainable: bool = True, progress: bool = True) -> nn.Module:
    """Attach LoRA delta `name` (config `cfg`, Linear/Conv1D targets) with A from EVA and B = 0. Returns `model`.

    `batches`: dicts for model(**batch) (or tensors for model(batch)); tokens where `token_mask(batch)` is False
    (default: padding, and labels == -100 where labels are per token) are left out. rho = 1 keeps rank r
    everywhere; whiten divides each component by the square root of its singular value. `memory`: bytes of
    input statistics held at once (see init/statistics.py; None = one pass)."""
    check_lora(model, cfg, name, "dt.init.eva")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 1:
        raise ConfigError(f"dt.init.eva: rho must be a number >= 1 (1 = the same rank everywhere), got {rho!r}")
    if not isinstance(whiten, bool):
        raise ConfigError(f"dt.init.eva: whiten must be True or False, got {whiten!r}")
    built, lora = build_lora(model, cfg)
    base = {p: cfg.resolve(p).r for p in lora}
    caps = {p: min(round(rho * base[p]), *lay.shape(m)) for p, (m, lay) in lora.items()}
    comps: dict[str, Tensor] = {}
    ratios: dict[str, Tensor] = {}
    last: tuple[InputMoments | None, tuple[Tensor, Tensor]] = (None, (torch.empty(0), torch.empty(0)))
    with closing(input_moments(model, lora, batches, token_mask=token_mask, memory=memory, progress=progress,
                               description="EVA: input statistics")) as stream:  # closed (hooks, modes) on errors too
        for path, moments in stream:
            if last[0] is not moments:  # modules with the same input share one decomposition
                last = (moments, principal_components(moments, whiten))
            comps[path], ratios[path] = last[1][0][: caps[path]].clone(), last[1][1][: caps[path]].clone()
    del last
    ranks = base if rho == 1 else redistribute(ratios, base)
    local = cfg if rho == 1 else eva_config(cfg, ranks)
    if local is not cfg:
        whole = [p for p, _, _ in built if p not in lora]
        built, lora = build_lora(model, local, [p for p in lora if ranks[p] > 0] + whole)
    factors = {p: (comps[p][: ranks[p]], torch.zeros(lay.shape(m)[0], ranks[p])) for p, (m, lay) in lora.items()}
    return install_factors(model, name, local, built, factors, activate=activate, trainable=trainable)


def principal_components(moments: InputMoments, whiten: bool = False) -> tuple[Tensor, Tensor]:
    """(components [d, d] as rows, largest variance first; their explained variance ratios λ / tr C).

    whiten: each component divided by √σ, σ = √(n·λ) the singular value of the centered [n, d] input matrix."""
    evals, evecs = torch.linalg.eigh(moments.covariance().double())
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    ratio = evals / evals.sum().clamp_min(torch.finfo(torch.float64).tiny)
    rows = evecs.t()
    if whiten:
        sigma = (moments.n * evals).sqrt()
        rows = rows / sigma.sqrt().clamp_min(torch.finfo(torch.float32).eps)[:, None]
    return rows.float(), ratio.float()


def redistribute(ratios: Mapping[str, Tensor], base: Mapping[str, int]) -> dict[str, int]:
    """Ranks keeping the Σ base components of largest explained variance ratio over all modules (ties: module order,
    then component order); each module offers its components up to its cap (the length of its ratios)."""
    budget = sum(base.values())
    candidates = sorted((-float(v), i, j, path) for i, (path, vals) in enumerate(ratios.items())
                        for j, v in enumerate(vals.tolist()))
    ranks = dict.fromkeys(ratios, 0)
    for _, _, _, path in candidates[:budget]:
        ranks[path] += 1
    return ranks


def eva_config(cfg: LoRA, ranks: Mapping[str, int]) -> LoRA:
    """`cfg` with per-module ranks (modules of rank 0 left out of targets) and α keeping each module's scale."""
    rank_pattern, alpha_pattern = {}, {}
    for path, r in ranks.items():
        local = cfg.resolve(path)
        if r == 0:
            continue
        alpha = local.alpha if r == local.r else local.alpha * (math.sqrt(r / local.r) if cfg.rslora else r / local.r)
        if r != cfg.r:
            rank_pattern[re.escape(path)] = r
        if alpha != cfg.alpha:
            alpha_pattern[re.escape(path)] = alpha
    if rank_pattern == cfg.rank_pattern and alpha_pattern == cfg.alpha_pattern and all(ranks.values()):
        return cfg
    changes: dict[str, Any] = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if not all(ranks.values()):
        changes.update(targets=tuple(p for p, r in ranks.items() if r), exclude=None, layers=None)
    return cfg.replace(**changes)  # type: ignore[return-value]
