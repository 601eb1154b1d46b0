"""`deltatune eval` of a training run's delta: the run's data options are used (issue 17 item 8), and a
classification delta without its head is refused instead of evaluated with a random head."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune.train.evaluation as evaluation
from deltatune.cli import app
from deltatune.core.errors import ConfigError
from deltatune.merging.recipe import load_recipe, run_recipe
from deltatune.train import train
from deltatune.train.evaluation import run_eval

from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """An encoder without a head (as the zoo's MiniLM), data whose text is in column `body`, and a run with
    max_length 4 (CLS + 3 of the 6 words) trained on it."""
    root = tmp_path_factory.mktemp("evalrun")
    encoder = root / "encoder"
    tiny_bert().bert.save_pretrained(encoder)
    word_tokenizer().save_pretrained(encoder)
    data = write_jsonl(root / "data.jsonl", [{"body": r["text"], "label": r["label"]} for r in sentiment(160, 4)])
    result = train({"model": str(encoder), "data": str(data), "text_column": "body", "max_length": 4,
                    "output_dir": str(root / "run"), "max_steps": 30, "batch_size": 8, "lr": 1e-2,
                    "delta": {"kind": "lora", "r": 4}, "progress": False, "plot": False})
    return root, encoder, data, result


def test_eval_uses_the_runs_data_options(run, monkeypatch) -> None:
    root, encoder, data, result = run
    seen = []
    real = evaluation.evaluate_classification
    monkeypatch.setattr(evaluation, "evaluate_classification",
                        lambda *a, **k: seen.append(a[5]) or real(*a, **k))  # (net, tok, examples, n, batch, max_length)
    metrics = run_eval(None, None, result.delta_path)  # model, data, text_column, max_length, seed: the run's
    assert seen == [4] and metrics["max_length"] == 4 and metrics["model"] == str(encoder)
    assert metrics["accuracy"] == result.metrics["test_accuracy"]  # the same split, read the same way
    assert run_eval(str(encoder), str(data), result.delta_path, max_length=6)["max_length"] == 6  # flags override
    alone = root / "copied-delta"  # outside its run directory: nothing says the text is in `body`
    shutil.copytree(result.delta_path, alone)
    with pytest.raises(Exception, match="text"):
        run_eval(str(encoder), str(data), alone)


def test_classification_delta_without_its_head_is_refused(run, tmp_path: Path) -> None:
    root, encoder, data, result = run
    recipe = {"method": "task_arithmetic", "inputs": [{"path": str(result.delta_path)}],
              "modules": {"exclude": ".*classifier.*"}, "output": {"path": str(tmp_path / "headless")}}
    run_recipe(load_recipe(recipe), progress=False)
    data = write_jsonl(tmp_path / "text.jsonl", sentiment(40, 5))  # column `text`: this delta is in no run directory
    with pytest.raises(ConfigError, match=r"holds no classification head: classifier would keep its random "
                                          r"initialisation.*modules_to_save"):
        run_eval(str(encoder), str(data), tmp_path / "headless")
    res = CliRunner().invoke(app, ["eval", "--model", str(encoder), "--data", str(data), "--delta",
                                   str(tmp_path / "headless")])
    last = res.output.strip().splitlines()[-1]  # (transformers' loading bar comes first, on stderr)
    assert res.exit_code == 2 and last.startswith("error: delta ") and "modules_to_save" in last, res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["eval", "--delta", str(result.delta_path), "--limit", "8"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["examples"] == 8
