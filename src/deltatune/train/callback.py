"""DeltaCallback: deltas inside an unmodified HF `transformers.Trainer` — the pieces' per-step hooks (SpIEL
drop/regrow, AdaLoRA budgets, ...), the deltas written into every checkpoint, and restored when resuming."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..core.errors import DeltaNotFoundError
from ..io.files import restore, save
from ..runtime import state_of
from ..runtime.save_keys import quiet_save_warning
from ..runtime.step_hooks import after_optimizer_step, before_step

#: the folder of a Trainer checkpoint (`checkpoint-N/`) that holds the deltas, one native delta directory per name
SUBDIR = "deltatune"


class DeltaCallback(TrainerCallback):
    """`Trainer(..., callbacks=[dt.DeltaCallback()])`.

    * Calls every trained piece's `before_step` at each step's start and `after_optimizer_step` with the Trainer's
      optimizer at its end.
    * With `save=True` (default), writes every attached delta (or those in `names`) with `dt.save` into each
      checkpoint, `checkpoint-N/deltatune/<name>/`, since the checkpoint's `model.safetensors` holds the base only
      (`save_pretrained` leaves the deltas out).
    * When the Trainer resumes (`trainer.train(resume_from_checkpoint=...)`), loads those tensors back into the
      attached deltas in place (the optimizer keeps its parameters), from `checkpoint-<step>/deltatune/` under
      `args.output_dir`, or under `resume_from` when given (a checkpoint directory elsewhere).

    `names` limits it to some deltas (default: every attached delta; the step hooks: every trainable one)."""

    def __init__(self, names: Iterable[str] | None = None, save: bool = True,
                 resume_from: str | Path | None = None) -> None:
        self.names = None if names is None else list(names)
        self.save = save
        self.resume_from = None if resume_from is None else Path(resume_from)

    @staticmethod
    def _total(state: Any) -> int | None:
        return state.max_steps if getattr(state, "max_steps", 0) and state.max_steps > 0 else None

    def _deltas(self, model: Any) -> list[str]:
        st = state_of(model)
        attached = list(st.deltas) if st is not None else []
        return attached if self.names is None else [n for n in self.names if n in attached]

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        if self.save:
            quiet_save_warning(model)  # the checkpoints get the deltas from on_save
        if state.global_step > 0:  # resuming: the Trainer loaded the base and the optimizer, the deltas are ours
            ckpt = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            names = self._deltas(model)
            missing = [n for n in names if not (ckpt / SUBDIR / n).is_dir()]
            if missing:
                raise DeltaNotFoundError(f"resuming at step {state.global_step}: {ckpt / SUBDIR} has no saved delta "
                                         f"{missing} (written by DeltaCallback at each checkpoint); for a checkpoint "
                                         f"outside output_dir pass DeltaCallback(resume_from=that directory)")
            for n in names:
                restore(model, ckpt / SUBDIR / n, n)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None:
            before_step(model, state.global_step, self._total(state), self.names)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:
        if model is not None:
            after_optimizer_step(model, optimizer, state.global_step, self._total(state), self.names)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or not self.save or not args.should_save:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        for n in self._deltas(model):
            save(model, ckpt / SUBDIR / n, n)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self.save:
            quiet_save_warning(model, False)
