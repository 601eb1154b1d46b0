"""The registry of PEFT kinds: each of peft's adapter types that deltatune maps contributes one `PeftKind` — peft's
`peft_type`, the config classes it writes, its reader and writer and the config keys it knows. The generic codec
(`codec.py`) names no kind: it looks the kind up here by the file's `peft_type` (reading) or the delta's config
class (writing), and refuses anything else by name, listing the kinds that have a mapping."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...core.errors import ConfigError, UnsupportedError
from ...core.parsing import short

if TYPE_CHECKING:
    from torch import Tensor

    from ..delta import Delta
    from .codec import PeftFile


@dataclass(frozen=True)
class PeftKind:
    """One peft adapter type and its mapping onto a deltatune method.

    `read(file)` turns a `PeftFile` (config, tensors with the model prefix removed) into a Delta, taking the tensors
    it understands off the file (whatever is left must be a `modules_to_save` module, else the file is refused).
    `write(delta, paths, where)` gives (tensors by their full peft key, config fields) for the modules at `paths`
    (the delta's modules that are not kept whole). `fields` are the config keys the kind reads or knows to be
    harmless; `refuse` the keys that, set to anything but null/false/empty, make peft compute something the
    mapping cannot represent (field -> what it is); `check(cfg, where)` any further refusal."""

    peft_type: str
    configs: tuple[type, ...]
    read: Callable[["PeftFile"], "Delta"]
    write: Callable[["Delta", list[str], str], tuple[dict[str, "Tensor"], dict[str, Any]]]
    fields: frozenset[str] = frozenset()
    refuse: dict[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any], str], None] | None = None
    description: str = ""
    #: what peft puts before module paths in its keys: the wrapped model's ("base_model.model.") for tuner layers,
    #: "base_model." for prompt learning (whose PeftModel wraps the model directly)
    prefix: str = "base_model.model."


_KINDS: dict[str, PeftKind] = {}


def register_kind(kind: PeftKind) -> PeftKind:
    if kind.peft_type in _KINDS and _KINDS[kind.peft_type] is not kind:
        raise ConfigError(f"PEFT kind {kind.peft_type!r} is registered twice")
    _KINDS[kind.peft_type] = kind
    return kind


def peft_types() -> tuple[str, ...]:
    """peft's adapter types that have a mapping, sorted."""
    return tuple(sorted(_KINDS))


def kinds() -> dict[str, PeftKind]:
    return dict(_KINDS)


def kind_of_type(peft_type: Any, where: str) -> PeftKind:
    if isinstance(peft_type, str) and peft_type in _KINDS:
        return _KINDS[peft_type]
    raise UnsupportedError(f"{where} is a PEFT adapter of peft_type={short(peft_type)}, which has no deltatune mapping; "
                           f"PEFT types with one: {', '.join(peft_types())}")


def kind_of_config(config: Any, name: str) -> PeftKind:
    for kind in _KINDS.values():
        if type(config) in kind.configs:
            return kind
    mapped = sorted({c.kind for k in _KINDS.values() for c in k.configs})
    raise UnsupportedError(f"delta {name!r} is a {getattr(config, 'kind', type(config).__name__)!r} delta, which has no "
                           f"PEFT mapping (kinds with one: {', '.join(mapped)}); save it with format='native'")
