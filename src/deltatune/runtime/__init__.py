"""The runtime: deltas on a live model — slots and hooks, attach/detach, activation, merging, per-call keywords."""
from .activation import activate, active, active_block, active_names, route
from .lifecycle import attach, detach, install, merge_and_unload, unload
from .build import build_pieces, check_new_name
from .weights import merge, rounding_report, unmerge
from .slot import DeltaSlot, slot_of
from .state import DeltaRecord, ModelState, state_of
from .report import Summary, SummaryRow, summary

__all__ = ["DeltaRecord", "DeltaSlot", "ModelState", "Summary", "SummaryRow", "activate", "active", "active_block",
           "active_names", "attach", "build_pieces", "check_new_name", "detach", "install", "merge", "merge_and_unload",
           "rounding_report", "route", "slot_of",
           "state_of", "summary", "unload", "unmerge"]
