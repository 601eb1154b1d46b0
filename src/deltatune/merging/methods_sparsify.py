"""Sparsifying merge methods: TIES, DARE, Model Breadcrumbs (each linear or with TIES sign election), TALL
masks and Consensus.

They share mergekit's "generalized task arithmetic" shape, so recipes translate parameter for parameter:
sparsify each τ_i (per-input `density` = fraction kept), weight it (`weight`), optionally elect a sign per
entry and keep only the agreeing inputs, optionally divide by the summed weights (`normalize`), scale by λ.
Formulas and papers: docs/merging.md, section "Methods".
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import ConfigError
from .methods_basic import normalizer, weighted_sum
from .registry import Fraction, NonNegative, NonNegativeInt, PerInput, Unit, generator, merge_method

_ROUND = 1e-9  # counts are ⌊fraction · n⌋, robust to 0.29 * 100 = 28.999999999999996


def keep_count(fraction: float, n: int) -> int:
    """How many of n entries a kept fraction means: ⌊fraction · n⌋, at least 1 (density > 0 keeps something)."""
    return max(1, min(n, math.floor(fraction * n + _ROUND)))


def top_mask(mag: Tensor, m: int) -> Tensor:
    """Per row of a 2-D tensor of magnitudes: True at the m first entries in the order (magnitude descending,
    position ascending). A k-th value selection, not a sort: O(n) per row."""
    n = mag.shape[-1]
    if m <= 0:
        return torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    if m >= n:
        return torch.ones(mag.shape, dtype=torch.bool, device=mag.device)
    threshold = torch.kthvalue(mag, n - m + 1, dim=-1, keepdim=True).values  # the m-th largest
    above = mag > threshold
    tied = mag == threshold
    missing = m - above.sum(-1, keepdim=True)
    if bool((tied.sum(-1, keepdim=True) <= missing).all()):  # the usual case: no tie straddles the cut
        return above | tied
    return above | (tied & (tied.cumsum(-1) <= missing))  # equal magnitudes: earlier positions first


def band_mask(rows: Tensor, n_keep: int, n_top: int) -> Tensor:
    """Per row of a 2-D tensor: True at the entries ranked n_top … n_top+n_keep−1 by magnitude (largest first;
    equal magnitudes rank by position)."""
    mag = rows.abs()
    mask = top_mask(mag, n_top + n_keep)
    return mask & ~top_mask(mag, n_top) if n_top > 0 else mask


def magnitude_mask(t: Tensor, density: float) -> Tensor:
    """TIES trim: keep the ⌊density · N⌋ largest-magnitude entries of the whole tensor."""
    return band_mask(t.reshape(1, -1), keep_count(density, t.numel()), 0).reshape(t.shape)


def breadcrumbs_mask(t: Tensor, density: float, gamma: float, per_row: bool = True) -> Tensor:
    """Model Breadcrumbs: per row (or over the whole tensor), drop the ⌊γ · n⌋ largest-magnitude outliers and the
    smallest entries, keeping ⌊density · n⌋; when density + γ > 1 fewer outliers are dropped (as in mergekit)."""
    rows = t.reshape(-1, t.shape[-1]) if per_row and t.dim() >= 2 else t.reshape(1, -1)
    n = rows.shape[-1]
    n_keep = keep_count(density, n)
    n_top = min(math.floor(gamma * n + _ROUND), n - n_keep)
    return band_mask(rows, n_keep, n_top).reshape(t.shape)


def dare_mask(t: Tensor, density: float, seed: int, key: str, index: int) -> Tensor:
    """DARE: keep each entry independently with probability `density`: rand < density, drawn from
    `generator(seed, key, index)` on t's device."""
    g = generator(seed, key, index, t.device)
    return torch.rand(t.shape, generator=g, device=t.device) < density


def combine(tensors: list[Tensor], weight: list[float], *, elect_sign: bool, normalize: bool, lam: float,
            method: str) -> Tensor:
    """λ · Σ_i w_i τ_i, optionally over sign-agreeing inputs only and divided by their summed weights.

    elect_sign: per entry, the elected sign is that of Σ_i w_i τ_i (+ when the sum is 0); an input counts where
    w_i τ_i has that sign (zeros never count). normalize divides by Σ w_i over the counted inputs (by 1 where
    none counts)."""
    if elect_sign:  # input by input with a few buffers of one tensor's size (no n-fold stacked copies)
        total = torch.zeros_like(tensors[0])
        for t, c in zip(tensors, weight):
            total.add_(t, alpha=c)
        positive = total >= 0
        out, divisor = torch.zeros_like(total), torch.zeros_like(total)
        for t, c in zip(tensors, weight):
            wt = t * c
            agree = torch.where(positive, wt > 0, wt < 0)  # zeros never count
            out.add_(wt.mul_(agree))
            if normalize:
                divisor.add_(agree, alpha=c)
        if normalize:
            out.div_(divisor.masked_fill_(divisor == 0, 1.0))
        return out.mul_(lam)
    out = weighted_sum(tensors, weight)
    if normalize:
        out = out / normalizer(weight, method)
    return out * lam


def _dare(tensors: list[Tensor], density: list[float], rescale: bool, seed: int, key: str) -> list[Tensor]:
    out = []
    for i, (t, d) in enumerate(zip(tensors, density)):
        kept = t * dare_mask(t, d, seed, key, i)
        out.append(kept / d if rescale else kept)
    return out


@merge_method("ties", paper="https://arxiv.org/abs/2306.01708")
def ties(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
         normalize: bool = True, lambda_: float = 1.0) -> Tensor:
    """TIES: trim each τ_i to its top-density entries by magnitude, elect signs, disjoint (weighted) mean, × λ."""
    trimmed = [t * magnitude_mask(t, d) for t, d in zip(tensors, density)]
    return combine(trimmed, weight, elect_sign=True, normalize=normalize, lam=lambda_, method="ties")


@merge_method("dare_linear", paper="https://arxiv.org/abs/2311.03099")
def dare_linear(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
                rescale: bool = True, normalize: bool = False, lambda_: float = 1.0, seed: NonNegativeInt = 0,
                key: str = "") -> Tensor:
    """DARE: drop each entry with probability p = 1 − density, rescale the rest by 1/(1 − p); then λ · Σ w_i τ̂_i."""
    dropped = _dare(tensors, density, rescale, seed, key)
    return combine(dropped, weight, elect_sign=False, normalize=normalize, lam=lambda_, method="dare_linear")


@merge_method("dare_ties", paper="https://arxiv.org/abs/2311.03099")
def dare_ties(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
              rescale: bool = True, normalize: bool = False, lambda_: float = 1.0, seed: NonNegativeInt = 0,
              key: str = "") -> Tensor:
    """DARE-TIES: DARE's drop-and-rescale in place of TIES' trim, then TIES sign election, × λ."""
    dropped = _dare(tensors, density, rescale, seed, key)
    return combine(dropped, weight, elect_sign=True, normalize=normalize, lam=lambda_, method="dare_ties")


@merge_method("breadcrumbs", paper="https://arxiv.org/abs/2312.06795")
def breadcrumbs(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
                gamma: PerInput[Unit] = 0.01, per_row: bool = True, normalize: bool = False,
                lambda_: float = 1.0) -> Tensor:
    """Model Breadcrumbs: drop each τ_i's top-γ outliers and its small entries (keep density), λ · Σ w_i τ̂_i."""
    masked = [t * breadcrumbs_mask(t, d, g, per_row) for t, d, g in zip(tensors, density, gamma)]
    return combine(masked, weight, elect_sign=False, normalize=normalize, lam=lambda_, method="breadcrumbs")


@merge_method("breadcrumbs_ties", paper="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
                     gamma: PerInput[Unit] = 0.01, per_row: bool = True, normalize: bool = False,
                     lambda_: float = 1.0) -> Tensor:
    """Model Breadcrumbs masks followed by TIES sign election, × λ."""
    masked = [t * breadcrumbs_mask(t, d, g, per_row) for t, d, g in zip(tensors, density, gamma)]
    return combine(masked, weight, elect_sign=True, normalize=normalize, lam=lambda_, method="breadcrumbs_ties")


def tall_masks(tensors: list[Tensor], mask_lambda: list[float], weight: list[float] | None = None) -> tuple[Tensor, list[Tensor]]:
    """(τ_MTL, [m_t]): τ_MTL = Σ_i w_i τ_i and the TALL mask of each task, m_t = |w_t τ_t| > λ_t · |τ_MTL − w_t τ_t|
    (strict, as in the authors' code: an entry a task leaves at zero is never counted as used by it)."""
    weight = [1.0] * len(tensors) if weight is None else weight
    parts = [t * w for t, w in zip(tensors, weight)]
    mtl = torch.stack(parts).sum(0)
    return mtl, [p.abs() > lam * (mtl - p).abs() for p, lam in zip(parts, mask_lambda)]


@merge_method("consensus", paper="https://arxiv.org/abs/2405.07813")
def consensus(tensors: list[Tensor], *, k: NonNegativeInt = 2, mask_lambda: PerInput[NonNegative] = 0.4,
              weight: PerInput[float] = 1.0, lambda_: float = 1.0) -> Tensor:
    """Consensus merging: λ · τ_MTL on the entries whose TALL masks agree for at least k tasks."""
    mtl, masks = tall_masks(tensors, mask_lambda, weight)
    return mtl * (torch.stack(masks).sum(0) >= k) * lambda_


@merge_method("tall", paper="https://arxiv.org/abs/2405.07813")
def tall(tensors: list[Tensor], *, task: NonNegativeInt, mask_lambda: PerInput[NonNegative] = 0.4,
         weight: PerInput[float] = 1.0, lambda_: float = 1.0) -> Tensor:
    """TALL reconstruction of one task: λ · τ_MTL ⊙ m_task (the merged vector localized to that task)."""
    if task >= len(tensors):
        raise ConfigError(f"merge method 'tall': task = {task} but there are only {len(tensors)} inputs; expected an "
                          f"input index 0 … {len(tensors) - 1}")
    mtl, masks = tall_masks(tensors, mask_lambda, weight)
    return mtl * masks[task] * lambda_
