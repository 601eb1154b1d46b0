"""DeltaCallback: deltas inside an unmodified HF `transformers.Trainer` — the pieces' per-step hooks (SpIEL
drop/regrow, AdaLoRA budgets, ...), the deltas written into every checkpoint, restored when resuming and, with
`load_best_model_at_end`, taken from the best checkpoint like the base."""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..core.errors import DeltaNameError, DeltaNotFoundError, UnsupportedError
from ..io.files import restore, save
from ..runtime import state_of
from ..runtime.save_keys import quiet_save_warning
from ..runtime.step_hooks import after_optimizer_step, before_step

#: the folder of a Trainer checkpoint (`checkpoint-N/`) that holds the deltas, one native delta directory per name
SUBDIR = "deltatune"
#: the Trainer methods that write a checkpoint (`model.save_pretrained` inside them); DeltaCallback.on_save follows
_CHECKPOINT_SAVES = frozenset({"_save_checkpoint"})


class DeltaCallback(TrainerCallback):
    """`Trainer(..., callbacks=[dt.DeltaCallback()])`.

    * Calls every trained piece's `before_step` at each step's start and `after_optimizer_step` with the Trainer's
      optimizer at its end.
    * With `save=True` (default), writes every attached delta (or those in `names`) with `dt.save` into each
      checkpoint, `checkpoint-N/deltatune/<name>/`, since the checkpoint's `model.safetensors` holds the base only
      (`save_pretrained` leaves the deltas out; its warning about that is silenced for the Trainer's checkpoint saves
      only).
    * When the Trainer resumes (`trainer.train(resume_from_checkpoint=...)`), loads those tensors back into the
      attached deltas in place (the optimizer keeps its parameters), from `checkpoint-<step>/deltatune/` under
      `args.output_dir`, or under `resume_from` when given (a checkpoint directory elsewhere).
    * With `load_best_model_at_end=True`, after the Trainer reloads the best checkpoint's base, loads that
      checkpoint's deltas too, so the final model is the best one, not the best base with the last deltas.

    `names` limits it to some deltas (default: every attached delta; the step hooks: every trainable one); a name
    that is not attached is refused. `Trainer.hyperparameter_search` (checkpoints under per-trial folders) is not
    supported with `save=True`."""

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
        if self.names is None:
            return attached
        missing = [n for n in self.names if n not in attached]
        if missing:
            raise DeltaNameError(f"DeltaCallback(names={self.names}): {missing} not attached to the model "
                                 f"(attached: {sorted(attached)})")
        return list(self.names)

    def _trainer_is_saving(self) -> bool:
        """Whether the current call comes from a checkpoint save of a Trainer that has this callback (whose
        on_save then writes the deltas)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name in _CHECKPOINT_SAVES:
                handler = getattr(frame.f_locals.get("self"), "callback_handler", None)
                if any(cb is self for cb in getattr(handler, "callbacks", ())):
                    return True
            frame = frame.f_back
        return False

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        names = self._deltas(model)
        if self.save and getattr(state, "is_hyper_param_search", False):
            raise UnsupportedError("DeltaCallback(save=True) under Trainer.hyperparameter_search: the trials write "
                                   "their checkpoints to per-trial folders the callback cannot see; pass "
                                   "DeltaCallback(save=False) and save the deltas with dt.save after each trial")
        if state.global_step > 0:  # resuming: the Trainer loaded the base and the optimizer, the deltas are ours
            ckpt = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
            missing = [n for n in names if not (ckpt / SUBDIR / n).is_dir()]
            if missing:
                raise DeltaNotFoundError(f"resuming at step {state.global_step}: {ckpt / SUBDIR} has no saved delta "
                                         f"{missing} (written by DeltaCallback at each checkpoint); for a checkpoint "
                                         f"outside output_dir pass DeltaCallback(resume_from=that directory)")
            for n in names:
                restore(model, ckpt / SUBDIR / n, n)
        if self.save:  # asked at each save_pretrained: silent only inside this Trainer's checkpoint saves
            quiet_save_warning(model, self._trainer_is_saving)

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
        if model is None or not self.save:
            return
        quiet_save_warning(model, False)
        best = getattr(state, "best_model_checkpoint", None)
        if getattr(args, "load_best_model_at_end", False) and best:  # the Trainer has just reloaded its base
            names = self._deltas(model)
            missing = [n for n in names if not (Path(best) / SUBDIR / n).is_dir()]
            if missing:
                raise DeltaNotFoundError(f"load_best_model_at_end: the best checkpoint {best} has no saved delta "
                                         f"{missing}, so the model holds its base with the last step's deltas")
            for n in names:
                restore(model, Path(best) / SUBDIR / n, n)
