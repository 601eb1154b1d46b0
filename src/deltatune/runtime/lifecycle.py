"""Putting deltas on a model and taking them off: attach, install (all-or-nothing), detach, unload."""
from __future__ import annotations

from torch import nn

from ..core.config import DeltaConfig
from .activation import apply_plan, set_active
from .build import Built, build_pieces, check_new_name
from .calls import install_call_hooks
from .weights import merge, names_of, slots, unmerge
from .slot import _hook, _pre_hook, ensure_slot, remove_slot, slot_of
from ..core.targeting import SLOT
from .state import DeltaRecord, drop_state, new_state, require_state, serialised, state_of
from .save_keys import sync_save_keys
from ..compose import without


@serialised
def install(model: nn.Module, name: str, cfg: DeltaConfig, built: Built, trainable: bool = True,
            activate: bool = True) -> nn.Module:
    """Put built pieces on the model as delta `name`; all-or-nothing."""
    check_new_name(model, name)
    fresh_state = state_of(model) is None
    st = state_of(model) or new_state(model, install_call_hooks(model))
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
            slot = ensure_slot(module, piece.layout, st)
            piece.train(module.training)
            for p in piece.parameters():
                p.requires_grad_(trainable)
            slot[name] = piece
            added.append(module)
            piece.install(model, module)  # mechanisms of their own (attention-position pieces' hooks)
            installed.append((module, piece))
        st.deltas[name] = DeltaRecord(name, cfg, [p for p, _, _ in built], trainable,
                                      {p: type(piece) for p, _, piece in built})
        st.refresh_keywords()
        set_active(model, name if activate else st.block)
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
        st.refresh_keywords()
        st.active, st.block = previous_active, previous_block
        for module in model.modules():
            slot = slot_of(module)
            if slot is not None:
                slot.internal.active = tuple(n for n in previous_active if n in slot)
                slot.set_plan(previous_block if slot.internal.active else None)
        if fresh_state:
            _restore_grads(model, st.base_requires_grad)
            drop_state(model)
        raise
    sync_save_keys(model)
    return model


@serialised
def attach(model: nn.Module, cfg: DeltaConfig, name: str = "default", *, activate: bool = True,
           trainable: bool = True) -> nn.Module:
    """Attach delta `name` configured by `cfg` to every targeted module; freezes the base. Returns `model`.

    With activate=True (default) the new delta becomes the only active one.
    """
    check_new_name(model, name)
    built = build_pieces(model, cfg)
    return install(model, name, cfg.for_model(model), built, trainable=trainable, activate=activate)


def _dequantize(model: nn.Module) -> None:
    """Replace every module with a read-only (quantised) weight by the dense module its layout gives, moving its slot
    (pieces, hooks) over. Merged deltas are unmerged first (restoring the stored weights exactly)."""
    from ..core.layouts import LinearLayout, layout_of
    from ..core.errors import TargetError

    def read_only(module: nn.Module):
        try:
            layout = layout_of(module, "?", ("Linear",))
        except TargetError:
            return None
        return layout if not layout.writable else None

    swaps = [(path, m, lay) for path, m in model.named_modules() if (lay := read_only(m)) is not None]
    if not swaps:
        return
    st = require_state(model)
    if st.merged:
        unmerge(model)
    dense = {path: lay.dense_module(m) for path, m, lay in swaps}  # built first: a failure changes nothing
    for path, module, _ in swaps:
        new = dense[path]
        slot = slot_of(module)
        if slot is not None:
            for handle in slot.internal.handles:
                handle.remove()
            del module._modules[SLOT]
            new.add_module(SLOT, slot)
            slot.internal.layout = LinearLayout()
            slot.internal.pristine = None
            for piece in slot.values():
                if piece.layout is not None and not piece.layout.writable:
                    piece.layout = LinearLayout()
            slot.internal.handles = (new.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                                     new.register_forward_hook(_hook, with_kwargs=True))
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def _restore_grads(model: nn.Module, flags: dict[str, bool]) -> None:
    for pname, p in model.named_parameters():
        if pname in flags:
            p.requires_grad_(flags[pname])


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every active delta into the weights and remove all deltas and hooks (peft's `merge_and_unload`)."""
    return unload(model, merge_active=True)


def _remove(model: nn.Module, name: str) -> None:
    st = require_state(model)
    block = without(st.block, name)
    for module, slot in list(slots(model, name)):
        slot[name].uninstall(model, module)
        del slot[name]
        if not len(slot):
            remove_slot(module)
    del st.deltas[name]
    st.refresh_keywords()
    apply_plan(model, block)
    if st.deltas:
        sync_save_keys(model)


@serialised
def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove delta `name` (unmerging it first if merged). The last detach restores the plain model."""
    st = require_state(model)
    names_of(model, name, ())
    if name in st.merged:
        unmerge(model, name)
    _remove(model, name)
    if not st.deltas:
        _restore_grads(model, st.base_requires_grad)
        drop_state(model)
        sync_save_keys(model)
    return model


@serialised
def unload(model: nn.Module, merge_active: bool = False, dequantize: bool = False) -> nn.Module:
    """Remove every delta and hook; the plain model again, same object. Deltas merged with `dt.merge` stay in the
    weights, as with peft's `merge_adapter()` then `unload()` (to get the base back, `dt.unmerge(model)` first). With
    merge_active=True every active delta is merged first and stays: peft's `merge_and_unload()`. With dequantize=True
    every module whose weight is not writable (a quantised linear) is first replaced by its full-precision equivalent
    (dequantised weight, same bias), so the active deltas merge exactly and the result is a full-precision model."""
    st = require_state(model)
    if dequantize:
        _dequantize(model)
    if merge_active:
        todo = [n for n in st.active if n not in st.merged]
        if todo:
            merge(model, todo)
    for name in list(st.deltas):
        _remove(model, name)
    _restore_grads(model, st.base_requires_grad)
    drop_state(model)
    sync_save_keys(model)
    return model
