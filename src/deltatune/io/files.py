"""dt.save / dt.load: a model's delta to and from disk (any registered format), transactionally."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..runtime import check_new_name, build_pieces, install, slot_of, state_of
from .delta import Delta, model_class_name
from .formats import check_output, format_named
from ..core.layouts import weight_shape
from ..core.errors import CorruptFileError, DeltaNotFoundError, ShapeMismatchError, TargetError

def save(model: nn.Module, path: str | Path, name: str | None = None, format: str = "native") -> Path:
    """Write delta `name` of `model` to directory `path` (created if needed) in a registered format ("native",
    "peft", ...). Returns the path. An unsafe output (see `formats.check_output`) is refused before any work; the
    directory is replaced as a whole, so after a crash at any point it holds the previous delta or the new one."""
    fmt = format_named(format)
    check_output(path)
    delta = Delta.from_model(model, name)
    delta.source = model
    return fmt.write(delta, Path(path))


def value_kind(dtype: torch.dtype) -> str:
    """"floating-point", "complex", "boolean" or "integer": values of one kind convert into each other's dtypes
    when a file's tensors are loaded into a piece's, values of different kinds are refused."""
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def check_fits(model: nn.Module, delta: Delta) -> None:
    """Raise if the delta's modules are missing from `model` or their weights have other shapes."""
    modules = dict(model.named_modules())
    missing = [p for p in delta.state if p not in modules]
    if missing:
        raise TargetError(f"delta {delta.name!r} targets {len(missing)} module(s) that {type(model).__name__} lacks, "
                          f"e.g. {missing[:3]}; it was made for {delta.base.get('model_class', 'another model')}")
    bad = []
    for p, shape in delta.base.get("weight_shapes", {}).items():
        if p not in modules:  # a module this model lacks, so one the delta does not adapt (checked above)
            continue
        w = getattr(modules[p], "weight", None)
        have = list(weight_shape(modules[p]) or ())
        if w is not None and have != list(shape):
            bad.append(f"{p}: file {list(shape)} vs model {have}")
    if bad:
        raise ShapeMismatchError(f"delta {delta.name!r} does not fit this model; weight shapes differ at "
                                 f"{len(bad)} module(s): {bad[:3]}")
    cls = delta.base.get("model_class")
    if cls and cls != model_class_name(model):
        warnings.warn(f"delta {delta.name!r} was saved from a {cls}, loading into a {type(model).__name__}", stacklevel=3)


def apply(model: nn.Module, delta: Delta, name: str | None = None, *, trainable: bool = False,
          activate: bool = True) -> nn.Module:
    """Attach a detached Delta to `model` with its saved tensors; all checks happen before any change."""
    name = name or delta.name
    check_new_name(model, name)
    delta = delta.for_model(model)  # made concrete first: some formats name or place modules only relative to the model
    check_fits(model, delta)
    built = build_pieces(model, delta.config, list(delta.state))
    for path, module, piece in built:
        saved = fitted_state(repr(name), path, piece, delta.state[path])
        own = piece.state_dict()
        with torch.no_grad():
            piece.load_state_dict({k: t.to(own[k].dtype) for k, t in saved.items()})
    return install(model, name, delta.config, built, trainable=trainable, activate=activate)


def fitted_state(label: str, path: str, piece: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors for `piece` at module `path`, checked against what the piece keeps: the same entries (those
    the piece may go without mean zero, e.g. no Δb in the file for a module whose base has a bias), the same shapes,
    the same kind of values. `label` names the delta in errors."""
    own = piece.state_dict()
    saved = {**{k: torch.zeros_like(own[k]) for k in piece.zero_if_missing if k in own}, **state}
    if set(own) != set(saved):
        raise ShapeMismatchError(f"delta {label} at {path!r}: file holds {sorted(saved)}, the config implies "
                                 f"{sorted(own)}")
    for key, t in saved.items():
        if tuple(own[key].shape) != tuple(t.shape):
            raise ShapeMismatchError(f"delta {label}: {path}.{key} has shape {tuple(t.shape)} in the file but "
                                     f"{tuple(own[key].shape)} on this model")
        if value_kind(t.dtype) != value_kind(own[key].dtype):
            raise CorruptFileError(f"delta {label}: {path}.{key} holds {value_kind(t.dtype)} values ({t.dtype}) "
                                   f"in the file, but the piece keeps {value_kind(own[key].dtype)} values "
                                   f"({own[key].dtype}); the file is damaged or was not written for this method")
    return saved


def load(model: nn.Module, path: str | Path, name: str | None = None, *, trainable: bool = False,
         activate: bool = True) -> nn.Module:
    """Read a delta directory of any registered format (native, PEFT, AdapterHub) and attach it to `model` as `name`
    (default: the saved name)."""
    delta = Delta.read(path)
    return apply(model, delta, name, trainable=trainable, activate=activate)


def restore(model: nn.Module, path: str | Path, name: str | None = None) -> nn.Module:
    """Put a saved delta's tensors into the delta of that name already attached to `model`, in place: the pieces
    keep their Parameter objects, so an optimizer holding them goes on (resuming training). The file must cover
    exactly the modules the attached delta adapts, with the tensors the attached pieces keep (same entries, shapes and
    kind of values); every module is checked before any tensor is copied, so a refused file changes nothing."""
    delta = Delta.read(path)
    name = name or delta.name
    st = state_of(model)
    if st is None or name not in st.deltas:
        raise DeltaNotFoundError(f"cannot restore {str(path)!r} into delta {name!r}: no delta of that name is attached "
                                 f"(attached: {sorted(st.deltas) if st else []}); dt.load attaches a new one")
    delta = delta.for_model(model)  # concrete module paths first, as dt.load does
    paths = st.deltas[name].paths
    if sorted(delta.state) != sorted(paths):
        raise ShapeMismatchError(f"cannot restore {str(path)!r} into delta {name!r}: the file adapts "
                                 f"{len(delta.state)} module(s), the attached delta {len(paths)} (e.g. "
                                 f"{sorted(set(delta.state) ^ set(paths))[:3]})")
    modules = dict(model.named_modules())
    checked = []
    for p, state in delta.state.items():
        piece = slot_of(modules[p])[name]
        checked.append((piece, fitted_state(repr(name), p, piece, state)))
    with torch.no_grad():
        for piece, saved in checked:
            own = piece.state_dict()
            piece.load_state_dict({k: t.to(own[k].dtype) for k, t in saved.items()})
    return model
