"""LISA: layer-wise importance sampling — only a random subset of layers is trainable, resampled every K steps.

Applies to the delta parameters of the run: pieces outside numbered layers (embeddings, heads) always train.
"""
from __future__ import annotations

import random

from torch import nn

from ..runtime import slot_of
from ..core.targeting import layer_index
from .checkpoint import jsonable, untuple


class Lisa:
    def __init__(self, model: nn.Module, name: str, n_layers: int, interval: int, seed: int) -> None:
        self.model, self.n, self.interval = model, n_layers, interval
        self.rng = random.Random(seed)
        self.by_layer: dict[int | None, list[nn.Parameter]] = {}
        for path, module in model.named_modules():
            slot = slot_of(module)
            if slot is not None and name in slot:
                params = [p for p in slot[name].parameters()]
                self.by_layer.setdefault(layer_index(model, path), []).extend(params)
        self.layers = sorted(k for k in self.by_layer if k is not None)
        self.current: list[int] = []

    def step(self, step: int) -> None:
        """Resample at steps 0, K, 2K, ...; called before each optimizer step's forward."""
        if step % self.interval:
            return
        self.current = sorted(self.rng.sample(self.layers, min(self.n, len(self.layers))))
        for layer, params in self.by_layer.items():
            on = layer is None or layer in self.current
            for p in params:
                p.requires_grad_(on)

    def state(self) -> dict:
        return {"rng": jsonable(self.rng.getstate()), "current": self.current}

    def load_state(self, state: dict) -> None:
        self.rng.setstate(untuple(state["rng"]))
        self.current = list(state["current"])
        for layer, params in self.by_layer.items():
            for p in params:
                p.requires_grad_(layer is None or layer in self.current)

