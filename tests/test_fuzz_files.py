"""Fuzzing the files deltatune reads (issue 18, item 5): hypothesis mutates a valid `delta.json`,
`adapter_config.json` and merge recipe one field at a time — replacing a value anywhere in the tree with another
JSON value (including hostile ones: huge numbers, NaN, deep nesting, catastrophic regexes, terminal escapes),
deleting it, renaming its key or adding an unknown one — and checks for every mutation that

* reading or loading ends in a `deltatune.errors` exception or a correct result, never any other exception;
* within a time limit;
* a failed load leaves the model bitwise untouched, and a successful one holds exactly the file's tensors and
  detaches back to the untouched model.

Derandomized, so CI runs the same examples every time; `DELTATUNE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_files.py`
runs a longer campaign.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deltatune as dt
from deltatune.core.errors import DeltaTuneError
from deltatune.io.peft import write_peft
from deltatune.merging.recipe import load_recipe, run_recipe

from test_bad_input import assert_untouched, saved, snapshot, tiny_llama, with_delta
from time_limit import within

EXAMPLES = int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", "40"))
LIMIT = 10.0  # seconds per example: each takes milliseconds; the limit only has to catch a hang

FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# --- mutations ------------------------------------------------------------------------------------------------------
HOSTILE = [None, True, False, 0, -1, -5, 1, 2, 3, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 0.0, -0.5, 0.5, 1.5, 1e308,
           float("nan"), float("inf"), float("-inf"), "", " ", "0", "abc", "lora", "dense", "LORA", "none",
           "lora_only", "all", "all-linear", "q_proj", ".*", "((.)*)*Z", "(", "(?=x)", "x" * 2000, "\x1b[2J\u202e",
           "a\x00b", "../x", "/", [], {}, [1], ["q_proj"], [[[[[[]]]]]], {"kind": "lora"}, {"": 1},
           json.loads("[" * 300 + "]" * 300)]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(HOSTILE),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)


def paths_of(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON tree, as a tuple of keys / indices (the root is ())."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += paths_of(v, prefix + (i,))
    return out


class Doc:
    """A parsed file to mutate, shown by its name in hypothesis' reports (not as the whole tree)."""

    def __init__(self, name: str, tree: Any) -> None:
        self.name, self.tree = name, tree

    def __repr__(self) -> str:
        return f"<{self.name}>"


@st.composite
def mutated(draw, original: Doc, frozen: tuple[tuple, ...] = ()) -> tuple[Any, str]:
    """`original` with one field replaced, deleted, renamed or added; `frozen` paths (and what is under them) are
    never touched. Returns the tree and a description for failure reports."""
    tree = copy.deepcopy(original.tree)
    places = [p for p in paths_of(tree) if not any(p[:len(f)] == f for f in frozen)]
    path = draw(st.sampled_from(places))
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "rename", "add"]))
    parent = None
    node = tree
    for step in path:
        parent, node = node, node[step]
    if op == "replace" or not path and op in ("delete", "rename"):
        value = draw(json_values)
        if not path:
            return value, f"root = {value!r:.200}"
        parent[path[-1]] = value
        return tree, f"{path} = {value!r:.200}"
    if op == "delete" or op == "rename":
        key = path[-1]
        if isinstance(parent, list):
            del parent[key]
            return tree, f"delete {path}"
        value = parent.pop(key)
        if op == "rename":
            new = draw(st.text(max_size=10) | st.sampled_from(["kind", "r", "rank", "format", "modules", "path"]))
            parent[new] = value
            return tree, f"rename {path} -> {new!r}"
        return tree, f"delete {path}"
    target = node if isinstance(node, dict) else parent if isinstance(parent, dict) else None
    if target is None:
        return tree, "unchanged"
    key = draw(st.text(max_size=10))
    target[key] = draw(json_values)
    return tree, f"add {key!r} under {path}"


def write_json(file: Path, tree: Any) -> None:
    file.write_text(json.dumps(tree))


# --- the load must fail cleanly or be exactly right ----------------------------------------------------------------
def check_load(model: torch.nn.Module, before: dict, directory: Path, what: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with within(LIMIT, what):
            try:
                dt.load(model, directory, "fuzzed")
            except DeltaTuneError as e:
                event(f"refused: {type(e).__name__}")
                assert_untouched(model, before)
                return
        event("loaded")
        # loaded: the pieces hold exactly the file's tensors, and detaching gives the untouched model back
        read = dt.Delta.read(directory)
        held = dt.Delta.from_model(model, "fuzzed")
        for path, params in read.state.items():
            for key, t in params.items():
                mine = held.state[path][key]
                assert torch.equal(mine, t.to(mine.dtype)), f"{what}: {path}.{key} differs from the file"
    dt.detach(model, "fuzzed")
    dt.activate(model, "a")
    assert_untouched(model, before)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return with_delta(tiny_llama(), "a", dt.LoRA(r=2, targets=("q_proj",)), seed=1)


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory) -> tuple[Path, dict]:
    d = saved(tmp_path_factory.mktemp("fuzz-native"))
    return d, Doc("delta.json", json.loads((d / "delta.json").read_text()))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("fuzz-peft") / "adapter"
    src = with_delta(tiny_llama(), "p", dt.LoRA(r=4, alpha=8.0, rank_pattern={"v_proj": 2}), seed=2)
    write_peft(dt.Delta.from_model(src, "p"), d)
    (d / "deltatune_manifest.json").unlink()  # fuzz the parser, as for an adapter peft wrote (no integrity record)
    return d, Doc("adapter_config.json", json.loads((d / "adapter_config.json").read_text()))


def test_unmutated_files_load(model, native_dir, peft_dir):
    before = snapshot(model)
    for d, _ in (native_dir, peft_dir):
        dt.load(model, d, "fuzzed")
        dt.detach(model, "fuzzed")
        dt.activate(model, "a")
        assert_untouched(model, before)


@FUZZ
@given(data=st.data())
def test_fuzz_delta_json(model, native_dir, data):
    d, original = native_dir
    tree, what = data.draw(mutated(original))
    write_json(d / "delta.json", tree)
    check_load(model, snapshot(model), d, what)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(model, peft_dir, data):
    d, original = peft_dir
    tree, what = data.draw(mutated(original))
    write_json(d / "adapter_config.json", tree)
    check_load(model, snapshot(model), d, what)


# --- recipes ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_setup(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fuzz-recipe")
    for i, name in enumerate(("a", "b")):
        m = with_delta(tiny_llama(), name, dt.LoRA(r=2), seed=i + 3)
        dt.save(m, root / name, name)
    m = with_delta(tiny_llama(), "p", dt.LoRA(r=2), seed=5)
    write_peft(dt.Delta.from_model(m, "p"), root / "peft")
    recipe = {"method": "ties",
              "inputs": [{"path": str(root / "a"), "weight": 1.0, "density": 0.5},
                         {"path": str(root / "b"), "weight": 0.5, "density": 0.5},
                         {"path": str(root / "peft"), "weight": 0.25, "density": 0.5}],
              "parameters": {"lambda": 1.0},
              "modules": {"include": r".*\.(q|v)_proj", "exclude": r".*layers\.2\..*"},
              "output": {"path": str(root / "out"), "format": "delta", "storage": "lowrank", "rank": 2,
                         "name": "merged"}}
    return root, Doc("recipe", recipe)


def _pin_output(tree: Any, out: Path) -> Any:
    """Writing is not what is fuzzed here: whatever the mutation did, an output path stays in the test's directory."""
    if isinstance(tree, dict) and isinstance(tree.get("output"), dict) and "path" in tree["output"]:
        tree["output"]["path"] = str(out)
    return tree


def test_unmutated_recipe_runs(recipe_setup):
    root, recipe = recipe_setup
    summary = run_recipe(load_recipe(recipe.tree), progress=False)
    assert summary["modules"] > 0
    shutil.rmtree(root / "out")


@FUZZ
@given(data=st.data())
def test_fuzz_recipe(recipe_setup, data):
    root, original = recipe_setup
    tree, what = data.draw(mutated(original, frozen=(("output", "path"),)))
    tree = _pin_output(tree, root / "out")
    file = root / "recipe.yaml"
    file.write_text(yaml.safe_dump(tree, allow_unicode=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with within(LIMIT, what):
            try:
                run_recipe(load_recipe(file), progress=False)
            except DeltaTuneError as e:
                event(f"refused: {type(e).__name__}")
            else:
                event("merged")
                assert (root / "out").is_dir(), what
    shutil.rmtree(root / "out", ignore_errors=True)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "peft", "recipe.yaml"], what
