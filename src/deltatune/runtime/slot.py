"""Hosts: a targeted module keeps its class, parameters and state_dict keys; its deltas live in a
`deltatune` ModuleDict on it and a forward hook adds their contributions to the module's output."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..compose import POSITIONS, Context, Node, leaves, run
from ..core.targeting import SLOT
from .state import overrides
from ..core.errors import TargetError
from ..core.layouts import Layout





@dataclass
class SlotState:
    """Everything the runtime keeps at one module besides the pieces: one object, so no delta name can collide with it
    (delta names are the slot's keys)."""

    layout: Layout | None
    active: tuple[str, ...] = ()
    plans: dict[str, Node] = field(default_factory=dict)  # the active composition at this module, per position
    input_plans: tuple = ()  # (argument, plan) pairs: the input plan split by the argument its pieces transform
    merged: list[str] = field(default_factory=list)
    saved_updates: dict[str, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # exact updates of merged
    # pieces that declare needs_base
    handles: tuple = ()
    #: the ModelState of the model this module belongs to: context-local compositions are keyed by its identity (a
    #: deep copy of the model gets a copy of both, so the copy's slots point at the copy's state)
    owner: Any = None
    generation: int = 0  # bumped whenever a piece is added or removed: cached per-context plans are then stale
    #: caches of composition blocks at this module, keyed by their owner (e.g. a block class), kept across activations;
    #: each owner checks its entry's validity itself
    cache: dict[Any, Any] = field(default_factory=dict)
    #: caches valid for the current activation only, cleared whenever the active composition changes
    plan_cache: dict[Any, Any] = field(default_factory=dict)
    #: a weight that is not writable (quantised): its exact stored state before the first merge, restored bit for bit
    #: when the last merged delta here is unmerged
    pristine: Any = None


class DeltaSlot(nn.ModuleDict):
    """Named pieces on one module (the keys are delta names); `internal` holds which of them are active and merged."""

    def __init__(self, layout: Layout | None) -> None:
        super().__init__()
        self.internal = SlotState(layout)

    @property
    def layout(self) -> Layout | None:
        return self.internal.layout

    def __setitem__(self, name: str, piece: nn.Module) -> None:
        super().__setitem__(name, piece)
        self.internal.generation += 1

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self.internal.generation += 1

    def set_plan(self, node: Node | None) -> None:
        """Restrict the model's active composition to the pieces of this module, position by position."""
        st = self.internal
        st.plans, st.input_plans = local_plans(self, node)
        st.plan_cache = {}

    def current(self) -> tuple[dict[str, Node], tuple, dict]:
        """(plans per position, input plans, block caches) that apply to this forward: the calling context's own
        composition when it set one (`dt.active`, `dt.route`, `deltas=`), else the model's."""
        ours = overrides()
        if ours:
            override = ours.get(id(self.internal.owner))
            if override is not None:
                got = override.per_slot.get(id(self))
                if got is None or got[3] != self.internal.generation:  # first use here, or pieces changed since
                    here = override.node if any(n in self for n in override.names) else None
                    got = override.per_slot[id(self)] = (*local_plans(self, here), {}, self.internal.generation)
                return got[:3]
        st = self.internal
        return st.plans, st.input_plans, st.plan_cache

    def merged_update(self, name: str, module: nn.Module) -> tuple[Tensor, Tensor | None]:
        """(ΔW [out, in], Δb) that merging `name` adds (or added) to the module."""
        if name in self.internal.saved_updates:
            return self.internal.saved_updates[name]
        dw, db = self[name].live_update(module)
        return dw.to_dense(), db

    @torch.no_grad()
    def merge_pieces(self, module: nn.Module, names: list[str], known: dict[str, tuple] | None = None) -> dict | None:
        """Add the updates of `names` to the weights. Every update is computed against the weights *without*
        any merged delta, so several merged deltas add up exactly as they do unmerged (W + ΔW₁ + ΔW₂). `known`:
        updates already computed against the current weights, used where those are the clean ones. Returns the
        rounding report of a weight that is not writable (quantised; see `_requantize`), else None."""
        st = self.internal
        if st.layout is not None and not st.layout.writable:
            return self._merge_stored(module, names, known)
        layout, w, bias = st.layout, module.weight, getattr(module, "bias", None)
        clean_w = clean_b = None
        if st.merged and any(self[n].needs_base for n in names):
            clean_w = layout.weight(module).detach().clone()
            clean_b = bias.detach().clone() if bias is not None else None
            for m in st.merged:
                dw, db = self.merged_update(m, module)
                clean_w -= dw.to(clean_w.dtype)
                if db is not None and clean_b is not None:
                    clean_b -= db.to(clean_b.dtype)
        updates = {}
        for n in names:
            dw, db = (known or {}).get(n) if clean_w is None and n in (known or {}) else \
                self[n].live_update(module, clean_w, clean_b)
            updates[n] = (dw.to_dense(), db)
        for n, (dw, db) in updates.items():
            w.add_(layout.to_native(dw).to(w.dtype))
            if db is not None:
                bias.add_(db.to(bias.dtype))
            if self[n].needs_base:
                st.saved_updates[n] = (dw, db)
            st.merged.append(n)

    def _requantize(self, module: nn.Module, clean: Tensor, names: list[str]) -> dict | None:
        """Store clean + the updates of `names` into a quantised weight: the rounding report {max_abs, relative,
        relative_to_update} of the stored weight against the exact sum (None when `names` is empty: the pristine
        state is restored exactly)."""
        if not names:
            return None
        total = torch.zeros_like(clean, dtype=torch.float32)
        for n in names:
            total += self.merged_update(n, module)[0].to(torch.float32)
        wanted = clean.to(torch.float32) + total
        err = self.internal.layout.store(module, wanted).to(torch.float32)
        norm = torch.linalg.vector_norm
        return {"max_abs": float(err.abs().max()), "relative": float(norm(err) / norm(wanted).clamp_min(1e-30)),
                "relative_to_update": float(norm(err) / norm(total).clamp_min(1e-30))}

    def _merge_stored(self, module: nn.Module, names: list[str], known: dict[str, tuple] | None) -> dict | None:
        """merge_pieces on a weight that is not writable: back to the pristine stored weight, dequantised, plus every
        merged update, requantised (lossy: the report says by how much)."""
        st = self.internal
        layout, bias = st.layout, getattr(module, "bias", None)
        if st.pristine is None:
            st.pristine = layout.snapshot(module)
        else:
            layout.restore(module, st.pristine)
        clean_w = layout.weight(module)
        clean_b = bias.detach().clone() if bias is not None else None
        if clean_b is not None:
            for m in st.merged:
                db = self.merged_update(m, module)[1]
                if db is not None:
                    clean_b -= db.to(clean_b.dtype)
        added = []
        try:
            for n in names:
                dw, db = (known or {}).get(n) if not st.merged and n in (known or {}) else \
                    self[n].live_update(module, clean_w, clean_b)
                if self[n].needs_base:
                    st.saved_updates[n] = (dw.to_dense(), db)
                if db is not None:
                    bias.add_(db.to(bias.dtype))
                st.merged.append(n)
                added.append(n)
            return self._requantize(module, clean_w, list(st.merged))
        except BaseException:
            for n in reversed(added):
                db = self.merged_update(n, module)[1]
                if db is not None:
                    bias.sub_(db.to(bias.dtype))
                st.saved_updates.pop(n, None)
                st.merged.remove(n)
            layout.restore(module, st.pristine)
            self._requantize(module, clean_w, list(st.merged))
            if not st.merged:
                st.pristine = None
            raise

    @torch.no_grad()
    def unmerge_piece(self, module: nn.Module, name: str) -> dict | None:
        """Subtract the update merging `name` added (any order is exact). On a weight that is not writable
        (quantised) the pristine stored weight is restored bit for bit, and the deltas still merged there are
        requantised into it again (lossy: returns that rounding report)."""
        st = self.internal
        if st.layout is not None and not st.layout.writable:
            db = self.merged_update(name, module)[1]
            if db is not None:
                module.bias.sub_(db.to(module.bias.dtype))
            rest = [m for m in st.merged if m != name]
            st.layout.restore(module, st.pristine)
            report = self._requantize(module, st.layout.weight(module), rest)
            st.saved_updates.pop(name, None)
            st.merged.remove(name)
            if not rest:
                st.pristine = None
            return report
        dw, db = self.merged_update(name, module)
        w = module.weight
        w.sub_(self.layout.to_native(dw).to(w.dtype))
        if db is not None:
            module.bias.sub_(db.to(module.bias.dtype))
        self.internal.saved_updates.pop(name, None)
        self.internal.merged.remove(name)
        return None


def local_plans(slot: DeltaSlot, node: Node | None) -> tuple[dict[str, Node], tuple]:
    """The composition `node` restricted to `slot`'s pieces, per position, and the input plan split by the argument
    its pieces transform."""
    plans: dict[str, Node] = {}
    if node is None:
        return plans, ()
    for pos in POSITIONS:
        local = node if isinstance(node, str) else node.restrict(lambda n, pos=pos: n in slot and slot[n].position == pos)
        if isinstance(local, str) and not (local in slot and slot[local].position == pos):
            local = None
        if local is not None:
            plans[pos] = local
    local = plans.get("input")
    if local is None:
        return plans, ()
    where = list(dict.fromkeys(slot[n].input_arg for n in leaves(local) if n in slot and slot[n].position == "input"))
    return plans, tuple((a, local if len(where) == 1 else local.restrict(  # type: ignore[union-attr]
        lambda n, a=a: n in slot and slot[n].position == "input" and slot[n].input_arg == a)) for a in where)


def reserved_name(name: str) -> bool:
    """True for names a delta cannot take because the slot (an nn.ModuleDict) already has such an attribute."""
    return name in _RESERVED


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _argument(module: nn.Module, args: tuple, kwargs: dict, where: int | str) -> int | str:
    """Where argument `where` (an index or a parameter name of module.forward) was passed: an index into args or a
    key of kwargs. Argument 0 passed by keyword is the first keyword argument."""
    if isinstance(where, int) and where < len(args):
        return where
    if where == 0 and kwargs:
        return next(iter(kwargs))
    names = list(inspect.signature(module.forward).parameters)
    name = where if isinstance(where, str) else names[where] if where < len(names) else None
    if name in kwargs:
        return name  # type: ignore[return-value]
    if name in names and names.index(name) < len(args):
        return names.index(name)
    raise TargetError(f"an input-position delta on a {type(module).__name__} transforms its argument {where!r}, which "
                      f"this call did not pass (forward{inspect.signature(module.forward)}); target modules whose "
                      f"forward receives that argument, or set the delta's input argument to one it receives")


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    slot: DeltaSlot = getattr(module, SLOT)
    plans, input_plans, cache = slot.current()
    if "input" not in plans:
        return None
    for where, plan in input_plans:
        key = _argument(module, args, kwargs, where)
        x = args[key] if isinstance(key, int) else kwargs[key]
        x = run(plan, x, Context(x, None, module, slot, "input", cache))
        args, kwargs = ((*args[:key], x, *args[key + 1:]), kwargs) if isinstance(key, int) else (args, {**kwargs, key: x})
    return args, kwargs


def _hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
    slot: DeltaSlot = getattr(module, SLOT)
    plans, _, cache = slot.current()
    if not plans:
        return output
    x = _first_input(args, kwargs)
    plan = plans.get("weight")
    if isinstance(plan, str):  # one weight delta: it may add into the base output directly
        if plan not in slot.internal.merged:
            output = slot[plan](x, output, output, module)
    elif plan is not None:
        in_place = plan.in_place and not torch.is_grad_enabled()
        output = plan.run(output if in_place else output.clone(), Context(x, output, module, slot, "weight", cache))
    plan = plans.get("output")
    if plan is not None:
        output = run(plan, output, Context(x, output, module, slot, "output", cache))
    return output


def slot_of(module: nn.Module) -> DeltaSlot | None:
    slot = module._modules.get(SLOT)
    return slot if isinstance(slot, DeltaSlot) else None


def ensure_slot(module: nn.Module, layout: Layout | None, owner: Any = None) -> DeltaSlot:
    slot = slot_of(module)
    if slot is None:
        slot = DeltaSlot(layout)
        slot.internal.owner = owner
        module.add_module(SLOT, slot)
        slot.internal.handles = (module.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                                 module.register_forward_hook(_hook, with_kwargs=True))
    elif slot.internal.layout is None and layout is not None:  # the first piece here had no weight view (an adapter)
        slot.internal.layout = layout
    return slot


def remove_slot(module: nn.Module) -> None:
    slot = slot_of(module)
    if slot is not None:
        for handle in slot.internal.handles:
            handle.remove()
        del module._modules[SLOT]


_RESERVED = frozenset(dir(DeltaSlot(None)))
