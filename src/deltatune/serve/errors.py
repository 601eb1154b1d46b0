"""Errors of the serving engine (all in deltatune's hierarchy)."""
from __future__ import annotations

from ..core.errors import StateError


class SlotsBusyError(StateError):
    """Every device slot that could hold a delta is pinned by requests in flight."""
