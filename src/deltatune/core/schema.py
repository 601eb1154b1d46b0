"""One declarative schema for delta configs and merge-method parameters.

A value's type annotation is its schema: a plain type, optionally wrapped in ``typing.Annotated`` with constraint
markers. Delta configs declare their dataclass fields this way and `DeltaConfig.__post_init__` checks every field
generically (`validate_fields`); merge methods declare their keyword parameters this way and the merge registry
checks them with the same nodes (`node_for`)::

    r: Annotated[int, Range(1)] = 8                                  # a positive integer
    alpha: Annotated[float, Finite(nonzero=True)] = 16.0             # a finite non-zero number
    dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.0     # a number in [0, 1)
    init: Literal["default", "gaussian"] = "default"                 # one of ('default', 'gaussian')
    regrow: Annotated[str, OneOf(REGROWS)] = "accumulated"           # choices held in a runtime tuple
    rank_pattern: Annotated[dict[str, int], Patterns(Range(1))]      # regex keys -> positive integers
    targets: Annotated[str | tuple[str, ...], ModuleSpec(nonempty=True)]  # a regex or module-name suffixes
    layers: tuple[NonNegativeInt, ...] | None = None                 # a list (or one value), kept as a tuple
    total_step: Annotated[int | None, Range(1, unit="steps")] = None # "a positive number of steps or None"
    target_r: Annotated[int, Range(1, "init_r")] = 8                 # a bound taken from an earlier field

Supported types: ``bool`` (only True/False), ``int`` (not bool), ``float`` (any finite int or float, not bool),
``str``, ``Literal[...]``, ``torch.Tensor`` (floating point; a DeltaTensor is made dense), ``tuple[X, ...]`` (a list
or a single X is accepted and stored as a tuple), ``dict[str, X]`` with `Patterns`, ``dict[str, Any]`` (a mapping
passed on whole), unions, ``X | None`` and ``Any``. Numbers and booleans written as text (``"1e-4"``, ``"8"``,
``"false"``; YAML reads ``1e-4`` as a string) and integral floats for integers are converted first by pydantic's lax
rules (core/coerce.py); booleans are never numbers.

A failed check raises `Invalid` (value, problem, the node whose description says what was expected, a path such as
``['q_proj']``); configs turn it into one message style, ``Owner.field must be <expected>, got <value>``.
"""
from __future__ import annotations

import math
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from typing import Annotated, Any, Literal, Union

from torch import Tensor

from . import regex
from .coerce import coerce
from .errors import ConfigError
from .parsing import short
from .suggest import closest
from .tensors import DeltaTensor

__all__ = [
    "Constraint", "Range", "Finite", "OneOf", "Patterns", "ModuleSpec", "Check", "NoneMeans",
    "Fraction", "Unit", "Positive", "NonNegative", "PositiveInt", "NonNegativeInt",
    "Invalid", "Node", "node_for", "check", "schema_of", "validate_fields", "config_error",
]


# --- constraint markers ------------------------------------------------------------------------------------------
class Constraint:
    """Base class of the markers used in ``Annotated[type, marker, ...]``; other metadata is ignored."""


Bound = Union[float, str, None]


@dataclass(frozen=True)
class Range(Constraint):
    """Allowed interval of a number; None is unbounded. A bound may name an earlier field of the same config
    (``Range(1, "init_r")``), described as ``init_r=12``. `unit` names what an integer counts ("steps"): the value is
    then described as "a positive number of steps" instead of "a positive integer"."""

    low: Bound = None
    high: Bound = None
    low_open: bool = False
    high_open: bool = False
    unit: str | None = None

    @property
    def refs(self) -> tuple[str, ...]:
        """The field names used as bounds."""
        return tuple(b for b in (self.low, self.high) if isinstance(b, str))

    def contains(self, x: float, ctx: Any = None) -> bool:
        low, high = _resolve(self.low, ctx), _resolve(self.high, ctx)
        if low is not None and (x <= low if self.low_open else x < low):
            return False
        if high is not None and (x >= high if self.high_open else x > high):
            return False
        return True

    def __contains__(self, x: float) -> bool:
        return self.contains(x)

    def text(self, ctx: Any = None) -> str:
        """The interval in mathematical notation: "[0, 1)", "(0, inf)", "[1, init_r=12]"."""
        lo = "-inf" if self.low is None else _bound_text(self.low, ctx)
        hi = "inf" if self.high is None else _bound_text(self.high, ctx)
        return (f"{'(' if self.low_open or self.low is None else '['}{lo}, "
                f"{hi}{')' if self.high_open or self.high is None else ']'}")

    def __str__(self) -> str:
        return self.text()


@dataclass(frozen=True)
class Finite(Constraint):
    """A finite number (every number is checked finite; the marker says so in the description), non-zero when asked."""

    nonzero: bool = False


@dataclass(frozen=True, init=False)
class OneOf(Constraint):
    """One of `choices`, for choices held in a runtime collection (``Literal[...]`` for choices written out)."""

    choices: tuple[Any, ...]

    def __init__(self, choices: Iterable[Any]) -> None:
        object.__setattr__(self, "choices", tuple(choices))


@dataclass(frozen=True, init=False)
class Patterns(Constraint):
    """On ``dict[str, X]``: keys are module-name patterns (non-empty regular expressions that `core.regex` matches in
    linear time) and every value is an X checked by `constraints` (PEFT-style per-module overrides such as
    ``rank_pattern``)."""

    constraints: tuple[Constraint, ...]

    def __init__(self, *constraints: Constraint) -> None:
        object.__setattr__(self, "constraints", constraints)


@dataclass(frozen=True)
class ModuleSpec(Constraint):
    """On ``str | tuple[str, ...]``: a targeting spec, a full-match regex (a string) or module-name suffixes (a
    list, kept as a tuple of non-empty strings). `nonempty` refuses an empty list; `suffixes` takes a single string
    as one suffix instead of a regex."""

    nonempty: bool = False
    suffixes: bool = False


@dataclass(frozen=True)
class Check(Constraint):
    """A custom rule on a value that already has the annotated type: `predicate(value)` must be true; `expected`
    describes an accepted value ("-1 (balanced split) or a positive integer")."""

    predicate: Callable[[Any], bool]
    expected: str


@dataclass(frozen=True)
class NoneMeans(Constraint):
    """On ``X | None``: what None means, added to the description ("or None (no regrowth)")."""

    meaning: str


#: ready-made annotations
Fraction = Annotated[float, Range(0.0, 1.0, low_open=True)]
Unit = Annotated[float, Range(0.0, 1.0)]
Positive = Annotated[float, Range(0.0, None, low_open=True)]
NonNegative = Annotated[float, Range(0.0, None)]
PositiveInt = Annotated[int, Range(1, None)]
NonNegativeInt = Annotated[int, Range(0, None)]
Dropout = Annotated[float, Range(0.0, 1.0, high_open=True)]  # a probability in [0, 1)
Scale = Annotated[float, Finite(nonzero=True)]  # a finite non-zero number (alpha, initial values)


# --- checking -------------------------------------------------------------------------------------------------------
class Invalid(Exception):
    """A value that fails its schema: `problem` ("is out of range") for messages that say what is wrong, `node`
    (whose `describe` says what was expected) for messages that say what is needed, `path` inside the field
    ("['q_proj']") and an optional `detail` (a regex compile error)."""

    def __init__(self, value: Any, problem: str, node: "Node", path: str = "", detail: str = "") -> None:
        super().__init__(problem)
        self.value, self.problem, self.node, self.path, self.detail = value, problem, node, path, detail


class Node(ABC):
    """A compiled schema of one value: `check` returns the (normalised) value or raises `Invalid`."""

    @abstractmethod
    def check(self, value: Any, ctx: Any = None) -> Any:
        """The value, normalised (lists to tuples, ...); `Invalid` when it does not fit."""

    @abstractmethod
    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        """What an accepted value is: "a positive integer" (plural: "positive integers")."""

    def fail(self, value: Any, problem: str, detail: str = "") -> Invalid:
        return Invalid(value, problem, self, "", detail)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


class AnyNode(Node):
    def check(self, value: Any, ctx: Any = None) -> Any:
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return "any values" if plural else "any value"


class BoolNode(Node):
    def check(self, value: Any, ctx: Any = None) -> Any:
        value = coerce(bool, value)
        if not isinstance(value, bool):
            raise self.fail(value, "is not a boolean")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return "true or false values" if plural else "true or false"


class StrNode(Node):
    def check(self, value: Any, ctx: Any = None) -> Any:
        if not isinstance(value, str):
            raise self.fail(value, "is not a string")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return "strings" if plural else "a string"


class ChoiceNode(Node):
    def __init__(self, choices: tuple[Any, ...]) -> None:
        self.choices = choices

    def check(self, value: Any, ctx: Any = None) -> Any:
        for c in self.choices:
            v = coerce(type(c), value) if type(c) in (bool, int, float) else value
            if type(v) is type(c) and v == c:
                return v
        match = closest(value, [c for c in self.choices if isinstance(c, str)])
        raise self.fail(value, "is not an allowed choice", f"did you mean {match!r}?" if match is not None else "")

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return f"one of {self.choices!r}"


class NumberNode(Node):
    """int (`integer`) or float: never a bool, always finite, in `range`, non-zero when `finite.nonzero`."""

    def __init__(self, integer: bool, range: Range | None = None, finite: Finite | None = None) -> None:
        self.integer, self.range, self.finite = integer, range, finite

    def check(self, value: Any, ctx: Any = None) -> Any:
        value = coerce(int if self.integer else float, value)  # "1e-4" -> 0.0001, "8" or 8.0 -> 8 (core/coerce.py)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(value, "is not a number")
        if self.integer and not isinstance(value, int):
            raise self.fail(value, "is not an integer")
        if not math.isfinite(value):
            raise self.fail(value, "is not finite")
        if self.finite is not None and self.finite.nonzero and value == 0:
            raise self.fail(value, "is zero")
        if self.range is not None and not self.range.contains(value, ctx):
            raise self.fail(value, "is out of range")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        words: list[str] = []
        if self.finite is not None:
            words.append("finite non-zero" if self.finite.nonzero else "finite")
        r, suffix = self.range, ""
        if r is not None:
            lo, hi = r.low, r.high
            numeric_lo = lo is not None and not isinstance(lo, str)
            if hi is None and numeric_lo and (lo == 0 and r.low_open or self.integer and lo == 1 and not r.low_open):
                words.append("positive")
            elif hi is None and numeric_lo and lo == 0 and self.integer:
                words.append("non-negative")
            elif hi is None and lo is not None:
                suffix = f" {'>' if r.low_open else '>='} {_bound_text(lo, ctx)}"
            elif lo is None and hi is not None:
                suffix = f" {'<' if r.high_open else '<='} {_bound_text(hi, ctx)}"
            elif lo is not None:
                suffix = f" in {r.text(ctx)}"
        if r is not None and r.unit:
            noun = f"numbers of {r.unit}" if plural else f"number of {r.unit}"
        else:
            noun = ("integers" if plural else "integer") if self.integer else ("numbers" if plural else "number")
        text = " ".join(words + [noun]) + suffix
        return text if plural else f"{_article(text)} {text}"


class TensorNode(Node):
    """A floating-point tensor; a DeltaTensor is made dense."""

    def check(self, value: Any, ctx: Any = None) -> Any:
        if isinstance(value, DeltaTensor):
            value = value.to_dense()
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise self.fail(value, "is not a floating-point tensor")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return "floating-point tensors" if plural else "a floating-point tensor"


class TupleNode(Node):
    """A list or tuple of items (kept as a tuple), or a single item (kept as a 1-tuple)."""

    def __init__(self, item: Node) -> None:
        self.item = item

    def check(self, value: Any, ctx: Any = None) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple):
            try:
                return (self.item.check(value, ctx),)
            except Invalid:
                raise self.fail(value, "is not a list") from None
        try:
            return tuple(self.item.check(v, ctx) for v in value)
        except Invalid as e:
            raise self.fail(value, f"has an item that {e.problem}") from None

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return f"{'lists' if plural else 'a list'} of {self.item.describe(ctx, plural=True)}"


class MappingNode(Node):
    """A mapping with string keys and any values (``dict[str, Any]``: options passed on whole, such as a training run's
    delta config, which its own schema checks)."""

    def check(self, value: Any, ctx: Any = None) -> Any:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise self.fail(value, "is not a mapping")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return "mappings of names to values" if plural else "a mapping of names to values"


class PatternsNode(Node):
    """A dict from module-name patterns (valid regular expressions) to values of `value`."""

    def __init__(self, value: Node) -> None:
        self.value = value

    def check(self, value: Any, ctx: Any = None) -> Any:
        if not isinstance(value, dict):
            raise self.fail(value, "is not a mapping")
        out, changed = {}, False
        for key, v in value.items():
            if not isinstance(key, str) or not key:
                raise self.fail(value, "has a key that is not a module-name pattern",
                                f"key {short(key)} is not a non-empty string")
            try:
                regex.check(key)
            except regex.RegexError as e:
                raise self.fail(value, "has a key that is not a usable regular expression",
                                f"key {short(key)} {e}") from None
            try:
                out[key] = self.value.check(v, ctx)
            except Invalid as e:
                raise Invalid(e.value, e.problem, e.node, f"[{short(key, 80)}]{e.path}", e.detail) from None
            changed = changed or out[key] is not v
        return out if changed else value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return f"{'mappings' if plural else 'a mapping'} of module-name patterns to {self.value.describe(ctx, plural=True)}"


class SpecNode(Node):
    """A targeting spec (see `ModuleSpec`)."""

    def __init__(self, spec: ModuleSpec) -> None:
        self.spec = spec

    def check(self, value: Any, ctx: Any = None) -> Any:
        if isinstance(value, str) and self.spec.suffixes:
            value = (value,)
        if isinstance(value, str):
            try:
                regex.check(value)
            except regex.RegexError as e:
                raise self.fail(value, "is not a usable regular expression",
                                f"it {e}: a string is a full-match regex, a list is name suffixes such as "
                                f"['q_proj', 'v_proj']") from None
            return value
        if isinstance(value, list):
            value = tuple(value)
        if not isinstance(value, tuple) or not all(isinstance(s, str) and s for s in value):
            raise self.fail(value, "is not a module spec")
        if self.spec.nonempty and not value:
            raise self.fail(value, "is an empty list", "give module names, a regex or 'all-linear'")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        some = "a non-empty list" if self.spec.nonempty else "a list"
        if self.spec.suffixes:
            return f"a module-name suffix or {some} of module-name suffixes"
        return f"a regex string or {some} of module-name suffixes"


class UnionNode(Node):
    def __init__(self, members: tuple[Node, ...]) -> None:
        self.members = members

    def check(self, value: Any, ctx: Any = None) -> Any:
        for m in self.members:
            try:
                return m.check(value, ctx)
            except Invalid:
                continue
        raise self.fail(value, "is not of an allowed type")

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return " or ".join(m.describe(ctx, plural) for m in self.members)


class OptionalNode(Node):
    def __init__(self, inner: Node, meaning: str | None = None) -> None:
        self.inner, self.meaning = inner, meaning

    def check(self, value: Any, ctx: Any = None) -> Any:
        if value is None:
            return None
        return _relabel(self, self.inner, value, ctx)

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return f"{self.inner.describe(ctx, plural)} or None" + (f" ({self.meaning})" if self.meaning else "")


class CheckNode(Node):
    def __init__(self, inner: Node, rule: Check) -> None:
        self.inner, self.rule = inner, rule

    def check(self, value: Any, ctx: Any = None) -> Any:
        value = _relabel(self, self.inner, value, ctx)
        if not self.rule.predicate(value):
            raise self.fail(value, "is not allowed")
        return value

    def describe(self, ctx: Any = None, plural: bool = False) -> str:
        return self.rule.expected


def _relabel(outer: Node, inner: Node, value: Any, ctx: Any) -> Any:
    """inner.check(value), with a failure of the value itself described by `outer` (which says more)."""
    try:
        return inner.check(value, ctx)
    except Invalid as e:
        if e.path:
            raise
        raise Invalid(e.value, e.problem, outer, "", e.detail) from None


# --- compiling annotations ----------------------------------------------------------------------------------------
_COMPILED: dict[Any, Node] = {}


def node_for(annotation: Any) -> Node:
    """The checker of values of `annotation` (a type, optionally ``Annotated`` with constraint markers).

    TypeError for an unsupported type or a marker that does not apply to its type."""
    try:
        return _COMPILED[annotation]
    except (KeyError, TypeError):
        pass
    node = _compile(annotation, ())
    try:
        _COMPILED[annotation] = node
    except TypeError:  # unhashable metadata: compile again next time
        pass
    return node


def _compile(tp: Any, markers: tuple[Constraint, ...]) -> Node:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _compile(args[0], markers + tuple(m for m in tp.__metadata__ if isinstance(m, Constraint)))
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        inner = rest[0] if len(rest) == 1 else Union[rest]  # type: ignore[valid-type]
        meaning = next((m.meaning for m in markers if isinstance(m, NoneMeans)), None)
        return OptionalNode(_compile(inner, tuple(m for m in markers if not isinstance(m, NoneMeans))), meaning)
    used: list[Constraint] = []

    def take(kind: type) -> Any:
        found = [m for m in markers if isinstance(m, kind)]
        if len(found) > 1:
            raise TypeError(f"more than one {kind.__name__} on {tp!r}")
        used.extend(found)
        return found[0] if found else None

    checks = [m for m in markers if isinstance(m, Check)]
    used.extend(checks)
    spec = take(ModuleSpec)
    node: Node
    if spec is not None:
        node = SpecNode(spec)
    elif tp is Any:
        node = AnyNode()
    elif origin in (Union, types.UnionType):
        node = UnionNode(tuple(_compile(a, ()) for a in args))
    elif origin is Literal:
        node = ChoiceNode(args)
    elif tp is bool:
        node = BoolNode()
    elif tp in (int, float):
        node = NumberNode(tp is int, take(Range), take(Finite))
    elif tp is str:
        one_of = take(OneOf)
        node = ChoiceNode(one_of.choices) if one_of is not None else StrNode()
    elif tp is Tensor:
        node = TensorNode()
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        node = TupleNode(_compile(args[0], ()))
    elif origin is dict and len(args) == 2 and args[0] is str:
        patterns = take(Patterns)
        if patterns is None and args[1] is Any:
            node = MappingNode()
        elif patterns is None:
            raise TypeError(f"a dict needs a Patterns(...) marker (module-name patterns to values), got {tp!r}")
        else:
            node = PatternsNode(_compile(Annotated[(args[1], *patterns.constraints)] if patterns.constraints else args[1], ()))
    else:
        raise TypeError(f"unsupported type {tp!r} in a schema")
    unused = [m for m in markers if not any(m is u for u in used)]
    if unused:
        raise TypeError(f"{unused[0]!r} does not apply to {tp!r}")
    for rule in checks:
        node = CheckNode(node, rule)
    return node


# --- configs: dataclass fields --------------------------------------------------------------------------------------
_SCHEMAS: dict[type, dict[str, Node]] = {}


def schema_of(cls: type) -> dict[str, Node]:
    """Field name -> compiled schema of dataclass `cls`, in field order (cached per class).

    TypeError where a field's type is unsupported, a Range names a field that is not an earlier one, or a subclass
    redeclares a field (to change its default) with an annotation that drops the constraints of a base class's."""
    cached = _SCHEMAS.get(cls)
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Node] = {}
    for f in fields(cls):
        hint = hints[f.name]
        for base in cls.__mro__[1:]:
            if is_dataclass(base) and f.name in {g.name for g in fields(base)}:
                base_hint = typing.get_type_hints(base, include_extras=True)[f.name]
                if _constrained(base_hint) and not _constrained(hint):
                    raise TypeError(f"{cls.__name__}.{f.name} is annotated {hint!r}, which drops the constraints of "
                                    f"{base.__name__}.{f.name}: {base_hint!r}; redeclare it with the annotated type")
                break
        for ref in _refs(hint):
            if ref not in out:
                raise TypeError(f"{cls.__name__}.{f.name}: a Range bound names {ref!r}, which is not an earlier field")
        try:
            out[f.name] = node_for(hint)
        except TypeError as e:
            raise TypeError(f"{cls.__name__}.{f.name}: {e}") from None
    _SCHEMAS[cls] = out
    return out


def validate_fields(obj: Any) -> None:
    """Check every field of the dataclass instance `obj` against its annotation, in field order, storing normalised
    values (lists -> tuples); ConfigError ``Owner.field must be <expected>, got <value>`` for the first bad one."""
    for name, node in schema_of(type(obj)).items():
        value = getattr(obj, name)
        try:
            new = node.check(value, obj)
        except Invalid as e:
            raise config_error(type(obj).__name__, name, _as_given(e, value), obj) from None
        if new is not value:
            object.__setattr__(obj, name, new)


def config_error(owner: str, name: str, e: Invalid, ctx: Any = None) -> ConfigError:
    """The one message style of config values: ``LoRA.rank_pattern['q'] must be a positive integer, got 0``."""
    text = f"{owner}.{name}{e.path} must be {e.node.describe(ctx)}, got {short(e.value, 80)}"
    return ConfigError(text + (f"; {e.detail}" if e.detail else ""))


def check(owner: str, name: str, value: Any, annotation: Any, ctx: Any = None) -> Any:
    """`value` checked against `annotation` (normalised), or ConfigError in the config style naming owner.name —
    for rules a validate() method applies itself."""
    try:
        return node_for(annotation).check(value, ctx)
    except Invalid as e:
        raise config_error(owner, name, _as_given(e, value), ctx) from None


def _as_given(e: Invalid, value: Any) -> Invalid:
    """A failure of the whole field shows the value as given (a list, a single name), not as normalised."""
    return e if e.path else Invalid(value, e.problem, e.node, "", e.detail)


# --- helpers --------------------------------------------------------------------------------------------------------
def _resolve(bound: Bound, ctx: Any) -> float | None:
    if isinstance(bound, str):
        if ctx is None or not hasattr(ctx, bound):
            raise TypeError(f"the Range bound {bound!r} names a field, but no config was given to read it from")
        return getattr(ctx, bound)
    return bound


def _bound_text(bound: Bound, ctx: Any) -> str:
    if isinstance(bound, str):
        return f"{bound}={getattr(ctx, bound)}" if ctx is not None and hasattr(ctx, bound) else bound
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _article(text: str) -> str:
    return "an" if text[:1] in "aeiou" else "a"


def _metadata(tp: Any) -> Iterable[Any]:
    """Every Annotated metadata item anywhere in `tp`."""
    if typing.get_origin(tp) is Annotated:
        yield from tp.__metadata__
        yield from _metadata(typing.get_args(tp)[0])
        return
    for a in typing.get_args(tp):
        yield from _metadata(a)


def _constrained(tp: Any) -> bool:
    return any(isinstance(m, Constraint) for m in _metadata(tp))


def _refs(tp: Any) -> list[str]:
    out = []
    for m in _metadata(tp):
        if isinstance(m, Range):
            out.extend(m.refs)
        elif isinstance(m, Patterns):
            out.extend(r for c in m.constraints if isinstance(c, Range) for r in c.refs)
    return out
