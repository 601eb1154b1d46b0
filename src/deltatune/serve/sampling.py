"""Per-request sampling: greedy, or temperature / top-k / top-p with the request's own seeded generator (so a
request's tokens do not depend on what else is in the batch); stopping on max_tokens, EOS and stop strings."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0 and top_p 1 turn those filters off. `eos` None: the model's EOS ids;
    () : never stop on EOS. Stop strings need the engine's tokenizer; the text ends before the stop string."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"SamplingParams.max_tokens must be a whole number ≥ 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"SamplingParams.temperature must be ≥ 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"SamplingParams.top_k must be a whole number ≥ 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return g


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of logits [vocab]."""
    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum - sorted_scores.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
