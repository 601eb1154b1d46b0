"""`deltatune merge recipe.yaml`: schema errors name the field and change nothing; every output format runs end to
end on tiny models and equals the formula (or, for the model format, the merged delta loaded on the base)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core.errors import ConfigError
from deltatune.io.peft import write_peft
from deltatune.merging import get_method
from deltatune.merging.combine import merge_deltas
from deltatune.merging.recipe import load_recipe, run_recipe

from conftest import Tiny, build_tiny
from test_merge_pipeline import formula_dw, loaded, lora_delta, perturbed, with_updates

ATOL = 1e-5
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "merge_ties.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tiny, Path, dict[str, dt.Delta]]:
    """A tiny llama base directory, a LoRA delta, a DoRA delta, a PEFT adapter and a 'fine-tuned' model directory."""
    root = tmp_path_factory.mktemp("recipe")
    tiny = build_tiny("llama")
    tiny.fresh().save_pretrained(root / "base")
    deltas = {"lora": lora_delta(tiny, 1), "dora": lora_delta(tiny, 2, dora=True), "peft": lora_delta(tiny, 3, r=2)}
    deltas["lora"].write(root / "lora")
    deltas["dora"].write(root / "dora")
    write_peft(deltas["peft"], root / "peft")
    perturbed(tiny, 4).save_pretrained(root / "model")
    return tiny, root, deltas


def recipe(root: Path, **changes) -> dict:
    r = {"method": "ties", "base": str(root / "base"),
         "inputs": [{"path": str(root / "lora"), "weight": 1.0, "density": 0.5},
                    {"path": str(root / "dora"), "weight": 0.5, "density": 0.5}],
         "parameters": {"lambda": 1.0},
         "output": {"path": str(root / "out"), "format": "delta", "storage": "lowrank", "rank": 4}}
    r.update(changes)
    return r


def invoke(root: Path, data: dict | str, name: str = "r.yaml"):
    path = root / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return CliRunner().invoke(app, ["merge", str(path), "--quiet"])


# --- schema errors: the field, what was expected, nothing written --------------------------------------------------
def _bad(root: Path) -> dict[str, tuple[dict | str, str]]:
    r = recipe(root)
    inputs3 = r["inputs"] + [{"path": str(root / "model"), "weight": "abc", "density": 0.5}]
    no_base = {k: v for k, v in recipe(root, inputs=r["inputs"][:1] + [{"path": str(root / "model"), "weight": 1.0,
                                                                        "density": 0.5}]).items() if k != "base"}
    return {
        "unknown-top": ({**r, "methd": "ties"}, r"methd: unknown field \(did you mean 'method'\?\); known fields: method, base, inputs"),
        "weight-type": (recipe(root, inputs=inputs3), r"inputs\[2\]\.weight: expected a number, got 'abc'"),
        "density-range": (recipe(root, inputs=[{**r["inputs"][0], "density": 1.5}, r["inputs"][1]]),
                          r"inputs\[0\]\.density: expected a number in \(0, 1\], got 1\.5"),
        "format": (recipe(root, output={"path": str(root / "out"), "format": "onnx"}),
                   r"output\.format: expected one of delta, peft, model, got 'onnx'$"),
        "model-input-no-base": (no_base, r"base: is required: inputs\[1\] is a model directory"),
        "dora-no-base": ({k: v for k, v in r.items() if k != "base"},
                         r"base: is required: inputs\[1\] \(.*dora'\) needs the base weights to express its update at "
                         r"'model\.layers\.0\.mlp\.down_proj' \(DoRA"),
        "regex": (recipe(root, modules={"include": "(["}), r"modules\.include: expected a regular expression"),
        "method": (recipe(root, method="tie"), r"method: unknown merge method 'tie' \(did you mean 'ties'\?\); known: .*ties"),
        "path": (recipe(root, inputs=[{"path": str(root / "nope")}]), r"inputs\[0\]\.path: .*does not exist"),
        "peft-storage": (recipe(root, output={"path": str(root / "out"), "format": "peft", "storage": "dense"}),
                         r"output\.storage: format peft stores LoRA factors: expected lowrank, got 'dense'"),
        "rank-missing": (recipe(root, output={"path": str(root / "out"), "storage": "lowrank"}), r"output\.rank: storage "
                                                                                                  r"lowrank needs rank"),
        "global-as-per-input": (recipe(root, inputs=[{**r["inputs"][0], "normalize": True}, r["inputs"][1]]),
                                r"inputs\[0\]\.normalize: 'normalize' is a global parameter of 'ties'"),
        "per-input-partial": (recipe(root, inputs=[r["inputs"][0], {"path": str(root / "dora"), "weight": 1.0}]),
                              r"inputs\[1\]\.density: is missing"),
        "global-type": (recipe(root, parameters={"lambda": "x"}), r"parameters\.lambda: expected a number, got 'x'"),
        "unknown-param": (recipe(root, parameters={"lamda": 1.0}), r"parameters\.lamda: merge method 'ties' has no "
                                                                   r"parameter 'lamda' \(did you mean 'lambda'\?\)"),
        "model-storage": (recipe(root, output={"path": str(root / "out"), "format": "model", "rank": 4}),
                          r"output\.rank: applies to format delta or peft"),
        "output-is-input": (recipe(root, output={"path": str(root / "lora")}), r"output\.path: is the directory of "
                                                                               r"inputs\[0\]"),
        "yaml": ("method: [ties\n", r"is not valid YAML"),
    }


CASES = ["unknown-top", "weight-type", "density-range", "format", "model-input-no-base", "dora-no-base", "regex",
         "method", "path", "peft-storage", "rank-missing", "global-as-per-input", "per-input-partial", "global-type",
         "unknown-param", "model-storage", "output-is-input", "yaml"]


@pytest.mark.parametrize("case", CASES)
def test_schema_errors_name_the_field(setup, case: str) -> None:
    _, root, _ = setup
    data, pattern = _bad(root)[case]
    before = sorted(p.name for p in root.iterdir())
    result = invoke(root, data, f"{case}.yaml")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: "), result.output
    assert re.search(pattern, result.output), result.output
    assert sorted(p.name for p in root.iterdir()) == sorted(before + [f"{case}.yaml"])  # nothing written
    (root / f"{case}.yaml").unlink()


# --- end to end, one per output format -------------------------------------------------------------------------------
def test_delta_output_equals_the_api(setup, tmp_path: Path) -> None:
    tiny, root, deltas = setup
    r = recipe(root, output={"path": str(tmp_path / "out"), "format": "delta", "storage": "lowrank", "rank": 4})
    result = invoke(tmp_path, r)
    assert result.exit_code == 0, result.output
    assert re.search(r"merged 2 inputs with ties: 6 modules merged; wrote delta \(lowrank\) to .* in", result.output)
    got = dt.Delta.read(tmp_path / "out")
    want = merge_deltas([deltas["lora"], deltas["dora"]], "ties", {"weight": [1.0, 0.5], "density": 0.5},
                        output="lowrank", rank=4, base=tiny.fresh(), progress=False)
    assert got.config.kind == "lora" and set(got.state) == set(want.state)
    for p in want.state:
        torch.testing.assert_close(got.update(p)[0].to_dense(), want.update(p)[0].to_dense(), atol=1e-6, rtol=0)


def test_values_written_as_text_mean_their_type(setup, tmp_path: Path) -> None:
    """YAML reads 1e-1 as a string and users quote numbers: the recipe means the declared types (core/coerce.py)."""
    tiny, root, deltas = setup
    text = (f"method: ties\nbase: {root / 'base'}\n"
            f"inputs:\n  - {{path: {root / 'lora'}, weight: '1.0', density: 5e-1}}\n"
            f"  - {{path: {root / 'dora'}, weight: 5e-1, density: '0.5'}}\n"
            f"parameters: {{lambda: '1', normalize: 'yes'}}\n"
            f"output: {{path: {tmp_path / 'out'}, storage: lowrank, rank: '4'}}\n")
    result = invoke(tmp_path, text)
    assert result.exit_code == 0, result.output
    got = dt.Delta.read(tmp_path / "out")
    want = merge_deltas([deltas["lora"], deltas["dora"]], "ties", {"weight": [1.0, 0.5], "density": 0.5},
                        output="lowrank", rank=4, base=tiny.fresh(), progress=False)
    for p in want.state:
        torch.testing.assert_close(got.update(p)[0].to_dense(), want.update(p)[0].to_dense(), atol=1e-6, rtol=0)
    bad = invoke(tmp_path, text.replace("rank: '4'", "rank: four"), "bad.yaml")
    assert bad.exit_code == 2 and bad.output == "error: output.rank: expected a positive integer or None, got 'four'\n"


def test_peft_output_loads_in_peft(setup, tmp_path: Path) -> None:
    from peft import PeftModel

    tiny, root, deltas = setup
    inputs = [{"path": str(root / "lora"), "weight": 0.3}, {"path": str(root / "peft"), "weight": 0.7}]
    r = recipe(root, method="task_arithmetic", inputs=inputs, parameters={},
               output={"path": str(tmp_path / "out"), "format": "peft", "rank": 6})
    del r["base"]  # plain LoRA inputs need no base
    result = invoke(tmp_path, r)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    want = {p: 0.3 * formula_dw(deltas["lora"], p) + 0.7 * formula_dw(deltas["peft"], p) for p in deltas["lora"].state}
    model = PeftModel.from_pretrained(tiny.fresh(), tmp_path / "out").eval()
    torch.testing.assert_close(tiny.logits(model), tiny.logits(with_updates(tiny, want)), atol=ATOL, rtol=0)


def test_model_output_from_mixed_inputs_equals_the_formula(setup, tmp_path: Path) -> None:
    tiny, root, deltas = setup
    inputs = [{"path": str(root / "dora"), "weight": 0.5}, {"path": str(root / "peft"), "weight": -0.25},
              {"path": str(root / "model"), "weight": 0.75}]
    r = recipe(root, method="task_arithmetic", inputs=inputs, parameters={"lambda": 2.0},
               modules={"exclude": "lm_head"},
               output={"path": str(tmp_path / "out"), "format": "model", "max_shard_bytes": 4096})
    result = invoke(tmp_path, r)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    merged = type(tiny.model).from_pretrained(tmp_path / "out").eval()
    base = tiny.fresh()
    ft = dict(type(tiny.model).from_pretrained(root / "model").named_parameters())
    want = {}
    with torch.no_grad():
        for name, w in base.named_parameters():
            module = name.rpartition(".")[0]
            tau = 0.75 * (ft[name] - w)
            if module in deltas["dora"].state and name.endswith("weight"):
                tau = tau + 0.5 * formula_dw(deltas["dora"], module, base) - 0.25 * formula_dw(deltas["peft"], module)
            want[name] = w if module == "lm_head" else w + 2.0 * tau
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-5, rtol=0, msg=name)


def test_fisher_tensors_from_files(setup, tmp_path: Path) -> None:
    """Tensor parameters come from safetensors files, one tensor per module path."""
    _, root, deltas = setup
    g = torch.Generator().manual_seed(0)
    fishers = []
    for i, name in enumerate(("lora", "peft")):
        f = {p: torch.rand(formula_dw(deltas[name], p).shape, generator=g) for p in deltas[name].state}
        save_file(f, str(tmp_path / f"f{i}.safetensors"))
        fishers.append(f)
    inputs = [{"path": str(root / "lora"), "fisher": str(tmp_path / "f0.safetensors")},
              {"path": str(root / "peft"), "fisher": str(tmp_path / "f1.safetensors")}]
    r = recipe(root, method="fisher", inputs=inputs, parameters={},
               output={"path": str(tmp_path / "out"), "format": "delta"})
    summary = run_recipe(load_recipe(r), progress=False)
    assert summary["modules"] == 6
    got = dt.Delta.read(tmp_path / "out")
    for p in deltas["lora"].state:
        taus = [formula_dw(deltas["lora"], p), formula_dw(deltas["peft"], p)]
        f0, f1 = fishers[0][p] + 1e-8, fishers[1][p] + 1e-8
        torch.testing.assert_close(got.update(p)[0].to_dense(), (f0 * taus[0] + f1 * taus[1]) / (f0 + f1),
                                   atol=1e-5, rtol=0)
    bad = {**r, "inputs": [inputs[0], {**inputs[1], "fisher": 3}]}
    with pytest.raises(ConfigError, match=r"inputs\[1\]\.fisher: expected the path of a safetensors file"):
        load_recipe(bad)


def test_example_recipe_runs(setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """examples/merge_ties.yaml as shipped, with its two input directories made from tiny deltas."""
    tiny, root, deltas = setup
    data = yaml.safe_load(EXAMPLE.read_text())
    monkeypatch.chdir(tmp_path)
    for item, name in zip(data["inputs"], ("lora", "peft")):
        deltas[name].write(tmp_path / item["path"])
    result = CliRunner().invoke(app, ["merge", str(EXAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    out = tmp_path / data["output"]["path"]
    got = dt.Delta.read(out)
    ties = get_method(data["method"])
    for p in deltas["lora"].state:
        want = ties([formula_dw(deltas["lora"], p), formula_dw(deltas["peft"], p)], density=0.5)
        u, s, vh = torch.linalg.svd(want.double(), full_matrices=False)
        k = data["output"]["rank"]
        torch.testing.assert_close(got.update(p)[0].to_dense().double(), (u[:, :k] * s[:k]) @ vh[:k], atol=1e-5, rtol=0)
    assert math.isfinite(float(yaml.safe_load(result.output)["seconds"]))
