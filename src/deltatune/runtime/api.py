"""The public verbs: attach, detach, activate, active, merge, unmerge, unload, summary.

Every verb that changes the model first checks everything that can fail, then mutates; attach rolls back
if anything still goes wrong, so a failed call leaves every parameter and module as it was.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..compose.blocks import Arrow, Block, Fuse, Route, Node, additive_names, as_node, leaves, placements, without
from ..core.config import DeltaConfig
from ..core.errors import ConfigError, DeltaNameError, StateError, TargetError, UnsupportedError
from .slot import (DeltaRecord, DeltaSlot, drop_state, ensure_slot, ensure_state, remove_slot, slot_of, state_of, is_piece_module)
from ..core.piece import Piece
from ..core.targeting import matches, resolve_targets

Names = str | Sequence[str] | None


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise DeltaNameError(f"delta name must be a non-empty string without '.' or '/', got {name!r}")
    if hasattr(DeltaSlot, name) or name in ("layout", "active", "plans", "merged", "saved_updates", "handle"):
        raise DeltaNameError(f"delta name {name!r} is reserved (an attribute of deltatune's per-module slot); "
                             f"choose another name")
    st = state_of(model)
    if st is not None and name in st.deltas:
        raise DeltaNameError(f"a delta named {name!r} is already attached (attached: {sorted(st.deltas)}); "
                             f"detach it first or choose another name")


def build_pieces(model: nn.Module, cfg: DeltaConfig, paths: Sequence[str] | None = None) -> list[tuple[str, nn.Module, Piece]]:
    """Construct (without installing) one piece per target. Touches nothing on the model."""
    if not isinstance(cfg, DeltaConfig):
        raise ConfigError(f"expected a delta config such as dt.LoRA(...), got {type(cfg).__name__}")
    cfg = cfg.for_model(model)
    if paths is None and cfg.follows():
        st = state_of(model)
        missing = [n for n in cfg.follows() if st is None or n not in st.deltas]
        if missing:
            raise DeltaNameError(f"{type(cfg).__name__} goes on the modules of deltas {list(cfg.follows())}, but {missing} "
                                 f"are not attached; attach (or load) them first")
        wanted = {p for n in cfg.follows() for p in st.deltas[n].paths}
        paths = [p for p, _ in model.named_modules() if p in wanted]
    if paths is None:
        targets = resolve_targets(model, cfg)
        if cfg.modules_to_save:
            taken = {p for p, _ in targets}
            extra = [(p, m) for p, m in model.named_modules()
                     if p and p not in taken and not is_piece_module(p) and matches(tuple(cfg.modules_to_save), p)]
            if len(extra) < len(cfg.modules_to_save):
                raise TargetError(f"modules_to_save={cfg.modules_to_save!r} match {len(extra)} module(s) of "
                                  f"{type(model).__name__}; give the head's path, e.g. 'classifier' or 'score'")
            targets += extra
    else:
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules or is_piece_module(p)]
        if missing:
            raise TargetError(f"{len(missing)} module path(s) not found in {type(model).__name__}: {missing[:5]}; "
                              f"the delta was made for a different model")
        targets = [(p, modules[p]) for p in paths]
    built = []
    for path, module in targets:
        local = cfg.for_module(path)
        piece = local.piece_class(module)(module, path, local)
        weight = getattr(module, "weight", None)
        if weight is None:  # a block without a weight of its own (LlamaMLP): its first parameter's device
            weight = next(module.parameters(), None)
        if weight is not None:
            piece.to(device=weight.device)
        built.append((path, module, piece))
    groups: dict[type, list[Piece]] = {}
    for _, _, piece in built:
        groups.setdefault(type(piece), []).append(piece)
    for piece_cls, group in groups.items():  # pieces sharing state across modules connect (Piece.link)
        piece_cls.link(group)
    return built


def install(model: nn.Module, name: str, cfg: DeltaConfig, built: list[tuple[str, nn.Module, Piece]],
            trainable: bool = True, activate: bool = True) -> nn.Module:
    """Put built pieces on the model as delta `name`; all-or-nothing."""
    _check_new_name(model, name)
    fresh_state = state_of(model) is None
    st = ensure_state(model)
    previous_active, previous_block = st.active, st.block
    created, added, installed = [], [], []
    try:
        if fresh_state:
            for pname, p in model.named_parameters():
                st.base_requires_grad[pname] = p.requires_grad
                p.requires_grad_(False)
        for path, module, piece in built:
            if slot_of(module) is None:
                created.append(module)
            slot = ensure_slot(module, piece.layout)
            piece.train(module.training)
            for p in piece.parameters():
                p.requires_grad_(trainable)
            slot[name] = piece
            added.append(module)
            piece.install(model, module)  # mechanisms of their own (attention-position pieces' hooks)
            installed.append((module, piece))
        st.deltas[name] = DeltaRecord(name, cfg, [p for p, _, _ in built], trainable,
                                      tuple((p, piece.position, piece.mergeable, piece.routable) for p, _, piece in built))
        if activate:
            _set_active(model, name)
        else:
            _set_active(model, st.block)
    except BaseException:
        for module, piece in reversed(installed):
            piece.uninstall(model, module)
        for module in added:
            slot = slot_of(module)
            if slot is not None and name in slot:
                del slot[name]
        for module in created:
            remove_slot(module)
        st.deltas.pop(name, None)
        st.active, st.block = previous_active, previous_block
        for module in model.modules():
            slot = slot_of(module)
            if slot is not None:
                slot.active = tuple(n for n in previous_active if n in slot)
                slot.set_plan(previous_block if slot.active else None)
        if fresh_state:
            _restore_grads(model, st.base_requires_grad)
            drop_state(model)
        raise
    return model


def attach(model: nn.Module, cfg: DeltaConfig, name: str = "default", *, activate: bool = True,
           trainable: bool = True) -> nn.Module:
    """Attach delta `name` configured by `cfg` to every targeted module; freezes the base. Returns `model`.

    With activate=True (default) the new delta becomes the only active one.
    """
    _check_new_name(model, name)
    built = build_pieces(model, cfg)
    return install(model, name, cfg.for_model(model), built, trainable=trainable, activate=activate)


def _restore_grads(model: nn.Module, flags: dict[str, bool]) -> None:
    for pname, p in model.named_parameters():
        if pname in flags:
            p.requires_grad_(flags[pname])


def _state(model: nn.Module):
    st = state_of(model)
    if st is None:
        raise StateError(f"no delta is attached to this {type(model).__name__}; call dt.attach(model, cfg, name) first")
    return st


def _names(model: nn.Module, names: Names, default: Sequence[str]) -> list[str]:
    st = _state(model)
    if names is None:
        return list(default)
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in st.deltas]
    if unknown:
        raise DeltaNameError(f"unknown delta(s) {unknown}; attached: {sorted(st.deltas)}")
    return names


def _slots(model: nn.Module, name: str):
    modules = dict(model.named_modules())
    for path in _state(model).deltas[name].paths:
        module = modules[path]
        yield module, slot_of(module)


def _weight_conflict(model: nn.Module, active: Sequence[str], merged: Sequence[str]) -> str | None:
    """Where merged weights would change what an active delta computes: an unmerged weight-dependent piece (DoRA)
    seeing other deltas in its weight, or a merged piece of another position ((IA)3 rescaling an input or output)
    sharing its module with another active delta (merged, it no longer applies before or after that delta)."""
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


def _set_active(model: nn.Module, node: Node | Sequence[str] | None) -> None:
    st = _state(model)
    if node is not None and not isinstance(node, (str, Block)):
        node = as_node(node) if len(node) else None
    names = tuple(leaves(node)) if node is not None else ()
    mergeable_here = additive_names(node) if node is not None else set()
    if any(n not in mergeable_here for n in st.merged) or _weight_conflict(model, names, st.merged):
        # a merged delta that stops being active (or now sits under a block that scales or selects it) must leave
        # the weights too; unmerging all of them, newest first, is exact even for weight-dependent updates (DoRA);
        # those still active keep acting unmerged
        unmerge(model)
    _apply(model, node)


def _apply(model: nn.Module, node: Node | None) -> None:
    """Record `node` as the active composition and give every slot its local plan (no checks, no unmerging)."""
    st = _state(model)
    names = tuple(leaves(node)) if node is not None else ()
    st.active = names
    st.block = node
    for module in model.modules():
        slot = slot_of(module)
        if slot is not None:
            slot.active = tuple(n for n in names if n in slot)
            slot.set_plan(node if slot.active else None)


def _check_block(model: nn.Module, node: Node) -> None:
    """Everything about a composition that can be checked before it runs (names, nesting, positions)."""
    if isinstance(node, Block):
        node.check()
    names = leaves(node)
    _names(model, [n for n in names], ())
    if len(set(names)) != len(names):
        raise ConfigError(f"delta names repeat in {node!r}; each delta may appear once in a composition")
    records = _state(model).deltas
    for name, block in placements(node):
        for path, position, mergeable, routable in records[name].roles:
            if position not in block.positions:
                raise ConfigError(f"{type(block).__name__} is not defined for {position}-position deltas such as "
                                  f"{name!r} at {path!r} ({type(block).__name__} takes {', '.join(block.positions)}); "
                                  f"see docs/composition.md")
            if isinstance(block, Arrow) and not mergeable:
                raise ConfigError(f"Arrow routes by each delta's ΔW; {name!r} at {path!r} is not a weight update")
            if isinstance(block, Route) and not routable:
                raise ConfigError(f"{name!r} picks its own update per example ({path!r}), so Route cannot give it a subset "
                                  f"of the rows; activate it alone or in Sum/Stack")
    if isinstance(node, Block):
        for fuse in [b for b in _blocks(node) if isinstance(b, Fuse)]:
            _names(model, fuse.fusion, ())
            fused = _state(model).deltas[fuse.fusion].config.follows()
            stray = [n for n in fuse.children if n not in fused]
            if stray:
                raise ConfigError(f"Fuse over {stray}: fusion delta {fuse.fusion!r} was built over {list(fused)}; fuse those "
                                  f"(or a subset), or attach a dt.Fusion over these deltas")
            used = {p for n in fuse.children for p in _state(model).deltas[n].paths}
            missing = sorted(used - set(_state(model).deltas[fuse.fusion].paths))
            if missing:
                raise ConfigError(f"fusion delta {fuse.fusion!r} has no piece at {missing[:3]}, where the fused deltas "
                                  f"act; attach dt.Fusion(deltas=...) over these deltas")


def _blocks(node: Block) -> list[Block]:
    return [node, *[b for c in node.children if isinstance(c, Block) for b in _blocks(c)]]


def activate(model: nn.Module, names: Names | Block) -> nn.Module:
    """Make `names` the active composition: one name, a list of names (their Sum), a block (dt.Stack,
    dt.Average, dt.Fuse, dt.Route, dt.Arrow, nested), or None for the bare model.

    If a merged delta would become inactive, every merged delta is unmerged first (as PEFT does)."""
    if names is None:
        _state(model)
        _set_active(model, None)
        return model
    node = as_node(names)
    _check_block(model, node)
    _set_active(model, node)
    return model


def active_names(model: nn.Module) -> tuple[str, ...]:
    st = state_of(model)
    return st.active if st is not None else ()


def active_block(model: nn.Module) -> Node | None:
    """The active composition (a name or a block), None for the bare model."""
    st = state_of(model)
    return st.block if st is not None else None


@contextmanager
def active(model: nn.Module, names: Names | Block) -> Iterator[nn.Module]:
    """Temporarily activate `names` (anything `activate` takes); the previous composition is restored on exit."""
    previous = active_block(model)
    activate(model, names)
    try:
        yield model
    finally:
        st = state_of(model)
        if st is not None:  # deltas detached inside the block leave the restored composition too
            for gone in [n for n in (leaves(previous) if previous is not None else []) if n not in st.deltas]:
                previous = without(previous, gone)
            _set_active(model, previous)


@contextmanager
def route(model: nn.Module, rows: Sequence[str | None]) -> Iterator[nn.Module]:
    """Per-example deltas: row b of every batch run inside goes through delta rows[b] (None: the bare model), in
    forward and in generate (every decode step). The previous composition is restored on exit."""
    with active(model, Route(rows)):
        yield model


def merge(model: nn.Module, names: Names = None) -> nn.Module:
    """Add the weight updates of `names` (default: the active deltas; named ones must be active) into the base weights."""
    st = _state(model)
    names = _names(model, names, [n for n in st.active if n not in st.merged])
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
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        for module, slot in _slots(model, name):
            if not slot[name].mergeable:
                raise UnsupportedError(f"delta {name!r} at {slot[name].path!r} ({type(slot[name]).__name__}) is not a "
                                       f"weight update and cannot be merged; keep it unmerged")
            tied = owners.get(id(getattr(module, "weight", None)), [])
            if len(tied) > 1:
                raise UnsupportedError(f"delta {name!r} at {slot[name].path!r} cannot be merged: the weight is shared by "
                                       f"{tied} (tied embeddings), so merging would change those modules too; keep it "
                                       f"unmerged or untie the weights first")
            if getattr(module, "bias", None) is None and slot[name].delta_bias(module) is not None:
                raise UnsupportedError(f"delta {name!r} at {slot[name].path!r} changes the bias, but the module has no "
                                       f"bias parameter to merge it into; keep it unmerged")
    conflict = _weight_conflict(model, st.active, [*st.merged, *names])
    if conflict:
        raise StateError(f"cannot merge {names}: {conflict}; merge those deltas too, or deactivate them")
    per_module: dict[int, tuple[nn.Module, object, list[str]]] = {}
    for name in names:
        for module, slot in _slots(model, name):
            per_module.setdefault(id(module), (module, slot, []))[2].append(name)
    done: list[tuple[nn.Module, object, list[str]]] = []
    try:
        for module, slot, here in per_module.values():
            slot.merge_pieces(module, here)
            done.append((module, slot, here))
    except BaseException:
        for module, slot, here in reversed(done):  # all or nothing: take back what was already added
            for n in reversed(here):
                slot.unmerge_piece(module, n)
        raise
    st.merged.extend(names)
    return model


def unmerge(model: nn.Module, names: Names = None) -> nn.Module:
    """Subtract merged deltas (default: all, newest first) from the base weights again."""
    st = _state(model)
    names = _names(model, names, list(reversed(st.merged)))
    not_merged = [n for n in names if n not in st.merged]
    if not_merged:
        raise StateError(f"delta(s) {not_merged} are not merged (merged: {st.merged})")
    conflict = _weight_conflict(model, st.active, [m for m in st.merged if m not in names])
    if conflict:
        raise StateError(f"cannot unmerge only {names}: {conflict}; unmerge all merged deltas (dt.unmerge(model))")
    for name in names:
        for module, slot in _slots(model, name):
            slot.unmerge_piece(module, name)
        st.merged.remove(name)
    return model


def _remove(model: nn.Module, name: str) -> None:
    st = _state(model)
    block = without(st.block, name)
    for module, slot in list(_slots(model, name)):
        slot[name].uninstall(model, module)
        del slot[name]
        if not len(slot):
            remove_slot(module)
    del st.deltas[name]
    _apply(model, block)


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove delta `name` (unmerging it first if merged). The last detach restores the plain model."""
    st = _state(model)
    _names(model, name, ())
    if name in st.merged:
        unmerge(model, name)
    _remove(model, name)
    if not st.deltas:
        _restore_grads(model, st.base_requires_grad)
        drop_state(model)
    return model


def unload(model: nn.Module, merge_active: bool = False) -> nn.Module:
    """Remove every delta and hook. With merge_active=True the active deltas stay in the weights."""
    st = _state(model)
    if merge_active:
        todo = [n for n in st.active if n not in st.merged]
        if todo:
            merge(model, todo)
        drop = [n for n in reversed(st.merged) if n not in set(st.active)]
        if drop:
            unmerge(model, drop)
    elif st.merged:
        unmerge(model)
    for name in list(st.deltas):
        _remove(model, name)
    _restore_grads(model, st.base_requires_grad)
    drop_state(model)
    return model


@dataclass(frozen=True)
class SummaryRow:
    name: str
    kind: str
    modules: int
    params: int
    trainable: int
    active: bool
    merged: bool


@dataclass(frozen=True)
class Summary:
    rows: tuple[SummaryRow, ...]
    base_params: int

    def __str__(self) -> str:
        head = f"{'delta':<16}{'kind':<8}{'modules':>8}{'params':>12}{'trainable':>12}{'% of base':>10}  state"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            state = ("active" if r.active else "inactive") + (", merged" if r.merged else "")
            pct = 100.0 * r.params / max(self.base_params, 1)
            lines.append(f"{r.name:<16}{r.kind:<8}{r.modules:>8}{r.params:>12,}{r.trainable:>12,}{pct:>9.3f}%  {state}")
        lines.append(f"base model parameters: {self.base_params:,}")
        return "\n".join(lines)

    def __getitem__(self, name: str) -> SummaryRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise DeltaNameError(f"no delta {name!r} in summary; have {[r.name for r in self.rows]}")


def summary(model: nn.Module) -> Summary:
    """Parameters per delta (total and trainable) and the base model's parameter count."""
    st = state_of(model)
    piece_ids: set[int] = set()
    rows = []
    for name, rec in (st.deltas.items() if st else []):
        params = trainable = 0
        for _, slot in _slots(model, name):
            for p in slot[name].parameters():
                piece_ids.add(id(p))
                params += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        rows.append(SummaryRow(name, rec.config.kind, len(rec.paths), params, trainable, name in st.active, name in st.merged))
    base = sum(p.numel() for p in model.parameters() if id(p) not in piece_ids)
    return Summary(tuple(rows), base)
