"""`save_pretrained` of a 🤗 transformers model with deltas attached writes the base only.

While deltas are attached, their state_dict keys (`<module>.deltatune.<name>.<tensor>`) are added to the model's own
`_keys_to_ignore_on_save`, the set transformers' `save_pretrained` (and so `Trainer` checkpoints) drops before
writing; detaching the last delta puts the model's own set back. The state_dict itself is unchanged. When a save
drops delta keys, a warning on the `deltatune` logger names the deltas and says how to save them (`dt.save`, or
`DeltaCallback` in a Trainer). Deltas merged with `dt.merge` are in the weights and so in the saved base.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

from torch import nn

from ..core.targeting import is_piece_module
from .state import state_of

log = logging.getLogger("deltatune")
ATTR = "_keys_to_ignore_on_save"


class DeltaKeys(set):
    """A model's `_keys_to_ignore_on_save` while deltas are attached: its own keys (`own`) and the deltas' keys.
    transformers' `save_pretrained` loops over it to drop those keys; that loop logs the warning unless `quiet` is
    True or, when it is a function, returns True at that moment (e.g. `DeltaCallback`: "a Trainer checkpoint is being
    written", whose deltas the callback saves)."""

    def __init__(self, keys: Iterable[str] = (), own: Iterable[str] = (), names: Iterable[str] = (),
                 quiet: bool | Callable[[], bool] = False) -> None:
        super().__init__(keys)
        self.own, self.names, self.quiet = frozenset(own), tuple(names), quiet

    def __iter__(self) -> Iterator[str]:
        if self.names and not (self.quiet() if callable(self.quiet) else self.quiet):
            log.warning("save_pretrained writes the base model only: the attached deltas %s are not saved with it "
                        "(deltas merged with dt.merge are in the weights). Save them with dt.save(model, DIR, name) "
                        "(in a transformers Trainer: callbacks=[dt.DeltaCallback()]) and restore the model with "
                        "from_pretrained(...) then dt.load(model, DIR).", ", ".join(map(repr, self.names)))
        return super().__iter__()

    def __reduce__(self):  # copy / deepcopy / pickle without iterating in Python (which would warn)
        quiet = self.quiet if isinstance(self.quiet, bool) else False  # a copy is not the model a Trainer saves
        return type(self), (frozenset(self), self.own, self.names, quiet)


def is_hf_model(model: nn.Module) -> bool:
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, ATTR)


def sync_save_keys(model: nn.Module) -> None:
    """Make `model._keys_to_ignore_on_save` its own keys plus the attached deltas' keys (its own alone when no delta
    is attached). A no-op for models that are not transformers models."""
    if not is_hf_model(model):
        return
    current = getattr(model, ATTR)
    own = current.own if isinstance(current, DeltaKeys) else frozenset(current or ())
    st = state_of(model)
    names = tuple(st.deltas) if st is not None else ()
    if not names:
        setattr(model, ATTR, set(own))
        return
    keys = [k for k in model.state_dict(keep_vars=True) if is_piece_module(k)]
    quiet = current.quiet if isinstance(current, DeltaKeys) else False
    setattr(model, ATTR, DeltaKeys([*own, *keys], own, names, quiet))


def quiet_save_warning(model: nn.Module, quiet: bool | Callable[[], bool] = True) -> None:
    """Silence (or restore) the warning of `save_pretrained` about unsaved deltas, while the deltas are saved
    another way: `quiet` is a bool, or a function asked at each save (silent when it returns True)."""
    keys = getattr(model, ATTR, None)
    if isinstance(keys, DeltaKeys):
        keys.quiet = quiet
