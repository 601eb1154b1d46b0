"""Merge methods as plain registered functions; the function's signature is its parameter schema.

A merge method combines the task vectors τ_i = ΔW_i of *one module* (the pipeline streams module by module)
into one tensor of the same shape::

    @merge_method("ties", paper="https://arxiv.org/abs/2306.01708")
    def ties(tensors: list[Tensor], *, weight: PerInput[float] = 1.0, density: PerInput[Fraction] = 1.0,
             normalize: bool = True, lambda_: float = 1.0) -> Tensor: ...

How the signature becomes the schema:

* The first positional parameter receives the inputs: a list of dense float32 tensors, all of one shape (the
  registry converts delta tensors to dense and any floating dtype to float32; the result is returned as float32).
* Every keyword-only parameter is a method parameter. Its annotation gives the type — ``float``, ``int``,
  ``bool``, ``str``, ``Literal[...]`` or ``Tensor`` — optionally wrapped in ``Annotated[..., Range(...)]``
  (ready-made: ``Fraction`` = (0, 1], ``Unit`` = [0, 1], ``Positive`` = (0, ∞), ``NonNegative`` = [0, ∞),
  ``NonNegativeInt``). ``X | None`` allows None. A parameter without a default is required. The annotations and
  their checks are the schema delta configs use (core/schema.py): a parameter's values are checked by the same
  nodes as a config field's, and described the same way ("a number in (0, 1]").
* ``PerInput[X]`` marks a per-input parameter: it takes a list with one value per input, or one value that is
  used for every input; the method always receives the list. A method that needs a tensor per input (Fisher
  merging: one Fisher tensor of the task vector's shape per input) declares ``fisher: PerInput[Tensor]``; the
  registry checks each tensor's shape against the inputs and converts it to float32 on the inputs' device.
* A trailing underscore is dropped from the public name (``lambda_`` is the parameter ``"lambda"``, as in
  mergekit recipes); both spellings are accepted when calling.
* ``key: str`` (keyword-only) is reserved: not a parameter but the per-call context the pipeline passes (the
  module path), which random methods combine with their ``seed`` parameter via `generator` so results are
  reproducible and independent across modules.
* ``@merge_method(..., linear=True)`` declares a capability: the result is Σ c_i τ_i with coefficients fixed by
  the parameters alone (not by the tensors' values), so the pipeline may combine low-rank inputs exactly.
"""
from __future__ import annotations

import hashlib
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import torch
from torch import Tensor

from ..core.errors import ConfigError, ShapeMismatchError
from ..core.schema import Fraction, Invalid, Node, NonNegative, NonNegativeInt, Positive, PositiveInt, Range, Unit, node_for
from ..core.suggest import did_you_mean
from ..core.tensors import DeltaTensor

__all__ = ["Fraction", "MergeMethod", "NonNegative", "NonNegativeInt", "Param", "PerInput", "Positive", "PositiveInt",
           "Range", "Unit", "generator", "get_method", "list_methods", "merge_method"]

T = TypeVar("T")


class PerInput(Generic[T]):
    """Annotation marker: one value per input (a list), or one value broadcast to every input."""


_NO_DEFAULT = inspect.Parameter.empty
_CONTEXT = ("key",)


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method, derived from the function signature."""

    name: str                 # public name ("lambda")
    arg: str                  # Python argument name ("lambda_")
    type: Any                 # float, int, bool, str, Tensor or a Literal[...]
    default: Any              # inspect.Parameter.empty when required
    per_input: bool = False
    optional: bool = False    # None is allowed
    range: Range | None = None
    node: Node | None = field(default=None, repr=False, compare=False)  # the shared schema's checker of one value

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def expected(self) -> str:
        """Human description of an accepted (single) value."""
        if typing.get_origin(self.type) is Literal:
            what = "one of " + ", ".join(repr(a) for a in typing.get_args(self.type))
        elif self.type is Tensor:
            what = "a tensor of the inputs' shape"
        else:
            what = (self.node or node_for(self.type)).describe()
        return what + (" or None" if self.optional else "")


class MergeMethod:
    """A registered merge function with its schema (`params`), validation and float32 calling convention."""

    def __init__(self, fn: Callable[..., Tensor], name: str, paper: str | None, inputs: int | str,
                 linear: bool = False) -> None:
        self.fn, self.name, self.paper, self.inputs = fn, name, paper, inputs
        #: capability: the result is a fixed linear combination Σ c_i τ_i (the pipeline keeps low-rank sums exact)
        self.linear = linear
        self.params: dict[str, Param] = _schema(fn, name)
        self._context = [c for c in _CONTEXT if c in inspect.signature(fn).parameters]
        self.__doc__ = fn.__doc__
        self.summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""

    def __repr__(self) -> str:
        return f"MergeMethod({self.name!r}, params={sorted(self.params)})"

    # --- validation ---------------------------------------------------------------------------------
    def validate(self, params: dict[str, Any], n_inputs: int) -> dict[str, Any]:
        """Checked parameters keyed by public name, defaults filled and per-input values expanded to lists.

        Raises ConfigError naming the field and what was expected; nothing is modified."""
        where = f"merge method {self.name!r}"
        if not isinstance(n_inputs, int) or n_inputs < 1:
            raise ConfigError(f"{where} needs at least one input tensor, got {n_inputs}")
        if self.inputs != "any" and n_inputs != self.inputs:
            raise ConfigError(f"{where} takes exactly {self.inputs} inputs, got {n_inputs}; pass {self.inputs} deltas")
        by_arg = {p.arg: p.name for p in self.params.values()}
        given: dict[str, Any] = {}
        for k, v in params.items():
            name = k if k in self.params else by_arg.get(k)
            if name is None:
                raise ConfigError(f"{where} has no parameter {k!r}{did_you_mean(k, self.params)}; its parameters are: "
                                  f"{', '.join(sorted(self.params)) or '(none)'}")
            if name in given:
                raise ConfigError(f"{where}: parameter {name!r} is given twice (as {name!r} and {self.params[name].arg!r})")
            given[name] = v
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if name not in given:
                if p.required:
                    raise ConfigError(f"{where}: parameter {name!r} is required; expected "
                                      f"{_expected(p, n_inputs)}")
                value = p.default
                out[name] = [value] * n_inputs if p.per_input and value is not None else value
                continue
            out[name] = _check_param(p, given[name], n_inputs, where)
        return out

    # --- calling ------------------------------------------------------------------------------------
    def __call__(self, tensors: Sequence[Tensor | DeltaTensor], /, *, key: str = "", **params: Any) -> Tensor:
        """Merge `tensors` (one module's task vectors) with `params`; float32 in, float32 out."""
        inputs = _as_float32(tensors, self.name)
        checked = self.validate(params, len(inputs))
        shape, device = inputs[0].shape, inputs[0].device
        kwargs: dict[str, Any] = {}
        for name, value in checked.items():
            p = self.params[name]
            if p.type is Tensor and value is not None:
                value = [_extra_tensor(v, shape, device, f"{self.name}.{name}[{i}]") for i, v in enumerate(value)] \
                    if p.per_input else _extra_tensor(value, shape, device, f"{self.name}.{name}")
            kwargs[p.arg] = value
        if "key" in self._context:
            if not isinstance(key, str):
                raise ConfigError(f"merge method {self.name!r}: key must be a string (the module path), got {key!r}")
            kwargs["key"] = key
        result = self.fn(inputs, **kwargs)
        if tuple(result.shape) != tuple(shape):  # a bug in a method, not bad input
            raise RuntimeError(f"merge method {self.name!r} returned shape {tuple(result.shape)} for inputs {tuple(shape)}")
        return result.float()


_REGISTRY: dict[str, MergeMethod] = {}


def merge_method(name: str, *, paper: str | None = None, inputs: int | str = "any",
                 linear: bool = False) -> Callable[[Callable[..., Tensor]], MergeMethod]:
    """Register `fn` as merge method `name`; `inputs` is "any" or the exact number of inputs it takes; `linear`
    declares that the result is Σ c_i τ_i with coefficients fixed by the parameters alone."""
    if inputs != "any" and not (isinstance(inputs, int) and inputs >= 1):
        raise ValueError(f"inputs must be 'any' or a positive int, got {inputs!r}")

    def register(fn: Callable[..., Tensor]) -> MergeMethod:
        if name in _REGISTRY:
            raise ValueError(f"a merge method named {name!r} is already registered ({_REGISTRY[name].fn.__module__})")
        method = MergeMethod(fn, name, paper, inputs, linear)
        _REGISTRY[name] = method
        return method

    return register


def get_method(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown merge method {name!r}{did_you_mean(name, _REGISTRY)}; known: "
                          f"{', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def generator(seed: int, key: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of input `index` of the module `key` under `seed`.

    Seeded with the first 8 bytes (little-endian, top bit cleared) of sha256(f"{seed}\\0{key}\\0{index}"), so a
    module's draws depend only on (seed, module path, input position) — not on which modules ran before. CPU and
    CUDA generators give different streams for the same seed."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return g


# --- schema from a signature ------------------------------------------------------------------------
def _schema(fn: Callable[..., Any], method: str) -> dict[str, Param]:
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    plist = list(sig.parameters.values())
    if not plist or plist[0].kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"merge method {method!r}: the first parameter must be the positional list of input tensors")
    params: dict[str, Param] = {}
    for p in plist[1:]:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            raise TypeError(f"merge method {method!r}: parameter {p.name!r} must be keyword-only (after `*`)")
        if p.name in _CONTEXT:
            continue
        ann = hints.get(p.name)
        if ann is None:
            raise TypeError(f"merge method {method!r}: parameter {p.name!r} needs a type annotation")
        param = _param(p.name, ann, p.default, method)
        params[param.name] = param
    return params


def _param(arg: str, ann: Any, default: Any, method: str) -> Param:
    optional = False
    if typing.get_origin(ann) in (Union, types.UnionType):
        members = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = len(members) < len(typing.get_args(ann))
        if len(members) != 1:
            raise TypeError(f"merge method {method!r}: parameter {arg!r} has an unsupported union type {ann!r}")
        ann = members[0]
    per_input = typing.get_origin(ann) is PerInput
    if per_input:
        ann = typing.get_args(ann)[0]
    annotated, rng = ann, None
    if typing.get_origin(ann) is Annotated:
        ann, *meta = typing.get_args(ann)
        rng = next((m for m in meta if isinstance(m, Range)), None)
    if not (ann in (float, int, bool, str, Tensor) or typing.get_origin(ann) is Literal):
        raise TypeError(f"merge method {method!r}: parameter {arg!r} has unsupported type {ann!r}")
    if rng is not None and rng.refs:
        raise TypeError(f"merge method {method!r}: parameter {arg!r} has a Range bound naming a field {rng.refs}")
    try:
        node = node_for(annotated)
    except TypeError as e:
        raise TypeError(f"merge method {method!r}: parameter {arg!r}: {e}") from None
    return Param(arg.rstrip("_") or arg, arg, ann, default, per_input, optional, rng, node)


# --- value checks -------------------------------------------------------------------------------------
def _expected(p: Param, n: int) -> str:
    one = p.expected()
    return f"{one}, or a list of {n} such values (one per input)" if p.per_input else one


def _check_param(p: Param, value: Any, n: int, where: str) -> Any:
    if p.per_input and isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{where}: parameter {p.name!r} has {len(value)} values for {n} inputs; expected "
                              f"{_expected(p, n)}")
        return [_check_value(p, v, f"{p.name}[{i}]", where, n) for i, v in enumerate(value)]
    checked = _check_value(p, value, p.name, where, n)
    return [checked] * n if p.per_input and checked is not None else checked


def _check_value(p: Param, v: Any, field: str, where: str, n: int) -> Any:
    if v is None:
        if p.optional:
            return None
        raise ConfigError(f"{where}: parameter {field} = None is not allowed; expected {_expected(p, n)}")
    if p.type is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)  # methods receive floats (configs keep what was given: their JSON round-trips)
    try:
        return (p.node or node_for(p.type)).check(v)
    except Invalid as e:  # the shared schema's check, in this registry's wording
        raise ConfigError(f"{where}: parameter {field} = {_short(v)} {e.problem}; expected {_expected(p, n)}") from None


def _short(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"<{v.dtype} tensor of shape {tuple(v.shape)}>"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_float32(tensors: Sequence[Tensor | DeltaTensor], method: str) -> list[Tensor]:
    if isinstance(tensors, (Tensor, DeltaTensor)) or not isinstance(tensors, Sequence):
        raise ConfigError(f"merge method {method!r} takes a list of input tensors, got {type(tensors).__name__}")
    out = []
    for i, t in enumerate(tensors):
        if isinstance(t, DeltaTensor):
            t = t.to_dense()
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ConfigError(f"merge method {method!r}: input {i} is {_short(t)}; expected a floating-point tensor "
                              f"(a task vector ΔW)")
        out.append(t.detach().float())
    if not out:
        raise ConfigError(f"merge method {method!r} needs at least one input tensor, got none")
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise ShapeMismatchError(f"merge method {method!r}: inputs have different shapes "
                                 f"{[tuple(t.shape) for t in out]}; all task vectors of one module must match")
    devices = {t.device for t in out}
    if len(devices) > 1:
        raise ConfigError(f"merge method {method!r}: inputs are on different devices {sorted(map(str, devices))}; "
                          f"move them to one device")
    return out


def _extra_tensor(t: Tensor, shape: torch.Size, device: torch.device, field: str) -> Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"merge parameter {field} has shape {tuple(t.shape)}; expected the inputs' shape "
                                 f"{tuple(shape)}")
    return t.detach().to(device=device, dtype=torch.float32)
