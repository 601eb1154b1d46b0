"""Hostile input (issue 18, items 3, 5 and the reading side of 8): no file makes deltatune hang or exhaust memory,
and every malformed field is a typed error naming the file, the field and what was expected — through the API with
the model bitwise untouched, and through the CLI as one `error:` line with exit status 2. Every case runs under a
hard time limit (`time_limit.within`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core import regex
from deltatune.core.errors import (ConfigError, CorruptFileError, DeltaTuneError, ShapeMismatchError,
                                   UnsupportedError)
from deltatune.core.parsing import MAX_DEPTH, load_yaml, short
from deltatune.io.peft import write_peft
from deltatune.merging.recipe import load_recipe, run_recipe

from test_bad_input import assert_untouched, rewrite_json, saved, snapshot, tiny_llama, with_delta
from time_limit import within
from train_fixtures import save_bert_dir, sentiment, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FAST = 5.0  # seconds: every refusal here takes milliseconds; the limit only has to catch a hang


def typed(exc: type[DeltaTuneError], fn, *substrings: str, seconds: float = FAST) -> str:
    """fn() raises `exc` within `seconds`, with every substring in its message; returns the message."""
    with within(seconds, "the refusal"), pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


def fails_untouched(model, exc, fn, *substrings: str) -> str:
    before = snapshot(model)
    msg = typed(exc, fn, *substrings)
    assert_untouched(model, before)
    return msg


def cli(*args: str, seconds: float = 30.0):
    with within(seconds, "the command"):
        return CliRunner().invoke(app, list(args))


def one_error_line(result, *substrings: str) -> str:
    """The CLI refused with exit status 2 and exactly one `error:` line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for s in substrings:
        assert s in lines[0], f"{s!r} not in {lines[0]!r}"
    return lines[0]


# --- YAML: alias trees and deep nesting ------------------------------------------------------------------------------
def laughs(levels: int = 9) -> str:
    """A flow sequence whose last item expands to 9**levels strings, in ~400 bytes ("billion laughs")."""
    parts = ['&l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        parts.append(f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "[" + ", ".join(parts) + "]"


@pytest.fixture(scope="module")
def deltas(tmp_path_factory) -> Path:
    """Two small native deltas and a PEFT adapter of the same tiny Llama."""
    root = tmp_path_factory.mktemp("hostile")
    for i, name in enumerate(("a", "b")):
        m = with_delta(tiny_llama(), name, dt.LoRA(r=2), seed=i + 1)
        dt.save(m, root / name, name)
    m = with_delta(tiny_llama(), "p", dt.LoRA(r=2), seed=3)
    write_peft(dt.Delta.from_model(m, "p"), root / "peft")
    return root


def recipe_text(root: Path, placement: str) -> str:
    v = laughs()
    a, b, out = root / "a", root / "b", root / "out"
    texts = {
        "method": f"method: {v}\ninputs: [{a}, {b}]\noutput: {{path: {out}}}\n",
        "top-level list": v + "\n",
        "parameters": f"method: task_arithmetic\ninputs: [{a}, {b}]\nparameters: {v}\noutput: {{path: {out}}}\n",
        "output.name": f"method: task_arithmetic\ninputs: [{a}, {b}]\noutput: {{path: {out}, name: {v}}}\n",
        "modules.include": f"method: task_arithmetic\ninputs: [{a}, {b}]\nmodules: {{include: {v}}}\n"
                           f"output: {{path: {out}}}\n",
        "inputs[*].weight": f"method: task_arithmetic\ninputs: [{{path: {a}, weight: {v}}}, {{path: {b}, weight: *l8}}]\n"
                            f"output: {{path: {out}}}\n",
        "inputs[0].path": f"method: task_arithmetic\ninputs: [{{path: {v}}}, {b}]\noutput: {{path: {out}}}\n",
    }
    return texts[placement]


PLACEMENTS = ["method", "top-level list", "parameters", "output.name", "modules.include", "inputs[*].weight",
              "inputs[0].path"]


def test_billion_laughs_is_small():
    assert len(laughs()) < 450


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_billion_laughs_recipe_refused_fast(deltas, tmp_path, placement):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(deltas, placement))
    typed(ConfigError, lambda: load_recipe(path), str(path), "billion laughs", seconds=2.0)
    res = cli("merge", str(path), "--quiet", seconds=10.0)
    one_error_line(res, "billion laughs")
    assert not (deltas / "out").exists()


def test_alias_trees_below_the_bound_still_load():
    """Aliases are YAML: a recipe may share a value; only the expansion is bounded."""
    data = load_yaml("x: &w {weight: 0.5}\ninputs: [*w, *w]\n", "test")
    assert data["inputs"] == [{"weight": 0.5}, {"weight": 0.5}]


def test_recipe_given_as_shared_python_structure_refused_fast(deltas):
    """load_recipe(dict) bounds a dict built in code the same way (shared lists, cycles)."""
    leaf: list = ["lol"] * 9
    for _ in range(8):
        leaf = [leaf] * 9
    typed(ConfigError, lambda: load_recipe({"method": "ties", "inputs": leaf}), "100000 values", seconds=2.0)
    cycle: dict = {"method": "ties"}
    cycle["inputs"] = [cycle]
    typed(ConfigError, lambda: load_recipe(cycle), "deep", seconds=2.0)


def test_messages_show_bounded_values():
    leaf: list = ["lol"] * 9
    for _ in range(8):
        leaf = [leaf] * 9  # 9**9 strings, shared
    with within(1.0, "short()"):
        text = short(leaf, 60)
    assert len(text) <= 60 and text.startswith("[[")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 10_000])
def test_deep_recipe_refused(tmp_path, depth):
    path = tmp_path / "deep.yaml"
    path.write_text("method: " + "[" * depth + "]" * depth + "\n")
    typed(ConfigError, lambda: load_recipe(path), "deep", str(path))
    one_error_line(cli("merge", str(path), "--quiet"), "deep")


def test_deep_block_style_recipe_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("method: ties\nparameters:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(500)))
    typed(ConfigError, lambda: load_recipe(path), "deep", str(path))


def test_deep_training_config_refused(tmp_path):
    from deltatune.train.config import TrainConfig

    path = tmp_path / "run.yaml"
    path.write_text("delta: " + "[" * 10_000 + "]" * 10_000 + "\n")
    typed(ConfigError, lambda: TrainConfig.from_yaml(path), "deep", "training config")
    path.write_text(f"delta: {laughs()}\n")
    typed(ConfigError, lambda: TrainConfig.from_yaml(path), "billion laughs")


def test_cli_yaml_options_bounded(tmp_path):
    res = cli("train", "--delta", laughs(), "--model", "x", "--data", "y")
    one_error_line(res, "--delta", "billion laughs")
    res = cli("train", "--delta", "{kind: lora", "--model", "x", "--data", "y")
    one_error_line(res, "--delta", "YAML")
    res = cli("train", "--set", "lr=" + "[" * 5000 + "]" * 5000, "--model", "x", "--data", "y")
    one_error_line(res, "--set 'lr'", "deep")


# --- JSON depth -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200_000])
def test_deep_delta_json(model_and_delta, depth):
    model, d = model_and_delta
    (d / "delta.json").write_text("[" * depth + "]" * depth)
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(d / "delta.json"), "deep")


def test_deep_value_inside_delta_json(model_and_delta):
    model, d = model_and_delta
    rewrite_json(d, lambda meta: meta["config"].update(targets=json.loads("[" * 500 + "]" * 500)))
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "deep")


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200_000])
def test_deep_adapter_config(model_and_peft, depth):
    model, d = model_and_peft
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "x": ' + "[" * depth + "]" * depth + "}")
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(d / "adapter_config.json"), "deep")


def test_deep_json_in_other_files(tmp_path):
    from deltatune.io.checkpoints import CheckpointReader
    from deltatune.train.data import read_table

    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "data.json").write_text(deep)
    typed(ConfigError, lambda: read_table(tmp_path / "data.json"), "deep")
    (tmp_path / "data.jsonl").write_text('{"text": "a", "label": 0}\n' + deep + "\n")
    typed(ConfigError, lambda: read_table(tmp_path / "data.jsonl"), "line 2", "deep")
    (tmp_path / "rows.json").write_text('[{"text": "a"}, 5]')
    typed(ConfigError, lambda: read_table(tmp_path / "rows.json"), "example 1", "JSON object")
    model_dir = tmp_path / "m"
    tiny_llama().save_pretrained(model_dir)
    (model_dir / "model.safetensors.index.json").write_text(deep)
    typed(CorruptFileError, lambda: CheckpointReader(model_dir), "deep")
    (model_dir / "model.safetensors.index.json").write_text('{"weight_map": {"w": "../../etc/passwd"}}')
    typed(CorruptFileError, lambda: CheckpointReader(model_dir), "shard file names in the same directory")


def test_deep_safetensors_header(model_and_delta):
    model, d = model_and_delta
    header = ("[" * 200_000 + "]" * 200_000).encode()
    data = len(header).to_bytes(8, "little") + header
    (d / "delta.safetensors").write_bytes(data)
    rewrite_json(d, lambda meta: meta["tensors"].update(bytes=len(data)))
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "delta.safetensors")


# --- regexes from files -----------------------------------------------------------------------------------------------
CATASTROPHIC = [r"((.)*)*Z", r"(a|a)*Z", r"(.*)*\.Z", r".*.*.*.*.*.*.*.*.*.*.*.*Z", r"(\w+\.?)+Z"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_backtracking_patterns_run_in_linear_time(pattern):
    path = "model.layers.0.self_attn.q_proj" * 8
    with within(1.0, pattern):
        assert regex.fullmatch(pattern, path) is False
        assert regex.suffix_match(pattern, path) is False


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_rank_pattern_key_in_adapter_config(model_and_peft, pattern):
    """PEFT's rank_pattern key is matched against every module path: fast, and here it matches nothing."""
    model, d = model_and_peft
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {pattern: 7}
    cfg["alpha_pattern"] = {pattern: 3.0}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with within(FAST, "dt.load"):
        dt.load(model, d, "new")
    assert dt.Delta.from_model(model, "new").config.resolve("model.layers.0.self_attn.q_proj").r == 2


@pytest.mark.parametrize("where", ["targets", "exclude", "rank_pattern"])
def test_delta_config_patterns_bounded(model_and_delta, where):
    model, d = model_and_delta
    evil = "((.)*)*Z"
    if where == "rank_pattern":
        rewrite_json(d, lambda meta: meta["config"].update(rank_pattern={evil: 3}))
        with within(FAST):
            dt.load(model, d, "new")
        return
    rewrite_json(d, lambda meta: meta["config"].update(**{where: evil}))
    with within(FAST):
        try:
            dt.load(model, d, "new")
        except DeltaTuneError:
            pass


def test_recipe_include_pattern_bounded(deltas, tmp_path):
    r = {"method": "task_arithmetic", "inputs": [str(deltas / "a"), str(deltas / "b")],
         "modules": {"include": "((.)*)*Z"}, "output": {"path": str(tmp_path / "out")}}
    with within(FAST):
        with pytest.raises(DeltaTuneError, match="keep none"):
            run_recipe(load_recipe(r), progress=False)


@pytest.mark.parametrize("pattern, what", [("(?=q)q_proj", "lookahead"), (r"(q)\1", "backreference"),
                                           ("q++", "possessive"), ("(?>q)", "atomic"), ("a{30000}", "too large"),
                                           ("(" * 200 + ")" * 200, "deep")])
def test_non_regular_patterns_refused_with_the_field(pattern, what):
    typed(ConfigError, lambda: dt.LoRA(targets=pattern), "LoRA.targets", what)
    typed(ConfigError, lambda: dt.LoRA(rank_pattern={pattern: 2}), "LoRA.rank_pattern", what)


def test_pattern_refused_in_adapter_config(model_and_peft):
    model, d = model_and_peft
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"(?=q)q_proj": 4}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "rank_pattern", "lookahead",
                    str(d))


# --- tensor files: sized against the manifest, memory-mapped ------------------------------------------------------------
def test_huge_sparse_tensor_file_rejected_fast(model_and_delta):
    model, d = model_and_delta
    f = d / "delta.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(1 << 30)  # 1 GiB, sparse: costs no disk
    msg = fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f), "records")
    assert str(1 << 30) in msg


def test_huge_sparse_peft_weights_rejected_fast(model_and_peft):
    model, d = model_and_peft
    with open(d / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(1 << 30)
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "adapter_model.safetensors")


RSS_SCRIPT = r"""
import resource, sys, time
import deltatune as dt
from deltatune.core.errors import CorruptFileError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    dt.Delta.read(sys.argv[1])
except CorruptFileError:
    pass
else:
    raise SystemExit("not refused")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, time.perf_counter() - start)
"""


@pytest.mark.parametrize("fmt", ["native", "peft"])
def test_huge_tensor_file_costs_no_memory(tmp_path, fmt):
    """In a fresh process (so the peak RSS is this read's): rejecting a 1 GiB file grows the peak by < 32 MiB."""
    d = saved(tmp_path)
    if fmt == "peft":
        m = with_delta(tiny_llama(), "p")
        d = tmp_path / "peft"
        write_peft(dt.Delta.from_model(m, "p"), d)
    name = "delta.safetensors" if fmt == "native" else "adapter_model.safetensors"
    with open(d / name, "r+b") as fh:
        fh.truncate(1 << 30)
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(d)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-2000:]
    grown_kib, seconds = done.stdout.split()
    assert int(grown_kib) < 32 * 1024, f"peak RSS grew by {int(grown_kib) // 1024} MiB"
    assert float(seconds) < 2.0


@pytest.mark.parametrize("damage", ["gap", "overlap", "past-end", "dtype", "shape", "header-length", "metadata"])
def test_safetensors_header_checked_before_reading(model_and_peft, damage):
    model, d = model_and_peft
    f = d / "adapter_model.safetensors"
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    body = raw[8 + n:]
    if damage == "gap":
        body += b"\0" * 8
    elif damage == "overlap":
        other = next(k for k in header if k not in ("__metadata__", key))
        header[other]["data_offsets"] = header[key]["data_offsets"]
    elif damage == "past-end":
        header[key]["data_offsets"][1] += 4
    elif damage == "dtype":
        header[key]["dtype"] = "PICKLE"
    elif damage == "shape":
        header[key]["shape"] = ["2", 3]
    elif damage == "metadata":
        header["__metadata__"] = {"format": ["pt"]}
    text = json.dumps(header).encode()
    n_new = len(text) if damage != "header-length" else len(raw) * 4
    f.write_bytes(n_new.to_bytes(8, "little") + text + body)
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), str(f))


# --- fixtures -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def model_and_delta(tmp_path):
    """A tiny Llama carrying delta 'a' (active), and a native delta directory of another tiny Llama."""
    m = with_delta(tiny_llama(), "a", seed=1)
    return m, saved(tmp_path)


@pytest.fixture
def model_and_peft(tmp_path):
    m = with_delta(tiny_llama(), "a", seed=1)
    src = with_delta(tiny_llama(), "p", dt.LoRA(r=2), seed=2)
    d = tmp_path / "peft"
    write_peft(dt.Delta.from_model(src, "p"), d)
    (d / "deltatune_manifest.json").unlink()  # these tests edit the files by hand, as for an adapter peft wrote
    return m, d


# --- item 6: tracebacks that are typed errors now --------------------------------------------------------------------
NATIVE_CASES = {
    "tensors-list": (lambda m: m.update(tensors=[]), CorruptFileError, ["tensors", "object"]),
    "base-list": (lambda m: m.update(base=[]), CorruptFileError, ["base", "object"]),
    "weight-shapes-list": (lambda m: m["base"].update(weight_shapes=[1]), CorruptFileError, ["base.weight_shapes"]),
    "modules-null": (lambda m: m.update(modules=None), CorruptFileError, ["modules", "None"]),
    "kind-list": (lambda m: m["config"].update(kind=["lora"]), ConfigError, ["unknown delta kind", "['lora']"]),
    "shape-of-missing-module": (lambda m: m["base"]["weight_shapes"].update({"model.nope": [4, 4]}), CorruptFileError,
                                ["base.weight_shapes", "model.nope", "not listed"]),
    "module-info-list": (lambda m: m["modules"].update({next(iter(m["modules"])): [1]}), CorruptFileError,
                         ["modules["]),
    "params-not-list": (lambda m: m["modules"][next(iter(m["modules"]))].update(params=5), CorruptFileError,
                        [".params", "list of parameter names"]),
    "bytes-string": (lambda m: m["tensors"].update(bytes="12"), CorruptFileError, ["tensors.bytes"]),
    "sha-short": (lambda m: m["tensors"].update(sha256="abc"), CorruptFileError, ["tensors.sha256", "64 hex"]),
    "file-traversal": (lambda m: m["tensors"].update(file="../x.safetensors"), CorruptFileError, ["tensors.file"]),
    "file-nul": (lambda m: m["tensors"].update(file="a\0.safetensors"), CorruptFileError, ["tensors.file"]),
    "name-list": (lambda m: m.update(name=["x"]), CorruptFileError, ["name", "string"]),
    "model-class-number": (lambda m: m["base"].update(model_class=3), CorruptFileError, ["base.model_class"]),
    "format-version-0": (lambda m: m.update(format_version=0), CorruptFileError, ["format_version", "from 1 to"]),
    "format-version-negative": (lambda m: m.update(format_version=-5), CorruptFileError, ["format_version", "-5"]),
    "format-version-bool": (lambda m: m.update(format_version=True), CorruptFileError, ["format_version", "True"]),
    "format-version-missing": (lambda m: m.pop("format_version"), CorruptFileError, ["format_version"]),
    "kind-disagrees": (lambda m: m.update(kind="dense"), CorruptFileError, ["kind", "'lora'", "'dense'"]),
    "tensors-missing": (lambda m: m.pop("tensors"), CorruptFileError, ["'tensors'"]),
    "huge-int": (None, CorruptFileError, ["JSON"]),
}


@pytest.mark.parametrize("case", list(NATIVE_CASES))
def test_malformed_delta_json_fields(model_and_delta, case):
    model, d = model_and_delta
    edit, exc, words = NATIVE_CASES[case]
    if edit is None:
        (d / "delta.json").write_text('{"format": "deltatune.delta", "format_version": ' + "9" * 5000 + "}")
    else:
        rewrite_json(d, edit)
    msg = fails_untouched(model, exc, lambda: dt.load(model, d, "new"), str(d / "delta.json"), *words)
    res = cli("inspect", str(d))
    one_error_line(res, "delta.json")
    assert msg  # the API message and the CLI line name the same file


def _lora_tensors_as(d: Path, name: str, dtype: torch.dtype, fix_json: bool) -> None:
    f = d / name
    tensors = {k: (v * 10).to(dtype) for k, v in load_file(f).items()}
    save_file(tensors, f, metadata={"format": "deltatune.delta"})
    if fix_json:
        import hashlib

        data = f.read_bytes()
        rewrite_json(d, lambda meta: meta["tensors"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_and_bool_lora_factors_refused(model_and_delta, model_and_peft, dtype):
    model, d = model_and_delta
    _lora_tensors_as(d, "delta.safetensors", dtype, fix_json=True)
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "floating-point", str(dtype).split(".")[1])
    with pytest.raises(CorruptFileError, match="floating point"):
        dt.Delta.read(d).tensors()
    model, p = model_and_peft
    _lora_tensors_as(p, "adapter_model.safetensors", dtype, fix_json=False)
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, p, "new"), "floating point", str(p))


PEFT_CASES = {
    "dropout-string": ({"lora_dropout": "abc"}, ["lora_dropout", "a number", "'abc'"]),
    "dropout-list": ({"lora_dropout": [0.1]}, ["lora_dropout", "a number"]),
    "dropout-range": ({"lora_dropout": 1.5}, ["dropout"]),
    "modules-to-save-int": ({"modules_to_save": 5}, ["modules_to_save", "list of module names"]),
    "modules-to-save-ints": ({"modules_to_save": [5]}, ["modules_to_save"]),
    "dora-string": ({"use_dora": "false"}, ["use_dora", "true or false"]),
    "rslora-number": ({"use_rslora": 1}, ["use_rslora"]),
    "bias-list": ({"bias": ["none"]}, ["bias"]),
    "r-string": ({"r": "8"}, ["r="]),
    "alpha-null": ({"lora_alpha": None}, ["lora_alpha"]),
    "rank-pattern-list": ({"rank_pattern": ["q"]}, ["rank_pattern"]),
    "rank-pattern-value": ({"rank_pattern": {"q_proj": "big"}}, ["rank_pattern"]),
    "base-name-number": ({"base_model_name_or_path": 7}, ["base_model_name_or_path"]),
    "auto-mapping-list": ({"auto_mapping": [1]}, ["auto_mapping"]),
    "auto-mapping-class": ({"auto_mapping": {"base_model_class": [1]}}, ["auto_mapping.base_model_class"]),
    "init-number": ({"init_lora_weights": 3}, ["init_lora_weights"]),
    "peft-type-list": ({"peft_type": ["LORA"]}, ["peft_type", "['LORA']"]),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_malformed_adapter_config_fields(model_and_peft, case):
    model, d = model_and_peft
    cfg = json.loads((d / "adapter_config.json").read_text())
    edit, words = PEFT_CASES[case]
    cfg.update(edit)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    fails_untouched(model, DeltaTuneError, lambda: dt.load(model, d, "new"), str(d), *words)
    one_error_line(cli("inspect", str(d)), str(d))


def test_adapter_config_not_utf8(model_and_peft):
    model, d = model_and_peft
    (d / "adapter_config.json").write_bytes(b'{"peft_type": "\xff"}')
    fails_untouched(model, CorruptFileError, lambda: dt.load(model, d, "new"), "UTF-8")


# --- inspect: names from files are printed escaped -----------------------------------------------------------------------
def test_inspect_escapes_terminal_sequences(tmp_path):
    d = saved(tmp_path)
    evil = "x\x1b[2J\x1b]0;pwned\x07\u202e"
    rewrite_json(d, lambda meta: (meta.update(name=evil), meta["base"].update(model_class=evil, model_name=evil)))
    res = cli("inspect", str(d))
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "\u202e" not in res.stdout
    assert "\\x1b[2J" in res.stdout
    res = cli("inspect", str(d), "--json")
    assert "\x1b" not in res.stdout and json.loads(res.stdout)["name"] == evil
    (d / "delta.json").write_text(json.dumps({"format": "deltatune.delta", "format_version": "\x1b[31m"}))
    line = one_error_line(cli("inspect", str(d)))
    assert "\x1b" not in line


# --- eval --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_bert_dir(root / "model")
    data = write_jsonl(root / "data.jsonl", sentiment(60, 3))
    return root, model_dir, data


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail if any evaluation starts: the arguments must be refused before."""
    import deltatune.train.evaluation as ev

    def forbid(*a, **k):
        raise AssertionError("the evaluation ran before the argument was checked")

    monkeypatch.setattr(ev, "load_model", forbid)
    monkeypatch.setattr(ev, "evaluate_classification", forbid)
    monkeypatch.setattr(ev, "evaluate_generation", forbid)


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_eval_limit_must_be_positive(eval_setup, no_evaluation, limit):
    root, model_dir, data = eval_setup
    one_error_line(cli("eval", "--model", str(model_dir), "--data", str(data), "--limit", limit), "limit", limit)


def test_eval_output_checked_before_evaluating(eval_setup, no_evaluation, tmp_path):
    root, model_dir, data = eval_setup
    out = tmp_path / "missing" / "metrics.json"
    one_error_line(cli("eval", "--model", str(model_dir), "--data", str(data), "--output", str(out)),
                   str(tmp_path / "missing"), "does not exist")
    one_error_line(cli("eval", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path)),
                   "is a directory")


def test_eval_delta_checked_before_evaluating(eval_setup, no_evaluation, tmp_path):
    root, model_dir, data = eval_setup
    one_error_line(cli("eval", "--model", str(model_dir), "--data", str(data), "--delta", str(tmp_path / "nope")),
                   "does not exist")


@pytest.mark.parametrize("missing", ["weights", "tokenizer", "config"])
def test_eval_model_dir_incomplete(eval_setup, tmp_path, missing):
    import shutil

    root, model_dir, data = eval_setup
    m = tmp_path / "m"
    shutil.copytree(model_dir, m)
    gone = {"weights": ["model.safetensors"], "tokenizer": ["tokenizer.json"], "config": []}[missing]
    for name in gone:
        (m / name).unlink()
    if missing == "config":
        (m / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    word = {"weights": "no safetensors weights", "tokenizer": "no tokenizer", "config": "deep"}[missing]
    one_error_line(cli("eval", "--model", str(m), "--data", str(data)), str(m), word)


def test_eval_good_output_written(eval_setup, tmp_path):
    root, model_dir, data = eval_setup
    out = tmp_path / "metrics.json"
    res = cli("eval", "--model", str(model_dir), "--data", str(data), "--limit", "3", "--output", str(out), seconds=60)
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["examples"] == 3


def test_eval_data_not_json(eval_setup, tmp_path):
    root, model_dir, data = eval_setup
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff\xfe", "label": 0}\n')
    one_error_line(cli("eval", "--model", str(model_dir), "--data", str(bad)), "UTF-8")


# --- the CLI: OS errors are user errors too ----------------------------------------------------------------------------
def test_cli_os_error_is_one_line(tmp_path, monkeypatch):
    import deltatune.io.inspect as insp

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(insp, "describe", denied)
    one_error_line(cli("inspect", str(tmp_path)), "Permission denied", str(tmp_path))


def test_cli_multiline_message_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: [ties\n  inputs: {\n")
    one_error_line(cli("merge", str(path)), "YAML")


# --- recipes: NUL characters and non-string keys --------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["base", "output.path", "inputs[0].path"])
def test_recipe_nul_in_paths(deltas, field):
    r = {"method": "task_arithmetic", "inputs": [str(deltas / "a"), str(deltas / "b")],
         "output": {"path": str(deltas / "out")}}
    if field == "base":
        r["base"] = "x\0y"
    elif field == "output.path":
        r["output"]["path"] = "x\0y"
    else:
        r["inputs"][0] = {"path": "x\0y"}
    typed(ConfigError, lambda: load_recipe(r), field, "NUL")


def test_time_limit_helper_catches_a_hang():
    from time_limit import TimeLimitExceeded

    start = time.perf_counter()
    with pytest.raises(TimeLimitExceeded):
        with within(0.2):
            while True:
                pass
    assert time.perf_counter() - start < 2


def test_half_precision_factors_still_load():
    """The dtype rule refuses other kinds of values, not other widths: float16 factors load as before."""
    from deltatune.io.files import apply

    src = with_delta(tiny_llama(), "h", dt.LoRA(r=2), seed=4)
    delta = dt.Delta.from_model(src, "h")
    delta.state = {p: {k: v.half() for k, v in st.items()} for p, st in delta.state.items()}
    fresh = tiny_llama()
    apply(fresh, delta)
    assert dt.active_names(fresh) == ("h",)


def test_shape_error_class_unchanged(model_and_delta):
    """The old checks still come first for what they caught (the shapes), with their own error class."""
    model, d = model_and_delta
    rewrite_json(d, lambda meta: meta["config"].update(r=8))
    fails_untouched(model, ShapeMismatchError, lambda: dt.load(model, d, "new"), "in the file")


def test_unsupported_version_still_unsupported(model_and_delta):
    model, d = model_and_delta
    rewrite_json(d, lambda meta: meta.update(format_version=2))
    fails_untouched(model, UnsupportedError, lambda: dt.load(model, d, "new"), "upgrade")


def test_finiteness_check_fast_path_and_its_fallback():
    """One fused pass per dtype; a finite tensor whose norm overflows falls back to the exact per-tensor check."""
    from deltatune.errors import NonFiniteError
    from deltatune.io.safetensors_io import check_finite

    big = torch.full((4, 4), 3e38)  # finite, but its norm is inf in float32
    check_finite({"a": big, "b": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(3)}, "here")
    for bad in (float("nan"), float("inf")):
        t = torch.ones(5)
        t[2] = bad
        with pytest.raises(NonFiniteError, match="'b'.*1 NaN/inf"):
            check_finite({"a": big, "b": t}, "here")
