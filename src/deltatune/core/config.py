"""Frozen, validated delta configs that round-trip through JSON, and the registry of methods."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar

from .errors import ConfigError, UnsupportedError
from .parsing import short
from .suggest import did_you_mean
from .targeting import matches
from .schema import Fraction, ModuleSpec, NoneMeans, NonNegativeInt, PositiveInt, check, validate_fields

#: a targeting spec: a full-match regex (a string) or module-name suffixes (a tuple)
Targets = str | tuple[str, ...]
#: the annotation of a `targets` field: a targeting spec, not an empty list (subclasses redeclare targets with it)
TargetSpec = Annotated[Targets, ModuleSpec(nonempty=True)]

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
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise ConfigError(f"unknown delta kind {short(kind)}{did_you_mean(kind, _REGISTRY)}; known kinds: {known_kinds()}")
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
    in (0, 1]) is given — the "k or density" choice several methods share (a cross-field rule for validate())."""
    (cname, c, cmeaning), (fname, f, fmeaning) = count, fraction
    if (c is None) == (f is None):
        raise ConfigError(f"{owner} needs exactly one of {cname} ({cmeaning}) or {fname} ({fmeaning}), got "
                          f"{cname}={c!r}, {fname}={f!r}")
    if c is not None:
        check(owner, cname, c, PositiveInt)
    if f is not None:
        check(owner, fname, f, Fraction)


def registered() -> dict[str, type["DeltaConfig"]]:
    """Every registered config class by kind (a copy)."""
    return dict(_REGISTRY)


def known_kinds() -> list[str]:
    return sorted(_REGISTRY)


class _CheckedKeywords(type):
    """Reject unknown constructor keywords with a message that lists the known ones."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        known = {f.name for f in fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}{did_you_mean(unknown[0], known)}; known "
                              f"keys: {sorted(known)}")
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

    targets: TargetSpec = "all-linear"
    exclude: Annotated[Targets | None, ModuleSpec()] = None
    layers: tuple[NonNegativeInt, ...] | None = None
    modules_to_save: Annotated[tuple[str, ...] | None, ModuleSpec(suffixes=True), NoneMeans("none")] = ()

    def __post_init__(self) -> None:
        validate_fields(self)  # every field against its annotation (core/schema.py); lists become tuples
        if self.modules_to_save is None:  # peft writes null for "none"
            object.__setattr__(self, "modules_to_save", ())
        self.validate()

    # --- contract -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError for invalid combinations of field values (cross-field rules; each field's own
        constraints are declared in its annotation and checked before this). Subclasses extend."""

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

    @classmethod
    def example(cls) -> "DeltaConfig":
        """A small valid instance, for generic tests and docs (the capability matrix attaches every registered kind
        through it). Default: the defaults; methods whose defaults are not a complete config override it."""
        return cls()

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
            raise ConfigError(f"a delta config must be a JSON object with a 'kind' key (one of {known_kinds()}), got "
                              f"{short(data)}")
        cls = config_class(data["kind"])
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"kind"}, key=str)
        if unknown:
            raise ConfigError(f"unknown key(s) {short(unknown, 200)} in {cls.__name__} config"
                              f"{did_you_mean(unknown[0], known)}; known keys: {sorted(known)}")
        try:
            return cls(**{k: v for k, v in data.items() if k != "kind"})
        except TypeError as e:
            raise ConfigError(f"invalid {cls.__name__} config {short(data)}: {e}") from None

    @staticmethod
    def from_json(text: str) -> "DeltaConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"delta config is not valid JSON: {e}") from None
        return DeltaConfig.from_dict(data)

    def replace(self, **changes: Any) -> "DeltaConfig":
        return dataclasses.replace(self, **changes)
