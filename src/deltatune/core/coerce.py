"""Typed values from what users write: ``"1e-4"``, ``"8"``, ``8.0``, ``"false"`` as the declared float, int, bool.

YAML 1.1 reads ``1e-4`` as a *string* (a float needs a dot: ``1.0e-4``), ``--set key=value`` values are YAML, and
JSON files may quote numbers. Every option deltatune takes is checked by one schema (core/schema.py); its leaf
checks call `coerce` first, so training options, delta configs, merge-method parameters and recipe fields all accept
the same spellings. The conversion table is pydantic's lax mode (https://docs.pydantic.dev/latest/concepts/conversion_table/):
``"1e-4"``, ``" 0.0001 "`` and ``1e-4`` are the same float; ``"8"`` and ``8.0`` the int 8 (``8.5`` is not an int);
``"false"``, ``"no"``, ``"off"``, ``"0"``, ``0`` are False and ``"true"``, ``"yes"``, ``"on"``, ``"1"``, ``1`` True.
Two rules are ours: a boolean never becomes a number (``r: true`` is refused, not 1), and a value already of an
accepted type is kept as given (an int in a float field stays an int, so configs round-trip through JSON unchanged).

A value that cannot be converted is returned unchanged; the schema then refuses it in its one message style,
naming the option, the value and what was expected (``TrainConfig.lr must be a positive number, got 'abc'``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["coerce"]

_ADAPTERS: dict[type, Any] = {}


def coerce(tp: type, value: Any) -> Any:
    """`value` converted to `tp` (bool, int or float) by pydantic's lax rules, or `value` itself when it already is
    one (an int for a float), is a boolean given for a number, or cannot be converted."""
    if tp is bool:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return value
    elif tp is int:
        if isinstance(value, bool) or isinstance(value, int) or not isinstance(value, (str, float)):
            return value
    elif tp is float:
        if isinstance(value, bool) or isinstance(value, (int, float)) or not isinstance(value, str):
            return value
    else:
        raise TypeError(f"coerce converts to bool, int or float, not {tp!r}")
    from pydantic import TypeAdapter, ValidationError  # imported only when a value needs converting

    adapter = _ADAPTERS.get(tp)
    if adapter is None:
        adapter = _ADAPTERS[tp] = TypeAdapter(tp)
    try:
        return adapter.validate_python(value, strict=False)
    except ValidationError:
        return value
