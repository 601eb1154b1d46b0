""""Did you mean ...?" for unknown names: options, config keys, method kinds, zoo names."""
from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["closest", "did_you_mean"]


def closest(name: Any, known: Iterable[str]) -> str | None:
    """The known name most like `name` (difflib's ratio, at least 0.6; a case-insensitive match first), or None."""
    if not isinstance(name, str):
        return None
    known = [k for k in known if isinstance(k, str)]
    folded = [k for k in known if k.lower() == name.lower() and k != name]
    if folded:
        return folded[0]
    found = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(name: Any, known: Iterable[str]) -> str:
    """" (did you mean 'lr'?)" for the closest known name, or "" when none is close."""
    match = closest(name, known)
    return f" (did you mean {match!r}?)" if match is not None else ""
