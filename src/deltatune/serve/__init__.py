"""Serving many deltas over one frozen base: a delta pool (disk, host LRU, device slots), per-token routing of
low-rank updates, continuous batching with per-request sampling (docs/serving.md)."""
from .engine import Engine
from .errors import SlotsBusyError
from .pool import DeltaPool, Registered
from .sampling import SamplingParams
from .scheduler import Request

__all__ = ["Engine", "DeltaPool", "Registered", "Request", "SamplingParams", "SlotsBusyError"]
