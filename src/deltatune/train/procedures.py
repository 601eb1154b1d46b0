"""Training procedures made of runs of the training loop (e.g. LT-SFT's dense phase, selection, sparse phase).

A procedure registers a `check(cfg)` (run when the TrainConfig is built, before any model is loaded) and a
`run(cfg, model=, tokenizer=, splits=, prepare=)`; a training config selects one with
`procedure: {kind: NAME, ...options}`. The loop knows no procedure by name.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import ConfigError
from ..core.suggest import did_you_mean

#: modules that register the built-in procedures when first asked for
BUILTIN = ("deltatune.train.lt_sft",)


@dataclass(frozen=True)
class Procedure:
    name: str
    check: Callable[[Any], None]
    run: Callable[..., Any]


_PROCEDURES: dict[str, Procedure] = {}


def register_procedure(name: str, check: Callable[[Any], None], run: Callable[..., Any]) -> None:
    if name in _PROCEDURES and _PROCEDURES[name].run is not run:
        raise ConfigError(f"training procedure {name!r} is registered twice")
    _PROCEDURES[name] = Procedure(name, check, run)


def get_procedure(spec: Any) -> Procedure:
    """The procedure named by a `procedure:` mapping's `kind`, with a clear error for anything else."""
    for module in BUILTIN:
        importlib.import_module(module)
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ConfigError(f"procedure must be a mapping with a 'kind' (one of {sorted(_PROCEDURES)}), e.g. "
                          f"{{kind: lt_sft, density: 0.01}}; got {spec!r}")
    if spec["kind"] not in _PROCEDURES:
        raise ConfigError(f"unknown training procedure {spec['kind']!r}{did_you_mean(spec['kind'], _PROCEDURES)}; "
                          f"known: {sorted(_PROCEDURES)}")
    return _PROCEDURES[spec["kind"]]


def options(spec: dict[str, Any]) -> dict[str, Any]:
    """A `procedure:` mapping without its `kind`."""
    return {k: v for k, v in spec.items() if k != "kind"}
