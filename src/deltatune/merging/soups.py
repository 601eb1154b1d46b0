"""Greedy model soup (Wortsman et al. 2022, recipe "greedy soup") over any mergeable objects.

Candidates are ranked by their own held-out score; starting from the best, each next candidate joins the soup
when the soup with it scores at least as well as without it. What a candidate is does not matter: `combine`
turns a list of candidates into the merged object `evaluate` scores. The default combine is the uniform mean,
for tensors and for task-vector dicts {module path: Tensor}.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError, ShapeMismatchError
from ..core.progress import Progress


def uniform_mean(items: Sequence[Any]) -> Any:
    """The elementwise mean of tensors, or of dicts of tensors with the same keys and shapes (in float32)."""
    first = items[0]
    if isinstance(first, Tensor):
        return _mean([t for t in items], "candidate")
    if isinstance(first, Mapping):
        keys = list(first)
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or set(item) != set(keys):
                raise ShapeMismatchError(f"greedy_soup: candidate {i} does not have the same keys as candidate 0 "
                                         f"({len(keys)} module paths); soups need task vectors over the same modules")
        return {k: _mean([item[k] for item in items], repr(k)) for k in keys}
    raise ConfigError(f"greedy_soup: cannot average candidates of type {type(first).__name__}; pass combine= "
                      f"(a function from a list of candidates to the merged object)")


def _mean(tensors: list[Tensor], where: str) -> Tensor:
    if not all(isinstance(t, Tensor) for t in tensors) or len({tuple(t.shape) for t in tensors}) != 1:
        raise ShapeMismatchError(f"greedy_soup: the candidates' tensors at {where} are not tensors of one shape")
    return torch.stack([t.float() for t in tensors]).mean(0)


@dataclass
class Soup:
    """The result of `greedy_soup`: the merged object, which candidates it holds, and the scores seen."""

    merged: Any
    members: list[int]               # indices into the candidates, in the order they joined
    score: float                     # held-out score of `merged`
    individual_scores: list[float]   # held-out score of each candidate alone


def greedy_soup(candidates: Sequence[Any], evaluate: Callable[[Any], float],
                combine: Callable[[Sequence[Any]], Any] | None = None, progress: bool = True) -> Soup:
    """Wortsman's greedy soup; `evaluate(merged) -> float` is a held-out score where higher is better.

    Calls `evaluate` 2n − 1 times for n candidates: each candidate alone (as `combine([c])`), then each tried soup."""
    if len(candidates) == 0:
        raise ConfigError("greedy_soup: no candidates given")
    combine = uniform_mean if combine is None else combine
    with Progress(2 * len(candidates) - 1, enabled=progress, description="greedy soup") as bar:
        done = 0
        alone = []
        for c in candidates:
            alone.append(_score(evaluate, combine([c])))
            done += 1
            bar.update(done)
        order = sorted(range(len(candidates)), key=lambda i: -alone[i])  # stable: equal scores keep their order
        members = [order[0]]
        merged, best = combine([candidates[order[0]]]), alone[order[0]]
        for i in order[1:]:
            trial = combine([candidates[j] for j in members + [i]])
            score = _score(evaluate, trial)
            if score >= best:
                members.append(i)
                merged, best = trial, score
            done += 1
            bar.update(done, soup=len(members), score=best)
    return Soup(merged, members, best, alone)


def _score(evaluate: Callable[[Any], float], merged: Any) -> float:
    value = evaluate(merged)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"greedy_soup: evaluate must return a number (higher is better), got "
                          f"{type(value).__name__}") from None
    if value != value:
        raise ConfigError("greedy_soup: evaluate returned NaN; the held-out score must be a number")
    return value
