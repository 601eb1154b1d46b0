"""Frozen, validated delta configs that round-trip through JSON, and the registry of methods."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .errors import ConfigError, UnsupportedError
from .targeting import matches

Targets = str | tuple[str, ...]

_REGISTRY: dict[str, type["DeltaConfig"]] = {}


def register(kind: str):
    """Class decorator: make a config class loadable by its `kind` string."""

    def wrap(cls: type[DeltaConfig]) -> type[DeltaConfig]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ConfigError(f"delta kind {kind!r} is registered twice ({_REGISTRY[kind].__name__}, {cls.__name__})")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return wrap


def config_class(kind: str) -> type["DeltaConfig"]:
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown delta kind {kind!r}; known kinds: {known_kinds()}")
    return _REGISTRY[kind]


def storage_kind(tensor_type: type) -> str:
    """The registered kind whose files store updates of `tensor_type` (a DeltaTensor class) exactly."""
    kinds = [k for k, c in _REGISTRY.items() if c.stores is tensor_type]
    if len(kinds) != 1:
        raise ConfigError(f"no single delta kind stores {tensor_type.__name__} updates (found {kinds}); pass kind=")
    return kinds[0]


def packed_kind(tensor_type: type) -> str:
    """The registered kind that packs updates of `tensor_type` of one magnitude per module (declares `packs`)."""
    kinds = [k for k, c in _REGISTRY.items() if c.packs is tensor_type]
    if len(kinds) != 1:
        raise ConfigError(f"no single delta kind packs {tensor_type.__name__} updates (found {kinds})")
    return kinds[0]


def whole_module_config() -> type["DeltaConfig"]:
    """The registered config that keeps modules whole (declares `keeps_whole_modules`), for `modules_to_save`."""
    found = [c for c in _REGISTRY.values() if c.keeps_whole_modules]
    if len(found) != 1:
        raise UnsupportedError(f"modules_to_save needs exactly one registered method that keeps modules whole; found "
                               f"{[c.__name__ for c in found]}")
    return found[0]


def check_count_or_fraction(owner: str, count: tuple[str, Any, str], fraction: tuple[str, Any, str]) -> None:
    """ConfigError unless exactly one of (name, value, meaning) `count` (a positive integer) and `fraction` (a number
    in (0, 1]) is given — the "k or density" choice several methods share."""
    (cname, c, cmeaning), (fname, f, fmeaning) = count, fraction
    if (c is None) == (f is None):
        raise ConfigError(f"{owner} needs exactly one of {cname} ({cmeaning}) or {fname} ({fmeaning}), got "
                          f"{cname}={c!r}, {fname}={f!r}")
    if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 1):
        raise ConfigError(f"{owner}.{cname} must be a positive integer, got {c!r}")
    if f is not None and (not isinstance(f, (int, float)) or isinstance(f, bool) or not 0.0 < f <= 1.0):
        raise ConfigError(f"{owner}.{fname} must be a number in (0, 1], got {f!r}")


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
    """ConfigError unless `value` is an integer (not a bool) >= minimum."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        want = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(f"{owner}.{name} must be {want}, got {value!r}")


def check_finite(owner: str, name: str, value: Any, nonzero: bool = False) -> None:
    """ConfigError unless `value` is a finite number (not a bool), non-zero when asked."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (nonzero and value == 0):
        raise ConfigError(f"{owner}.{name} must be a finite{' non-zero' if nonzero else ''} number, got {value!r}")


def check_dropout(owner: str, p: Any) -> None:
    """ConfigError unless `p` is a probability in [0, 1)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{owner}.dropout must be a number in [0, 1), got {p!r}")


def known_kinds() -> list[str]:
    return sorted(_REGISTRY)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _check_spec(owner: str, name: str, spec: Any) -> None:
    """A targeting field is None, a full-match regex (a string) or a list of module-name suffixes."""
    if spec is None:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise ConfigError(f"{owner}.{name}={spec!r} is not a valid regular expression ({e}); a string is a "
                              f"full-match regex, a list is name suffixes such as ['q_proj', 'v_proj']") from None
        return
    if not isinstance(spec, tuple) or not all(isinstance(s, str) and s for s in spec):
        raise ConfigError(f"{owner}.{name} must be a regex string or a list of module-name suffixes, got {spec!r}")


class _CheckedKeywords(type):
    """Reject unknown constructor keywords with a message that lists the known ones."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        known = {f.name for f in fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; known keys: {sorted(known)}")
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class DeltaConfig(metaclass=_CheckedKeywords):
    """Fields every method shares: where it goes. Subclasses add what it is."""

    kind: ClassVar[str] = "abstract"
    #: the DeltaTensor class this method stores any update of exactly (dense, sparse, low-rank), if any:
    #: `Delta.from_tensors` picks the kind by it
    stores: ClassVar[type | None] = None
    #: a DeltaTensor class some of whose updates (one magnitude per module: ±scale on a mask) this method stores more
    #: compactly than the `stores` kind (sign bits); `Delta.from_tensors(..., kind=packed_kind(SparseDelta))`
    packs: ClassVar[type | None] = None
    #: True for the one method that trains and saves modules whole: `modules_to_save` paths of any config use it
    keeps_whole_modules: ClassVar[bool] = False

    targets: Targets = "all-linear"
    exclude: Targets | None = None
    layers: tuple[int, ...] | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):
            object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
        for name in ("targets", "exclude", "layers", "modules_to_save"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.targets, tuple) and not self.targets:
            raise ConfigError(f"{type(self).__name__}.targets is an empty list; give module names, a regex or 'all-linear'")
        for name in ("targets", "exclude", "modules_to_save"):
            _check_spec(type(self).__name__, name, getattr(self, name))
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                object.__setattr__(self, "layers", (self.layers,))
            if not isinstance(self.layers, tuple) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ConfigError(f"{type(self).__name__}.layers must be non-negative integers, got {self.layers!r}")
        self.validate()

    # --- contract -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for invalid field values. Subclasses extend."""

    def resolve(self, path: str) -> "DeltaConfig":
        """The config that applies to the module at `path` (per-module overrides). Default: self."""
        return self

    def for_module(self, path: str) -> "DeltaConfig":
        """The config that builds the piece at `path`: for `modules_to_save` paths, the registered config that keeps
        modules whole (`keeps_whole_modules`), else `resolve(path)`."""
        if self.saves_whole(path):
            return whole_module_config()(targets=(path,))
        return self.resolve(path)

    def saves_whole(self, path: str) -> bool:
        """True for `modules_to_save` paths: modules trained and saved whole (e.g. a new head), not as a ΔW."""
        return bool(self.modules_to_save) and matches(tuple(self.modules_to_save), path)

    def follows(self) -> tuple[str, ...]:
        """Names of attached deltas whose modules this delta goes on instead of `targets` (a fusion layer over them).
        Default: none — the delta is targeted by `targets`."""
        return ()

    def piece_class(self, module: Any) -> type:
        """The Piece class to build for `module`; every registered method overrides this."""
        raise UnsupportedError(f"{type(self).__name__} (kind {self.kind!r}) names no method; use a registered "
                               f"config such as LoRA (known kinds: {known_kinds()})")

    @classmethod
    def for_tensors(cls, tensors: dict[str, Any], biases: dict[str, Any]) -> "DeltaConfig":
        """A config of this kind whose pieces can hold exactly these updates (path -> DeltaTensor); methods that
        store arbitrary updates of one kind (dense, sparse, low-rank) support it (see `Delta.from_tensors`)."""
        return cls(targets=tuple(tensors))

    def for_model(self, model: Any) -> "DeltaConfig":
        """This config made concrete for `model` before targeting (e.g. targets="auto" resolved from a per-architecture
        map); attach records and saves the result. Default: self."""
        return self

    def for_pieces(self, pieces: dict[str, Any]) -> "DeltaConfig":
        """The config that rebuilds `pieces` (path -> Piece) with their current shapes, for saving; methods whose
        pieces change shape in training record it here (AdaLoRA's pruned ranks). Default: self."""
        return self

    # --- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "DeltaConfig":
        if not isinstance(data, dict) or "kind" not in data:
            raise ConfigError(f"a delta config must be a JSON object with a 'kind' key (one of {known_kinds()}), got {data!r}")
        cls = config_class(data["kind"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"})
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {cls.__name__} config; known keys: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "kind"})
        except TypeError as e:
            raise ConfigError(f"invalid {cls.__name__} config {data!r}: {e}") from None

    @staticmethod
    def from_json(text: str) -> "DeltaConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"delta config is not valid JSON: {e}") from None
        return DeltaConfig.from_dict(data)

    def replace(self, **changes: Any) -> "DeltaConfig":
        return dataclasses.replace(self, **changes)
