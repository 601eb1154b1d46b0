"""DeltaCallback: the pieces' per-step hooks (SpIEL drop/regrow, ...) inside an HF `transformers.Trainer`."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from ..runtime.step_hooks import after_optimizer_step, before_step


class DeltaCallback(TrainerCallback):
    """`Trainer(..., callbacks=[DeltaCallback()])`: calls every trained piece's `before_step` at each step's
    start and `after_optimizer_step` with the Trainer's optimizer at its end. `names` limits it to some deltas
    (default: every trainable attached delta)."""

    def __init__(self, names: Iterable[str] | None = None) -> None:
        self.names = None if names is None else list(names)

    @staticmethod
    def _total(state: Any) -> int | None:
        return state.max_steps if getattr(state, "max_steps", 0) and state.max_steps > 0 else None

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            before_step(model, state.global_step, self._total(state), self.names)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if model is not None:
            after_optimizer_step(model, optimizer, state.global_step, self._total(state), self.names)
