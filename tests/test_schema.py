"""core/schema.py: the one declarative schema of delta config fields and merge-method parameters.

A small config defined here goes through the generic validator; every constraint is checked for what it accepts,
what it refuses and the message it gives; merge methods and configs describe the same constraint the same way."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pytest
import torch
from torch import Tensor

import deltatune as dt
from deltatune.core import config as config_module
from deltatune.core.config import DeltaConfig, register
from deltatune.core.errors import ConfigError
from deltatune.core.schema import (Check, Finite, Fraction, Invalid, ModuleSpec, NonNegative, NonNegativeInt, NoneMeans,
                                   OneOf, Patterns, Positive, PositiveInt, Range, Unit, node_for, schema_of)
from deltatune.core.tensors import LowRankDelta
from deltatune.merging import get_method, merge_method, registry

KIND = "_test_schema"
COLOURS = ("red", "green")


@dataclass(frozen=True)
class Toy(DeltaConfig):
    """A config with one field per kind of constraint; `validate` holds its one cross-field rule."""

    n: PositiveInt = 4
    m: Annotated[int, Range(0, "n")] = 2
    scale: Annotated[float, Finite(nonzero=True)] = 1.0
    p: Annotated[float, Range(0, 1, high_open=True)] = 0.0
    mode: Literal["fast", "exact"] = "fast"
    colour: Annotated[str, OneOf(COLOURS)] = "red"
    flag: bool = False
    steps: Annotated[int | None, Range(1, unit="steps"), NoneMeans("until the end")] = None
    names: tuple[str, ...] = ()
    sizes: Annotated[dict[str, int], Patterns(Range(1))] = field(default_factory=dict)
    feed: Annotated[str | tuple[str, ...], ModuleSpec()] = ()
    odd: Annotated[int, Check(lambda v: v % 2 == 1, "an odd integer")] = 1
    anything: Any = None

    def validate(self) -> None:
        if self.flag and self.steps is None:
            raise ConfigError("Toy: flag needs steps")


@pytest.fixture
def toy():
    """Toy registered under a test-only kind (so from_dict finds it), unregistered afterwards."""
    register(KIND)(Toy)
    try:
        yield Toy
    finally:
        config_module._REGISTRY.pop(KIND, None)


def message(make) -> str:
    with pytest.raises(ConfigError) as info:
        make()
    return str(info.value)


# --- the generic validator on a config ------------------------------------------------------------------------------
def test_defaults_validate_and_round_trip_through_json(toy) -> None:
    cfg = toy(targets=["q_proj"], names=["a", "b"], sizes={"q": 2}, feed=["down_proj"], steps=3, flag=True)
    assert cfg.targets == ("q_proj",) and cfg.names == ("a", "b") and cfg.feed == ("down_proj",)  # lists -> tuples
    back = DeltaConfig.from_json(cfg.to_json())
    assert back == cfg and type(back) is toy and back.to_json() == cfg.to_json()
    for f in dataclasses.fields(cfg):
        assert type(getattr(back, f.name)) is type(getattr(cfg, f.name)), f.name
    assert toy().scale == 1.0 and type(toy(scale=2).scale) is int  # numbers are kept as given (JSON round-trip)


def test_every_field_is_checked_in_the_one_message_style(toy) -> None:
    cases = {
        "Toy.n must be a positive integer, got 0": dict(n=0),
        "Toy.m must be an integer in [0, n=4], got 5": dict(m=5),
        "Toy.scale must be a finite non-zero number, got 0": dict(scale=0),
        "Toy.p must be a number in [0, 1), got 1.5": dict(p=1.5),
        "Toy.mode must be one of ('fast', 'exact'), got 'slow'": dict(mode="slow"),
        "Toy.colour must be one of ('red', 'green'), got 'blue'": dict(colour="blue"),
        "Toy.flag must be true or false, got 2": dict(flag=2),
        "Toy.n must be a positive integer, got 'abc'": dict(n="abc"),
        "Toy.n must be a positive integer, got 2.5": dict(n=2.5),
        "Toy.mode must be one of ('fast', 'exact'), got 'fats'; did you mean 'fast'?": dict(mode="fats"),
        "Toy.steps must be a positive number of steps or None (until the end), got 0": dict(steps=0),
        "Toy.names must be a list of strings, got [1]": dict(names=[1]),
        "Toy.sizes['q'] must be a positive integer, got 0": dict(sizes={"q": 0}),
        "Toy.feed must be a regex string or a list of module-name suffixes, got 3": dict(feed=3),
        "Toy.odd must be an odd integer, got 2": dict(odd=2),
        "Toy.targets must be a regex string or a non-empty list of module-name suffixes, got []; give module names, "
        "a regex or 'all-linear'": dict(targets=[]),
        "Toy.layers must be a list of non-negative integers or None, got (-1,)": dict(layers=(-1,)),
    }
    for expected, kwargs in cases.items():
        assert message(lambda: toy(**kwargs)) == expected


def test_fields_are_checked_in_order_before_validate(toy) -> None:
    assert message(lambda: toy(flag=True)) == "Toy: flag needs steps"  # the cross-field rule, after the fields
    assert message(lambda: toy(flag=True, n=0)).startswith("Toy.n ")  # a bad field is reported first
    assert message(lambda: toy(n=0, p=2)).startswith("Toy.n ")  # in field order
    assert message(lambda: toy(n=2, m=3)) == "Toy.m must be an integer in [0, n=2], got 3"  # bound read from n


def test_unknown_keys_still_list_the_known_ones(toy) -> None:
    msg = message(lambda: toy(size=3))
    assert "'size'" in msg and "known keys" in msg and "'sizes'" in msg
    msg = message(lambda: DeltaConfig.from_dict({"kind": KIND, "nn": 2}))
    assert "'nn'" in msg and "'n'" in msg


# --- each constraint: accepted, refused, described ------------------------------------------------------------------
def ok(annotation: Any, value: Any) -> Any:
    return node_for(annotation).check(value)


def refused(annotation: Any, value: Any) -> Invalid:
    with pytest.raises(Invalid) as info:
        node_for(annotation).check(value)
    return info.value


def describe(annotation: Any) -> str:
    return node_for(annotation).describe()


def test_range() -> None:
    assert describe(PositiveInt) == "a positive integer" and describe(NonNegativeInt) == "a non-negative integer"
    assert describe(Annotated[int, Range(3)]) == "an integer >= 3"
    assert describe(Annotated[int, Range(None, 9, high_open=True)]) == "an integer < 9"
    assert describe(Annotated[int, Range(1, 5)]) == "an integer in [1, 5]"
    assert describe(Annotated[int, Range(0, unit="steps")]) == "a non-negative number of steps"
    assert describe(Fraction) == "a number in (0, 1]" and describe(Unit) == "a number in [0, 1]"
    assert describe(Positive) == "a positive number" and describe(NonNegative) == "a number >= 0"
    assert describe(Annotated[float, Range(0, 1, True, True)]) == "a number in (0, 1)"
    assert describe(Annotated[float, Finite(), Range(0)]) == "a finite number >= 0"
    assert ok(PositiveInt, 1) == 1 and ok(Fraction, 1) == 1 and ok(Unit, 0.0) == 0.0 and ok(NonNegative, 0) == 0
    assert refused(PositiveInt, 0).problem == "is out of range"
    assert refused(PositiveInt, 2.5).problem == "is not an integer"
    assert refused(PositiveInt, True).problem == "is not a number"  # bools are not numbers
    assert refused(Fraction, 0.0).problem == "is out of range" and refused(Fraction, "half").problem == "is not a number"
    assert refused(Annotated[float, Range(0, 1, high_open=True)], 1.0).problem == "is out of range"
    assert refused(float, math.nan).problem == "is not finite" and refused(Positive, math.inf).problem == "is not finite"
    assert 0.5 in Range(0, 1) and 1 not in Range(0, 1, high_open=True) and str(Range(0.0, None, low_open=True)) == "(0, inf)"


def test_range_bound_from_another_field() -> None:
    class Ctx:
        init_r = 6

    node = node_for(Annotated[int, Range(1, "init_r")])
    assert node.check(6, Ctx()) == 6 and node.describe(Ctx()) == "an integer in [1, init_r=6]"
    with pytest.raises(Invalid):
        node.check(7, Ctx())


def test_finite() -> None:
    nz = Annotated[float, Finite(nonzero=True)]
    assert describe(nz) == "a finite non-zero number" and describe(Annotated[float, Finite()]) == "a finite number"
    assert ok(nz, -2) == -2
    assert refused(nz, 0.0).problem == "is zero" and refused(nz, math.nan).problem == "is not finite"
    assert describe(float) == "a number" and describe(int) == "an integer"


def test_values_written_as_text_are_converted_to_the_declared_type() -> None:
    """pydantic's lax table (core/coerce.py): what YAML, --set and JSON users write means the declared type."""
    for text in ("1e-4", "0.0001", " 1e-4 ", 1e-4):  # YAML reads 1e-4 as a string
        got = ok(Positive, text)
        assert got == 1e-4 and type(got) is float
    for given in ("8", 8.0, "08", 8):
        got = ok(PositiveInt, given)
        assert got == 8 and type(got) is int
    assert type(ok(float, 3)) is int  # an accepted type is kept as given (configs round-trip through JSON)
    for text, value in (("false", False), ("no", False), ("off", False), ("0", False), (0, False),
                        ("true", True), ("yes", True), ("on", True), ("1", True), (1, True)):
        assert ok(bool, text) is value, text
    assert refused(PositiveInt, True).problem == "is not a number" and refused(float, False).problem == "is not a number"
    assert refused(PositiveInt, "1.5").problem == "is not a number" and refused(PositiveInt, "0").problem == "is out of range"
    assert refused(float, "abc").value == "abc" and refused(float, "nan").problem == "is not finite"
    assert ok(Literal[1, 2], "2") == 2 and refused(Literal[1, 2], True).problem == "is not an allowed choice"
    assert ok(tuple[NonNegativeInt, ...], ["0", 1.0, "2"]) == (0, 1, 2) and ok(tuple[NonNegativeInt, ...], "3") == (3,)
    assert ok(str, "1e-4") == "1e-4" and refused(str, 5).problem == "is not a string"  # strings are never converted
    with pytest.raises(ConfigError, match=r"^LoRA.alpha must be a finite non-zero number, got 'abc'$"):
        dt.LoRA(alpha="abc")
    cfg = DeltaConfig.from_dict({"kind": "lora", "r": "4", "alpha": "1e1", "dropout": "0.1", "dora": "false"})
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.dora) == (4, 10.0, 0.1, False) and cfg == dt.LoRA(r=4, alpha=10.0, dropout=0.1)


def test_choices_bool_str() -> None:
    assert describe(Literal["a", "b"]) == "one of ('a', 'b')" == describe(Annotated[str, OneOf(["a", "b"])])
    assert ok(Literal["a", "b"], "b") == "b" and refused(Literal["a", "b"], "c").problem == "is not an allowed choice"
    assert refused(Literal[1, 2], True).problem == "is not an allowed choice"  # True == 1, but not the choice 1
    assert refused(Literal["a"], None).problem == "is not an allowed choice"
    assert ok(bool, False) is False and refused(bool, 2).problem == "is not a boolean"
    assert refused(bool, "maybe").problem == "is not a boolean" and describe(bool) == "true or false"
    assert ok(str, "x") == "x" and refused(str, 1).problem == "is not a string"


def test_tuples_patterns_and_specs() -> None:
    layers = tuple[NonNegativeInt, ...]
    assert ok(layers, [1, 2]) == (1, 2) and ok(layers, 3) == (3,) and ok(layers, ()) == ()
    assert describe(layers) == "a list of non-negative integers"
    assert refused(layers, (1, -1)).value == (1, -1) and refused(layers, 1.5).problem == "is not a list"

    ranks = Annotated[dict[str, int], Patterns(Range(1))]
    assert describe(ranks) == "a mapping of module-name patterns to positive integers"
    assert ok(ranks, {r"layers\.0\..*": 2}) == {r"layers\.0\..*": 2}
    e = refused(ranks, {"q": 2, "v": 0})
    assert (e.path, e.value, e.node.describe()) == ("['v']", 0, "a positive integer")
    e = refused(ranks, {"(q": 2})
    assert e.path == "" and re.search(r"key '\(q' is not a valid regular expression \(", e.detail)
    assert "not a non-empty string" in refused(ranks, {"": 2}).detail
    assert refused(ranks, [("q", 2)]).problem == "is not a mapping"

    spec = Annotated[str | tuple[str, ...], ModuleSpec(nonempty=True)]
    assert ok(spec, r".*\.q_proj") == r".*\.q_proj" and ok(spec, ["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    assert "not a valid regular expression" in refused(spec, "*q").detail
    assert refused(spec, []).problem == "is an empty list" and refused(spec, ("q", "")).problem == "is not a module spec"
    assert ok(Annotated[str | tuple[str, ...], ModuleSpec()], []) == ()
    assert ok(Annotated[tuple[str, ...], ModuleSpec(suffixes=True)], "head") == ("head",)  # one suffix, not a regex


def test_optional_union_check_any_tensor() -> None:
    opt = PositiveInt | None
    assert ok(opt, None) is None and ok(opt, 2) == 2 and describe(opt) == "a positive integer or None"
    e = refused(opt, 0)
    assert e.problem == "is out of range" and e.node.describe() == "a positive integer or None"

    arg = Annotated[int | str, Check(lambda a: a != "", "an index or a name")]
    assert ok(arg, 0) == 0 and ok(arg, "x") == "x" and describe(arg) == "an index or a name"
    assert refused(arg, "").node.describe() == refused(arg, 1.5).node.describe() == "an index or a name"
    assert ok(Any, object) is object

    assert torch.equal(ok(Tensor, torch.ones(2)), torch.ones(2))
    low_rank = LowRankDelta(A=torch.ones(1, 2), B=torch.ones(3, 1))  # B A: [3, 2]
    assert torch.equal(ok(Tensor, low_rank), torch.ones(3, 2))  # a delta tensor is made dense
    assert refused(Tensor, torch.ones(2, dtype=torch.int64)).problem == "is not a floating-point tensor"


def test_schema_mistakes_are_type_errors() -> None:
    with pytest.raises(TypeError, match="does not apply"):
        node_for(Annotated[str, Range(1)])
    with pytest.raises(TypeError, match="Patterns"):
        node_for(dict[str, int])
    with pytest.raises(TypeError, match="unsupported type"):
        node_for(list[int])

    @dataclass(frozen=True)
    class Weakened(Toy):
        n: int = 8  # drops PositiveInt

    with pytest.raises(TypeError, match="drops the constraints"):
        schema_of(Weakened)

    @dataclass(frozen=True)
    class LaterBound(DeltaConfig):
        low: Annotated[int, Range(0, "high")] = 0
        high: int = 1

    with pytest.raises(TypeError, match="not an earlier field"):
        schema_of(LaterBound)


def test_every_registered_config_has_a_schema_and_only_cross_field_validate() -> None:
    for kind in config_module.known_kinds():
        cls = config_module.config_class(kind)
        nodes = schema_of(cls)
        assert list(nodes) == [f.name for f in dataclasses.fields(cls)], kind
        assert schema_of(cls) is nodes  # cached per class


# --- merge-method parameters: the same checks, the same descriptions ------------------------------------------------
@pytest.fixture
def toy_method():
    @merge_method("_test_schema_method")
    def method(tensors: list[Tensor], *, share: Fraction = 1.0, count: PositiveInt = 1, scale: Positive = 1.0,
               mode: Literal["fast", "exact"] = "fast") -> Tensor:
        return tensors[0]

    try:
        yield method
    finally:
        registry._REGISTRY.pop("_test_schema_method", None)


@dataclass(frozen=True)
class Twin(DeltaConfig):
    share: Fraction = 1.0
    count: PositiveInt = 1
    scale: Positive = 1.0


@pytest.mark.parametrize("name,bad", [("share", 1.5), ("share", 0), ("count", 0), ("count", 2.5), ("scale", -1.0),
                                      ("scale", math.inf)])
def test_merge_params_and_config_fields_say_the_same(toy_method, name: str, bad: Any) -> None:
    merge_msg = message(lambda: toy_method.validate({name: bad}, 2))
    config_msg = message(lambda: Twin(**{name: bad}))
    want = schema_of(Twin)[name].describe()  # one description of the constraint, used by both
    assert merge_msg.endswith(f"; expected {want}") and config_msg.startswith(f"Twin.{name} must be {want}, got ")
    assert toy_method.params[name].expected() == want


def test_merge_params_keep_their_wording_and_conversions(toy_method) -> None:
    assert toy_method.validate({"share": 1, "count": 2}, 2)["share"] == 1.0
    assert type(toy_method.validate({"share": 1}, 2)["share"]) is float  # methods receive floats
    assert message(lambda: toy_method.validate({"mode": "slow"}, 2)) == (
        "merge method '_test_schema_method': parameter mode = 'slow' is not an allowed choice; expected one of "
        "'fast', 'exact'")
    assert message(lambda: toy_method.validate({"count": 1.5}, 2)) == (
        "merge method '_test_schema_method': parameter count = 1.5 is not an integer; expected a positive integer")
    assert registry.Range is Range and registry.Fraction is Fraction  # still importable from the registry
    from deltatune.merging import NonNegativeInt as merging_nni

    assert merging_nni is NonNegativeInt
    assert get_method("ties").params["density"].range == Range(0.0, 1.0, low_open=True)


def test_merge_params_refuse_field_references() -> None:
    with pytest.raises(TypeError, match="naming a field"):
        @merge_method("_test_schema_bad")
        def bad(tensors: list[Tensor], *, k: Annotated[int, Range(0, "n")] = 0) -> Tensor:
            return tensors[0]
    assert "_test_schema_bad" not in registry._REGISTRY


# --- real configs keep their messages -------------------------------------------------------------------------------
@pytest.mark.parametrize("make,text", [
    (lambda: dt.LoRA(r=0), "LoRA.r must be a positive integer, got 0"),
    (lambda: dt.LoRA(dropout=1.5), "LoRA.dropout must be a number in [0, 1), got 1.5"),
    (lambda: dt.LoRA(init="x"), "LoRA.init must be one of ('default', 'gaussian', 'pissa', 'milora', 'olora', 'given'), "
                                "got 'x'"),
    (lambda: dt.LoRA(rank_pattern={"q": 0}), "LoRA.rank_pattern['q'] must be a positive integer, got 0"),
    (lambda: dt.LoRA(alpha_pattern={"q": 0}), "LoRA.alpha_pattern['q'] must be a finite non-zero number, got 0"),
    (lambda: dt.AdaLoRA(target_r=13), "AdaLoRA.target_r must be an integer in [1, init_r=12], got 13"),
    (lambda: dt.AdaLoRA(rank_pattern={"q": 13}), "AdaLoRA.rank_pattern['q'] must be an integer in [0, init_r=12], got 13"),
    (lambda: dt.AdaLoRA(tinit=-1), "AdaLoRA.tinit must be a non-negative number of steps, got -1"),
    (lambda: dt.Sparse(k=5, regrow_every=0), "Sparse.regrow_every must be a positive number of steps or None (no "
                                             "regrowth), got 0"),
    (lambda: dt.LoKr(factor=0), "LoKr.factor must be -1 (balanced split) or a positive integer, got 0"),
    (lambda: dt.SORSA(gamma=-1.0), "SORSA.gamma must be a finite number >= 0, got -1.0"),
    (lambda: dt.ParallelAdapter(input_arg=True), "ParallelAdapter.input_arg must be an argument index (0 = the first) "
                                                 "or a parameter name of the targeted module's forward, got True"),
    (lambda: dt.Sparse(k=5, density=0.5), "Sparse needs exactly one of k (entries per weight) or density (fraction), "
                                          "got k=5, density=0.5"),
])
def test_real_config_messages(make, text: str) -> None:
    assert message(make) == text
