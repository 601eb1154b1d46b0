"""dt.train / deltatune train: classification and causal-LM runs, resume, LISA, DDP, eval and inspect CLIs."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.train import TrainConfig, train
from deltatune.train.data import Collator, local_splits
from deltatune.train.evaluate import classification_metrics, final_number

from train_fixtures import sentiment_splits, additions, save_bert_dir, sentiment, tiny_bert, tiny_llama, word_tokenizer, write_jsonl

QUIET = {"progress": False, "plot": False}


@pytest.fixture(scope="module")
def cls_splits(tmp_path_factory):
    return sentiment_splits(tmp_path_factory.mktemp("data"))


def free_port() -> str:
    """A TCP port nothing listens on now, so concurrent test runs on one machine do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_classification_learns_and_saves_head(cls_splits, tmp_path):
    base = tiny_bert()
    r = train({"output_dir": str(tmp_path), "max_steps": 40, "batch_size": 8, "lr": 1e-2, "eval_every": 20, **QUIET,
               "plot": True}, model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=cls_splits)
    assert r.metrics["test_accuracy"] >= 0.9
    assert (tmp_path / "training.png").stat().st_size > 1000
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in rec for rec in records) and any("tokens_per_s" in rec for rec in records)
    delta = dt.Delta.read(r.delta_path)
    assert "classifier" in delta.state and delta.state["classifier"]["weight"].shape == (2, 32)
    # the saved delta (with its head) reproduces the trained model's test accuracy on a fresh base with another head
    fresh = tiny_bert()
    torch.nn.init.normal_(fresh.classifier.weight)
    dt.load(fresh, r.delta_path)
    from deltatune.train.evaluate import evaluate_classification

    again = evaluate_classification(fresh, word_tokenizer(), cls_splits.test, 2)
    assert again["accuracy"] == pytest.approx(r.metrics["test_accuracy"])


def test_resume_gives_the_same_losses(cls_splits, tmp_path):
    base = tiny_bert()
    common = {"max_steps": 24, "batch_size": 8, "lr": 5e-3, "log_every": 1, "eval_every": 8,
              "delta": {"kind": "lora", "r": 4, "dropout": 0.1}, **QUIET}
    straight = train({**common, "output_dir": str(tmp_path / "a")}, model=copy.deepcopy(base),
                     tokenizer=word_tokenizer(), splits=cls_splits)
    train({**common, "output_dir": str(tmp_path / "b"), "checkpoint_every": 12}, model=copy.deepcopy(base),
          tokenizer=word_tokenizer(), splits=cls_splits)
    assert (tmp_path / "b" / "checkpoint-12").is_dir()
    resumed = train({**common, "output_dir": str(tmp_path / "b"), "resume": True}, model=copy.deepcopy(base),
                    tokenizer=word_tokenizer(), splits=cls_splits)
    la = [h["loss"] for h in straight.history if "loss" in h]
    lb = [h["loss"] for h in resumed.history if "loss" in h]
    assert len(la) == len(lb) == 24
    assert la == pytest.approx(lb, abs=1e-6)
    assert la[0] != pytest.approx(la[-1])


def test_lisa_trains_only_sampled_layers(cls_splits, tmp_path):
    model = tiny_bert()
    seen = []

    from deltatune.train import lisa as lisa_mod

    orig = lisa_mod.Lisa.step

    def spy(self, step):
        orig(self, step)
        seen.append((step, list(self.current)))

    lisa_mod.Lisa.step = spy
    try:
        train({"output_dir": str(tmp_path), "max_steps": 3, "batch_size": 8, "lr": 1e-2, "lisa_layers": 1,
               "lisa_interval": 100, **QUIET}, model=model, tokenizer=word_tokenizer(), splits=cls_splits)
    finally:
        lisa_mod.Lisa.step = orig
    layer = seen[0][1][0]
    # lora_B starts at zero: only the sampled layer's B matrices may have moved
    bs = {n: p for n, p in model.named_parameters() if n.endswith("lora_B") and ".layer." in n}
    assert bs
    for n, p in bs.items():
        moved = bool(p.abs().sum() > 0)
        assert moved == (f".layer.{layer}." in n), n


def test_causal_lm_masks_prompt_and_learns(tmp_path):
    tok = word_tokenizer(causal=True)
    batch = Collator(tok, "causal", 64)([{"prompt": "question 1 plus 2", "response": "answer is 3"}])
    labels = batch["labels"][0]
    n_prompt = len(tok("question 1 plus 2\n", add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] == -100).all() and (labels[n_prompt:] != -100).all()
    d = tmp_path
    write_jsonl(d / "train.jsonl", additions(200, 1))
    write_jsonl(d / "test.jsonl", additions(30, 2))
    splits = local_splits(str(d / "train.jsonl"), "generation", validation=str(d / "test.jsonl"),
                          test=str(d / "test.jsonl"))
    model = tiny_llama()
    r = train({"output_dir": str(d / "run"), "max_steps": 60, "batch_size": 16, "lr": 2e-2, "eval_every": 10,
               "delta": {"kind": "lora", "r": 8, "alpha": 16}, **QUIET}, model=model, tokenizer=tok, splits=splits)
    vals = [h["val_loss"] for h in r.history if "val_loss" in h]
    assert vals[-1] < vals[0] * 0.5
    # batched greedy generation with the KV cache, final-number exact match
    from deltatune.train.evaluate import evaluate_generation

    gen = evaluate_generation(model, tok, splits.test, batch_size=8, max_new_tokens=5)
    with dt.active(model, None):
        bare = evaluate_generation(model, tok, splits.test, batch_size=8, max_new_tokens=5)
    assert gen["exact_match"] >= 0.5 > bare["exact_match"]
    # batching with left padding gives the same outputs as one example at a time
    alone = [evaluate_generation(model, tok, [e], batch_size=1, max_new_tokens=5)["outputs"][0]["output"]
             for e in splits.test[:6]]
    assert alone == [o["output"] for o in gen["outputs"][:6]]


def test_metrics_and_number_parsing():
    m = classification_metrics([0, 1, 1, 2], [0, 1, 2, 2], 3)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert final_number("so the total is 1,234.5 apples") == 1234.5
    assert final_number("#### -7") == -7 and final_number("no digits") is None


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="known"):
        TrainConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ConfigError, match="unknown key"):
        TrainConfig(delta={"kind": "lora", "rank": 4})
    (tmp_path / "c.yaml").write_text("lr: [oops\n")
    with pytest.raises(ConfigError, match="YAML"):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltatune.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_train_eval_inspect(tmp_path):
    model_dir = save_bert_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment(200, 5))
    (tmp_path / "run.yaml").write_text(f"model: {model_dir}\ndata: {data}\nmax_steps: 30\nbatch_size: 8\nlr: 0.01\n"
                                       f"delta: {{kind: lora, r: 4}}\nprogress: false\n")
    out = tmp_path / "out"
    res = _cli("train", str(tmp_path / "run.yaml"), "-o", str(out), "--set", "eval_every=15")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout[: res.stdout.rindex("}") + 1])["test_accuracy"] >= 0.9
    res = _cli("eval", "--model", str(model_dir), "--data", str(data), "--delta", str(out / "delta"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["accuracy"] >= 0.9
    res = _cli("inspect", str(out / "delta"))
    assert res.returncode == 0 and "lora" in res.stdout and "classifier" in res.stdout, res.stdout + res.stderr
    res = _cli("inspect", str(tmp_path / "nope"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes × batch 4 gives the loss curve of one process × batch 8; rank 0 writes one delta."""
    model_dir = save_bert_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment(160, 7))
    common = ["--model", str(model_dir), "--data", str(data), "--max-steps", "8", "--lr", "0.01",
              "--set", "log_every=1", "--set", "progress=false", "--set", "plot=false", "--set", "eval_every=100"]
    one = _cli("train", *common, "--batch-size", "8", "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                "-m", "deltatune.cli.main", "train", *common, "--batch-size", "4", "-o", str(tmp_path / "two")]
    two = subprocess.run(torchrun, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(p: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    assert len(losses(tmp_path / "two")) == 8
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.is_dir()) == ["delta"]


def test_fsdp2_on_cpu_matches_unwrapped(tmp_path):
    """FSDP2 fully_shard over a model with a LoRA delta: same losses and grads as unwrapped; the delta saves whole."""
    script = Path(__file__).parent / "dist_fsdp_check.py"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          free_port(), str(script), str(tmp_path / "delta")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    model = tiny_llama()
    dt.load(model, tmp_path / "delta")
    assert dt.summary(model)["a"].params > 0


def test_grad_accumulation_matches_the_larger_batch(cls_splits, tmp_path):
    """batch 4 × 2 accumulation steps follows the same loss curve as batch 8 (no dropout anywhere)."""
    base = tiny_bert()
    common = {"max_steps": 6, "lr": 1e-2, "log_every": 1, "eval_every": 100, **QUIET}
    big = train({**common, "output_dir": str(tmp_path / "a"), "batch_size": 8}, model=copy.deepcopy(base),
                tokenizer=word_tokenizer(), splits=cls_splits)
    acc = train({**common, "output_dir": str(tmp_path / "b"), "batch_size": 4, "grad_accum": 2},
                model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=cls_splits)
    la = [h["loss"] for h in big.history if "loss" in h]
    lb = [h["loss"] for h in acc.history if "loss" in h]
    assert la == pytest.approx(lb, abs=1e-5)


def test_early_stopping_restores_the_best_state(cls_splits, tmp_path):
    """Validation accuracy stops improving within a few evaluations: training stops after `patience` evaluations
    without improvement, and the saved delta is the first best evaluated state, not the last."""
    r = train({"output_dir": str(tmp_path), "max_steps": 60, "batch_size": 8, "lr": 1e-2, "eval_every": 5,
               "early_stopping_patience": 2, "schedule": "constant", "warmup_ratio": 0.0, **QUIET},
              model=tiny_bert(), tokenizer=word_tokenizer(), splits=cls_splits)
    vals = [(h["step"], h["val_accuracy"]) for h in r.history if "val_accuracy" in h]
    best_step, best_acc = max(vals, key=lambda v: v[1])
    assert r.metrics["early_stopped"], vals
    assert r.steps < 60 and r.steps == vals[-1][0]
    assert all(acc <= best_acc for _, acc in vals[-2:])
    assert r.metrics["best_step"] == min(s for s, a in vals if a == best_acc)
    fresh = tiny_bert()
    dt.load(fresh, r.delta_path)
    from deltatune.train.evaluate import evaluate_classification

    again = evaluate_classification(fresh, word_tokenizer(), cls_splits.validation, 2)
    assert again["accuracy"] == pytest.approx(best_acc)


def test_inspect_peft_directory(tmp_path):
    model = tiny_llama()
    dt.attach(model, dt.LoRA(r=4, targets=("q_proj", "v_proj")), "x")
    dt.save(model, tmp_path / "peft", format="peft")
    res = _cli("inspect", str(tmp_path / "peft"), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["format"] == "peft" and info["kind"] == "lora" and info["modules"] == 4
    assert info["parameters"] == dt.summary(model)["x"].params


def test_subsets_are_stratified_not_the_first_n() -> None:
    """train_examples / max_eval_examples / eval --limit: splits are often stored class by class."""
    from collections import Counter

    from deltatune.train.data import subset

    examples = [{"text": f"t{i}", "label": 0} for i in range(50)] + [{"text": f"u{i}", "label": 1} for i in range(14)] \
        + [{"text": f"v{i}", "label": 2} for i in range(6)]
    got = subset(examples, 20, seed=0)
    counts = Counter(e["label"] for e in got)
    assert len(got) == 20 and counts == {0: 14, 1: 4, 2: 2}  # 20 × (50, 14, 6) / 70, largest remainder
    assert got == sorted(got, key=examples.index)  # original order kept
    assert subset(examples, 20, seed=0) == got and subset(examples, 20, seed=1) != got  # seeded
    assert set(Counter(e["label"] for e in subset(examples, 3, seed=0))) == {0, 1, 2}  # every class where n allows
    assert subset(examples, None, seed=0) == examples and subset(examples, 100, seed=0) == examples
    gen = [{"prompt": str(i), "response": "", "answer": ""} for i in range(10)]
    picked = subset(gen, 4, seed=0)
    assert len(picked) == 4 and picked == sorted(picked, key=gen.index) and len({id(p) for p in picked}) == 4


def test_cli_version_help_texts_and_unknown_data_names_the_zoo() -> None:
    from typer.testing import CliRunner

    from deltatune.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"deltatune {dt.__version__}"
    helptext = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    for words in ("passes over the training set", "peak learning rate", "examples per optimizer step", "run directory"):
        assert words in helptext
    bad = runner.invoke(app, ["train", "--data", "bbcc", "--model", "minilm-l6"])
    assert bad.exit_code == 2 and "did you mean 'bbc'?" in bad.output and "zoo datasets:" in bad.output


def test_dt_train_is_the_function_and_the_package(cls_splits, tmp_path):
    """`dt.train(cfg, **options)` runs the loop (same losses as `deltatune.train.train`), while `deltatune.train`
    stays the package for submodule imports in every import form."""
    import importlib
    import inspect

    import deltatune.train as pkg
    import deltatune.train.data
    from deltatune.train import loop

    assert dt.train is pkg and dt.train.data is deltatune.train.data and dt.train.loop is loop
    assert importlib.import_module("deltatune.train") is dt.train and dt.train.TrainConfig is TrainConfig
    assert list(inspect.signature(dt.train).parameters)[:2] == ["cfg", "model"]
    common = {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "log_every": 1, **QUIET}
    a = dt.train({**common, "output_dir": str(tmp_path / "a")}, model=tiny_bert(), tokenizer=word_tokenizer(),
                 splits=cls_splits)
    b = train(common, output_dir=str(tmp_path / "b"), model=tiny_bert(), tokenizer=word_tokenizer(),
              splits=cls_splits)
    assert isinstance(a, dt.train.TrainResult) and a.steps == b.steps == 4
    la, lb = ([h["loss"] for h in r.history if "loss" in h] for r in (a, b))
    assert len(la) == 4 and la == lb
    assert dt.Delta.read(a.delta_path).state.keys() == dt.Delta.read(b.delta_path).state.keys()
    with pytest.raises(ConfigError):
        dt.train({**common, "output_dir": str(tmp_path / "c"), "batch_size": 0}, model=tiny_bert(),
                 tokenizer=word_tokenizer(), splits=cls_splits)
