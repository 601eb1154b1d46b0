"""Dense merge methods: weighted averages and sums, uniform soup, Fisher weighting, metrics weighting, SLERP.

Every function receives one module's task vectors τ_i (float32, one shape) and returns the merged τ.
Formulas and papers: docs/merging.md, section "Methods".
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..core.errors import ConfigError
from .registry import NonNegative, PerInput, Positive, Unit, merge_method

# |cos| above this: the two vectors are treated as (anti)parallel and SLERP falls back to LERP (as mergekit does)
SLERP_PARALLEL = 0.9995


def weighted_sum(tensors: list[Tensor], weight: list[float]) -> Tensor:
    """Σ_i w_i τ_i."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        out.add_(t, alpha=float(w))
    return out


def normalizer(weight: list[float], method: str) -> float:
    total = float(sum(weight))
    if abs(total) < 1e-8:
        raise ConfigError(f"merge method {method!r}: the weights {weight} sum to 0, so they cannot be normalized; "
                          f"set normalize=false or change the weights")
    return total


@merge_method("linear", paper="https://arxiv.org/abs/2203.05482", linear=True)
def linear(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, normalize: bool = True) -> Tensor:
    """Weighted average Σ w_i τ_i / Σ w_i (with normalize=false: the weighted sum Σ w_i τ_i)."""
    out = weighted_sum(tensors, weight)
    return out / normalizer(weight, "linear") if normalize else out


@merge_method("task_arithmetic", paper="https://arxiv.org/abs/2212.04089", linear=True)
def task_arithmetic(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, normalize: bool = False,
                    lambda_: float = 1.0) -> Tensor:
    """λ · Σ w_i τ_i (divided by Σ w_i with normalize=true); a negative weight negates (forgets) a task."""
    out = weighted_sum(tensors, weight)
    if normalize:
        out = out / normalizer(weight, "task_arithmetic")
    return out * lambda_


@merge_method("soup_uniform", paper="https://arxiv.org/abs/2203.05482", linear=True)
def soup_uniform(tensors: list[Tensor]) -> Tensor:
    """Uniform soup: the mean (1/n) Σ τ_i."""
    return weighted_sum(tensors, [1.0 / len(tensors)] * len(tensors))


@merge_method("fisher", paper="https://arxiv.org/abs/2111.09832")
def fisher_merge(tensors: list[Tensor], *, fisher: PerInput[Tensor], weight: PerInput[NonNegative] = 1.0,
                 eps: Positive = 1e-8) -> Tensor:
    """Fisher-weighted average Σ w_i (F_i + ε) ⊙ τ_i / Σ w_i (F_i + ε), elementwise (diagonal Fisher)."""
    if sum(weight) <= 0:
        raise ConfigError(f"merge method 'fisher': the weights {weight} are all 0; give at least one input a "
                          f"positive weight")
    num, den = torch.zeros_like(tensors[0]), torch.zeros_like(tensors[0])
    for i, (t, f, w) in enumerate(zip(tensors, fisher, weight)):
        if bool((f < 0).any()) or not bool(torch.isfinite(f).all()):
            raise ConfigError(f"merge method 'fisher': fisher[{i}] has negative or non-finite entries; a diagonal "
                              f"Fisher is a mean of squared gradients (see deltatune.merging.estimate_fisher)")
        fw = (f + eps) * w
        num.addcmul_(fw, t)
        den.add_(fw)
    return num / den


def mwa_weights(metric: list[float], kind: str = "loss", penalty: float = 1.0) -> list[float]:
    """Metrics-weighted averaging weights: w_i ∝ m_i^(−p) for a loss (lower is better), w_i ∝ m_i^p for a step
    count (higher is better), normalized to sum to 1; p = 0 gives the uniform average."""
    if kind not in ("loss", "steps"):
        raise ConfigError(f"mwa: kind must be 'loss' or 'steps', got {kind!r}")
    if any(not (m > 0 and math.isfinite(m)) for m in metric):
        raise ConfigError(f"mwa: metrics must be positive and finite, got {metric}")
    sign = -1.0 if kind == "loss" else 1.0
    logits = torch.tensor([sign * penalty * math.log(m) for m in metric], dtype=torch.float64)
    return torch.softmax(logits, 0).tolist()  # = m_i^(±p) / Σ_j m_j^(±p), computed without overflow


@merge_method("mwa", paper="https://arxiv.org/abs/2504.18580", linear=True)
def mwa(tensors: list[Tensor], *, metric: PerInput[Positive], kind: Literal["loss", "steps"] = "loss",
        penalty: NonNegative = 1.0) -> Tensor:
    """Metrics-weighted averaging Σ w_i τ_i with w from `mwa_weights(metric, kind, penalty)`."""
    return weighted_sum(tensors, mwa_weights(metric, kind, penalty))


@merge_method("slerp", paper="https://doi.org/10.1145/325165.325242", inputs=2)
def slerp(tensors: list[Tensor], *, t: Unit) -> Tensor:
    """Spherical interpolation of the two task vectors: sin((1−t)θ)/sin θ · τ_0 + sin(tθ)/sin θ · τ_1, with θ the
    angle between them; linear interpolation (1−t) τ_0 + t τ_1 where they are (anti)parallel or one is zero."""
    a, b = tensors
    na = torch.linalg.vector_norm(a.double())
    nb = torch.linalg.vector_norm(b.double())
    if na < 1e-12 or nb < 1e-12:
        return torch.lerp(a, b, t)
    cos = float((torch.dot(a.flatten().double(), b.flatten().double()) / (na * nb)).clamp(-1.0, 1.0))
    if abs(cos) > SLERP_PARALLEL:
        return torch.lerp(a, b, t)
    theta = math.acos(cos)
    s = math.sin(theta)
    return a * (math.sin((1.0 - t) * theta) / s) + b * (math.sin(t * theta) / s)
