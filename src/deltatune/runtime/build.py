"""Naming and building: a delta's pieces constructed for a model, nothing on the model changed yet."""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, DeltaNameError, TargetError
from ..core.piece import Piece
from ..core.targeting import is_piece_module, matches, resolve_targets
from .slot import reserved_name
from .state import state_of

Built = list[tuple[str, nn.Module, Piece]]


def check_new_name(model: nn.Module, name: str) -> None:
    """DeltaNameError unless `name` can be attached to `model`: a non-empty string without '.' or '/', not an
    attribute of the per-module slot, not attached already."""
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise DeltaNameError(f"delta name must be a non-empty string without '.' or '/', got {name!r}")
    if reserved_name(name):
        raise DeltaNameError(f"delta name {name!r} is reserved (an attribute of deltatune's per-module slot); "
                             f"choose another name")
    st = state_of(model)
    if st is not None and name in st.deltas:
        raise DeltaNameError(f"a delta named {name!r} is already attached (attached: {sorted(st.deltas)}); "
                             f"detach it first or choose another name")


def _targets(model: nn.Module, cfg: DeltaConfig, paths: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    if paths is None and cfg.follows():
        st = state_of(model)
        missing = [n for n in cfg.follows() if st is None or n not in st.deltas]
        if missing:
            raise DeltaNameError(f"{type(cfg).__name__} goes on the modules of deltas {list(cfg.follows())}, but {missing} "
                                 f"are not attached; attach (or load) them first")
        wanted = {p for n in cfg.follows() for p in st.deltas[n].paths}
        paths = [p for p, _ in model.named_modules() if p in wanted]
    if paths is not None:
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules or is_piece_module(p)]
        if missing:
            raise TargetError(f"{len(missing)} module path(s) not found in {type(model).__name__}: {missing[:5]}; "
                              f"the delta was made for a different model")
        return [(p, modules[p]) for p in paths]
    targets = resolve_targets(model, cfg)
    if cfg.modules_to_save:
        taken = {p for p, _ in targets}
        extra = [(p, m) for p, m in model.named_modules()
                 if p and p not in taken and not is_piece_module(p) and matches(tuple(cfg.modules_to_save), p)]
        if len(extra) < len(cfg.modules_to_save):
            raise TargetError(f"modules_to_save={cfg.modules_to_save!r} match {len(extra)} module(s) of "
                              f"{type(model).__name__}; give the head's path, e.g. 'classifier' or 'score'")
        targets += extra
    return targets


def build_pieces(model: nn.Module, cfg: DeltaConfig, paths: Sequence[str] | None = None) -> Built:
    """Construct (without installing) one piece per target: `cfg.for_module(path)` picks each module's config (a
    whole-module config for `modules_to_save` paths), its `piece_class` the piece. Touches nothing on the model."""
    if not isinstance(cfg, DeltaConfig):
        raise ConfigError(f"expected a delta config such as dt.LoRA(...), got {type(cfg).__name__}")
    cfg = cfg.for_model(model)
    built = []
    for path, module in _targets(model, cfg, paths):
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
