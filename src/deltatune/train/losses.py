"""Classification losses for imbalanced data: cross-entropy with per-class weights and label smoothing.

Weights (`class_weights`):
* `none`: every example counts once (plain cross-entropy);
* `balanced`: w_c = N / (K · n_c) for the training set's N examples, K classes and n_c examples of class c, so
  every class carries the same total weight;
* `sqrt`: w_c ∝ 1 / √n_c, between the two, scaled so that the training examples' mean weight is 1 (as with
  `balanced`);
* a list of K non-negative numbers, in label order: used as given.

The weighted loss of a batch is Σ_i w_{y_i} ℓ_i / Σ_i w_{y_i} (a weighted mean). With label smoothing ε each
example's target is (1 − ε) on its class plus ε/K on every class; the smoothing term of example i is
Σ_c w_c (−log p_ic) / K, divided by the same Σ_i w_{y_i} (torch's `cross_entropy(weight=, label_smoothing=)`
convention).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..core.errors import ConfigError
from ..core.parsing import short

CLASS_WEIGHTS = ("none", "balanced", "sqrt")


def check_class_weights(spec: object) -> None:
    """Refuse a `class_weights` value that is neither a known scheme nor a list of non-negative finite numbers."""
    if spec is None or (isinstance(spec, str) and spec in CLASS_WEIGHTS):
        return
    if isinstance(spec, (list, tuple)) and spec and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in spec):
        if sum(spec) <= 0:
            raise ConfigError("class_weights: at least one weight must be > 0")
        return
    raise ConfigError(f"class_weights must be one of {CLASS_WEIGHTS} or a list of non-negative numbers (one per "
                      f"class, in label order), got {short(spec)}")


def class_weights(spec: str | Sequence[float] | None, labels: Sequence[int], n_classes: int) -> Tensor | None:
    """Per-class weights (float32, length `n_classes`) for `spec` from the training labels; None for `none`.
    A class absent from the training set gets weight 0 under `balanced`/`sqrt` (no example of it is ever weighted)."""
    check_class_weights(spec)
    if spec is None or spec == "none":
        return None
    if not isinstance(spec, str):
        if len(spec) != n_classes:
            raise ConfigError(f"class_weights has {len(spec)} weights but the data has {n_classes} classes")
        return torch.tensor([float(w) for w in spec], dtype=torch.float32)
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=n_classes).double()
    present = counts > 0
    raw = torch.zeros(n_classes, dtype=torch.float64)
    raw[present] = 1.0 / counts[present] if spec == "balanced" else counts[present].rsqrt()
    total = counts.sum()
    raw *= total / (raw * counts).sum()  # the training examples' mean weight is 1
    return raw.float()


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor | None = None,
                           label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of `logits` [B, K] against `labels` [B] with optional class weights [K] and label smoothing
    (formulas in the module docstring); computed in float32."""
    logp = logits.float().log_softmax(-1)
    n_classes = logp.shape[-1]
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    w = torch.ones(n_classes, device=logp.device) if weight is None else weight.to(logp.device, torch.float32)
    w_i = w[labels]
    denom = w_i.sum().clamp_min(torch.finfo(torch.float32).tiny)
    loss = (w_i * nll).sum() / denom
    if label_smoothing:
        smooth = -(logp * w).sum(-1) / n_classes
        loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth.sum() / denom
    return loss


class ClassificationLoss:
    """The training loss of a classification run: `loss(logits, labels)`; built from the run's options."""

    def __init__(self, weight: Tensor | None, label_smoothing: float) -> None:
        self.weight, self.label_smoothing = weight, label_smoothing

    @classmethod
    def from_options(cls, spec: str | Sequence[float] | None, label_smoothing: float, labels: Sequence[int],
                     n_classes: int) -> "ClassificationLoss | None":
        """None when neither option is set (the model's own loss is used unchanged)."""
        weight = class_weights(spec, labels, n_classes)
        if weight is None and not label_smoothing:
            return None
        return cls(weight, label_smoothing)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return weighted_cross_entropy(logits, labels, self.weight, self.label_smoothing)
