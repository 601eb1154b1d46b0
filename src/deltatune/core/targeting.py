"""Which modules of a model a delta goes on: 'all-linear', 'all-norm', a full-match regex, name suffixes, exclude,
layers."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator

from typing import TYPE_CHECKING

from torch import nn

from . import regex
from .errors import TargetError
from .layouts import is_norm

if TYPE_CHECKING:
    from .config import DeltaConfig, Targets

HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")

#: the attribute under which the runtime keeps a module's deltas (`<module>.deltatune.<delta name>.<param>`)
SLOT = "deltatune"


def is_piece_module(path: str) -> bool:
    """True for module paths inside deltatune's own slots (never targets)."""
    return SLOT in path.split(".")


def linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        types += (Conv1D,)
    except ImportError:  # transformers is optional for plain torch models
        pass
    return types


def head_paths(model: nn.Module) -> set[str]:
    """Paths of output heads: the model's output embeddings plus conventionally named heads."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for path, module in model.named_modules():
        if out is not None and module is out:
            heads.add(path)
        if path.split(".")[-1] in HEAD_NAMES or path.split(".")[0] in HEAD_NAMES:
            heads.add(path)
    return heads


def matches(spec: Targets, path: str) -> bool:
    """A string is a full-match regex on the path (matched in linear time, `core.regex`); a tuple is a list of name
    suffixes."""
    if isinstance(spec, str):
        return regex.fullmatch(spec, path)
    return any(path == s or path.endswith("." + s) for s in spec)


def layer_index(model: nn.Module, path: str) -> int | None:
    """The index of the first ModuleList/Sequential element on the module's path (the model's layer number)."""
    parts = path.split(".")
    module = model
    for i, part in enumerate(parts):
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            return int(part)
        module = getattr(module, part, None)
        if module is None:
            return None
    return None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, linear_types())


#: targets keywords: every module of a kind outside the output heads
KEYWORDS: dict[str, Callable[[nn.Module], bool]] = {"all-linear": _is_linear, "all-norm": is_norm}


def _candidates(model: nn.Module, cfg: DeltaConfig) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(cfg.targets, str) and cfg.targets in KEYWORDS:
        heads = head_paths(model)
        wanted = KEYWORDS[cfg.targets]
        for path, module in model.named_modules():
            if wanted(module) and path not in heads and not any(path.startswith(h + ".") for h in heads):
                yield path, module
        return
    for path, module in model.named_modules():
        if path and matches(cfg.targets, path):
            yield path, module


def resolve_targets(model: nn.Module, cfg: DeltaConfig) -> list[tuple[str, nn.Module]]:
    """The (path, module) pairs `cfg` applies to, in model order. Raises TargetError if none match."""
    found, seen_layers = [], set()
    for path, module in _candidates(model, cfg):
        if is_piece_module(path):
            continue
        if cfg.exclude is not None and matches(cfg.exclude, path):
            continue
        if cfg.layers is not None:
            index = layer_index(model, path)
            seen_layers.add(index)
            if index not in cfg.layers:
                continue
        found.append((path, module))
    if cfg.layers is not None:
        missing = sorted(set(cfg.layers) - seen_layers)
        if missing:
            have = sorted(i for i in seen_layers if i is not None)
            raise TargetError(f"layers {missing} hold no targeted module of {type(model).__name__}; targeted modules "
                              f"sit in layers {have}")
    if not found:
        example = [p for p, _ in model.named_modules() if p][:8]
        hint = ""
        if isinstance(cfg.targets, str) and cfg.targets not in KEYWORDS and re.fullmatch(r"[\w]+", cfg.targets):
            if any(p.endswith("." + cfg.targets) for p, _ in model.named_modules()):
                hint = f" A string is a full-match regex on the whole path: did you mean targets=[{cfg.targets!r}]?"
        raise TargetError(
            f"targets={cfg.targets!r} (exclude={cfg.exclude!r}, layers={cfg.layers!r}) match no module of "
            f"{type(model).__name__}; module paths look like {example}. Give name suffixes such as ['q_proj', 'v_proj'], "
            f"a full-match regex, 'all-linear' or 'all-norm'.{hint}"
        )
    return found


def pattern_value(patterns: dict[str, object], path: str, default: object) -> object:
    """Per-module override: a key matches when the path ends with it as a dotted regex (PEFT's rule), matched in
    linear time (`core.regex.suffix_match`)."""
    for key, value in patterns.items():
        if regex.suffix_match(key, path):
            return value
    return default
