"""mergekit as an oracle: on float32 checkpoints our full-model merges equal mergekit's, tensor for tensor.

mergekit is a bench/test-only dependency; these tests skip without it. DARE is random and mergekit draws its
masks differently, so only the deterministic methods are compared.
"""
from __future__ import annotations

import pytest
import torch

from conftest import build_tiny
from deltatune.io.checkpoints import CheckpointReader
from deltatune.merging import merge_models

pytest.importorskip("mergekit")
N_TUNED = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    model = build_tiny("llama").model
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(N_TUNED):
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name])
                if p.dim() == 2 and "embed" not in name:  # fine-tune the linear layers only (head tied)
                    p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        model.save_pretrained(root / f"tuned{i}")
    return root


def _mergekit(root, method: str, models: list[dict], parameters: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(root / "base"), "dtype": "float32", "parameters": parameters,
        "models": [{"model": str(root / f"tuned{i}"), "parameters": m} for i, m in enumerate(models)]})
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


CASES = {
    "ties": ([{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.5}, {"weight": 0.8, "density": 0.2}],
             {"normalize": True}),
    "ties-unnormalized": ([{"weight": 0.7, "density": 0.4}] * N_TUNED, {"normalize": False, "lambda": 0.6}),
    "task_arithmetic": ([{"weight": 0.3}, {"weight": -0.2}, {"weight": 0.9}], {"lambda": 0.8}),
    "breadcrumbs_ties": ([{"weight": 1.0, "density": 0.5, "gamma": 0.05}] * N_TUNED, {"normalize": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_mergekit(checkpoints, tmp_path, case):
    method = case.split("-")[0]  # "ties-unnormalized" -> ties
    per_input, params = CASES[case]
    _mergekit(checkpoints, method, per_input, params, tmp_path / "mk")
    ours_params = {**params, "per_row": False} if method.startswith("breadcrumbs") else params  # mergekit: whole tensor
    merge_models(checkpoints / "base", [checkpoints / f"tuned{i}" for i in range(N_TUNED)], method,
                 ours_params, tmp_path / "ours", per_input=per_input, progress=False)
    ours, theirs, base = CheckpointReader(tmp_path / "ours"), CheckpointReader(tmp_path / "mk"), CheckpointReader(checkpoints / "base")
    compared = changed = 0
    for key in base.keys():
        if key not in theirs:
            continue
        a, b = ours.get(key), theirs.get(key)
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{case}: {key}")
        compared += 1
        changed += int(not torch.equal(a, base.get(key)))
    assert compared >= 10 and changed >= 10  # the comparison covered the merged linear layers
