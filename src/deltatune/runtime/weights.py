"""Merging active deltas into the base weights and taking them out again, exactly and all-or-nothing."""
from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from ..compose import additive_names
from ..core.errors import DeltaNameError, RoundingWarning, StateError, UnsupportedError
from .slot import slot_of
from .state import overrides, require_state, serialised

Names = str | Sequence[str] | None


def names_of(model: nn.Module, names: Names, default: Sequence[str]) -> list[str]:
    """`names` as a list of attached delta names (default when None); DeltaNameError for unknown ones."""
    st = require_state(model)
    if names is None:
        return list(default)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in st.deltas]
    if unknown:
        raise DeltaNameError(f"unknown delta(s) {unknown}; attached: {sorted(st.deltas)}")
    return names


def slots(model: nn.Module, name: str):
    """(module, slot) for every module that carries delta `name`."""
    modules = dict(model.named_modules())
    for path in require_state(model).deltas[name].paths:
        module = modules[path]
        yield module, slot_of(module)


def weight_conflict(model: nn.Module, active: Sequence[str], merged: Sequence[str]) -> str | None:
    """Where merged weights would change what an active delta computes: an unmerged piece whose update needs the base
    (DoRA) seeing other deltas in its weight, or a merged piece of another position ((IA)3 rescaling an input or
    output) sharing its module with another active delta (merged, it no longer applies before or after that delta)."""
    if not merged:  # the common case (every activation, every per-call route): nothing to walk
        return None
    for module in model.modules():
        slot = slot_of(module)
        if slot is None:
            continue
        here = [m for m in merged if m in slot]
        running = [n for n in active if n in slot and n not in merged and slot[n].needs_base]
        if here and running:
            return (f"at {slot[running[0]].path!r}, active delta(s) {running} compute their update from the weight, "
                    f"which would then include merged delta(s) {here}")
        moved = [m for m in here if slot[m].position != "weight"]
        others = [n for n in active if n in slot and n not in moved[:1]]
        if moved and others:
            return (f"at {slot[moved[0]].path!r}, merged delta {moved[0]!r} rescales the module's {slot[moved[0]].position}, "
                    f"which active delta(s) {others} would then no longer see in the right order")
    return None


@serialised
def merge(model: nn.Module, names: Names = None) -> nn.Module:
    """Add the weight updates of `names` (default: the active deltas; named ones must be active) into the base weights."""
    st = require_state(model)
    if id(st) in overrides():
        raise StateError("dt.merge changes the weights every thread shares, so it cannot follow a temporary "
                         "composition (`dt.active`, `dt.route`, `deltas=`); call it outside, after dt.activate")
    names = names_of(model, names, [n for n in st.active if n not in st.merged])
    if not names:
        raise StateError("nothing to merge: no active, unmerged delta; pass names=")
    again = [n for n in names if n in st.merged]
    if again:
        raise StateError(f"delta(s) {again} are already merged; unmerge first")
    scaled = [n for n in names if n in st.active and n not in additive_names(st.block)]
    if scaled:
        raise StateError(f"delta(s) {scaled} sit under {st.block!r}, which scales or selects them per example; only "
                         f"deltas that act in full (a plain name, Sum or Stack) can be merged")
    inactive = [n for n in names if n not in st.active]
    if inactive:
        raise StateError(f"delta(s) {inactive} are not active (active: {list(st.active)}); a merged delta acts on every "
                         f"forward, so activate it first, e.g. dt.activate(model, {[*st.active, *inactive]!r})")
    known: dict[tuple[int, str], tuple] = {}  # updates computed by the checks, reused by the merge
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        for module, slot in slots(model, name):
            piece = slot[name]
            if not piece.mergeable:
                raise UnsupportedError(f"delta {name!r} at {piece.path!r} ({type(piece).__name__}) is not a "
                                       f"weight update and cannot be merged; keep it unmerged")
            tied = owners.get(id(getattr(module, "weight", None)), [])
            if len(tied) > 1:
                raise UnsupportedError(f"delta {name!r} at {piece.path!r} cannot be merged: the weight is shared by "
                                       f"{tied} (tied embeddings), so merging would change those modules too; keep it "
                                       f"unmerged or untie the weights first")
            if getattr(module, "bias", None) is None and \
                    known.setdefault((id(module), name), piece.live_update(module))[1] is not None:
                raise UnsupportedError(f"delta {name!r} at {piece.path!r} changes the bias, but the module has no "
                                       f"bias parameter to merge it into; keep it unmerged")
    conflict = weight_conflict(model, st.active, [*st.merged, *names])
    if conflict:
        raise StateError(f"cannot merge {names}: {conflict}; merge those deltas too, or deactivate them")
    per_module: dict[int, tuple[nn.Module, object, list[str]]] = {}
    for name in names:
        for module, slot in slots(model, name):
            per_module.setdefault(id(module), (module, slot, []))[2].append(name)
    done: list[tuple[nn.Module, object, list[str]]] = []
    rounding: dict[str, dict[str, float]] = {}
    try:
        for module, slot, here in per_module.values():
            report = slot.merge_pieces(module, here, {n: known[(id(module), n)] for n in here if (id(module), n) in known})
            done.append((module, slot, here))
            if report is not None:
                rounding[slot[here[0]].path] = report
    except BaseException:
        for module, slot, here in reversed(done):  # all or nothing: take back what was already added
            for n in reversed(here):
                slot.unmerge_piece(module, n)
        raise
    st.merged.extend(names)
    _report_rounding(st, rounding, "merging")
    return model


def _report_rounding(st, rounding: dict[str, dict[str, float]], verb: str) -> None:
    """Keep the rounding report of requantised weights on the model state (`state.rounding`) and warn with it."""
    st.rounding = rounding
    if rounding:
        worst = max(rounding.values(), key=lambda r: r["relative"])
        warnings.warn(RoundingWarning(
            f"{verb} requantised {len(rounding)} quantised weight(s): rounding error max |ΔW| = "
            f"{max(r['max_abs'] for r in rounding.values()):.3g}, worst relative ‖err‖/‖W‖ = {worst['relative']:.3g} "
            f"(‖err‖/‖ΔW‖ = {worst['relative_to_update']:.3g}); per module: the warning's .report and "
            f"dt.rounding_report(model)", rounding), stacklevel=4)


def rounding_report(model: nn.Module) -> dict[str, dict[str, float]]:
    """The rounding the last dt.merge / dt.unmerge introduced into quantised weights, per module path:
    {"max_abs", "relative" (‖stored − exact‖/‖exact‖), "relative_to_update" (‖stored − exact‖/‖merged ΔW‖)}.
    Empty when no quantised weight was requantised (unmerging the last delta of a module restores it exactly)."""
    return dict(require_state(model).rounding)


@serialised
def unmerge(model: nn.Module, names: Names = None) -> nn.Module:
    """Subtract merged deltas (default: all, newest first) from the base weights again."""
    st = require_state(model)
    names = names_of(model, names, list(reversed(st.merged)))
    not_merged = [n for n in names if n not in st.merged]
    if not_merged:
        raise StateError(f"delta(s) {not_merged} are not merged (merged: {st.merged})")
    conflict = weight_conflict(model, st.active, [m for m in st.merged if m not in names])
    if conflict:
        raise StateError(f"cannot unmerge only {names}: {conflict}; unmerge all merged deltas (dt.unmerge(model))")
    rounding: dict[str, dict[str, float]] = {}
    for name in names:
        for module, slot in slots(model, name):
            report = slot.unmerge_piece(module, name)
            if report is not None:
                rounding[slot[name].path] = report
            else:
                rounding.pop(slot[name].path, None)
        st.merged.remove(name)
    _report_rounding(st, rounding, "unmerging")
    return model
