"""Options for imbalanced classification: class-weighted loss, label smoothing, a head learning rate, selection of
the best evaluation by a metric (and early stopping on it)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.train import TrainConfig, train
from deltatune.train.data import local_splits
from deltatune.train.evaluate import evaluate_classification
from deltatune.train.losses import class_weights, weighted_cross_entropy
from deltatune.train.loop import selection_score
from deltatune.train.optim import param_groups

from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

QUIET = {"progress": False, "plot": False}


@pytest.fixture(scope="module")
def skewed_splits(tmp_path_factory):
    """Sentiment data with 3 negative examples to every positive one in training."""
    d = tmp_path_factory.mktemp("skewed")
    rows = sentiment(400, 11)
    pos = [r for r in rows if r["label"] == "pos"][:40]
    neg = [r for r in rows if r["label"] == "neg"][:120]
    write_jsonl(d / "train.jsonl", pos + neg)
    write_jsonl(d / "val.jsonl", sentiment(40, 12))
    write_jsonl(d / "test.jsonl", sentiment(40, 13))
    return local_splits(str(d / "train.jsonl"), "classification", validation=str(d / "val.jsonl"),
                        test=str(d / "test.jsonl"))


# --- the loss ------------------------------------------------------------------------------------------------------
def test_weighted_loss_matches_a_hand_computed_value():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1])
    weight = torch.tensor([3.0, 1.0])
    nll = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(-2)), math.log(2)]  # −log softmax at the label
    expected = (3 * nll[0] + 1 * nll[1] + 1 * nll[2]) / (3 + 1 + 1)
    assert float(weighted_cross_entropy(logits, labels, weight)) == pytest.approx(expected, rel=1e-6)
    plain = sum(nll) / 3
    assert float(weighted_cross_entropy(logits, labels)) == pytest.approx(plain, rel=1e-6)


def test_balanced_and_sqrt_weights_by_hand():
    labels = [0, 0, 0, 1]  # 3 of class 0, 1 of class 1, none of class 2
    balanced = class_weights("balanced", labels, 3)
    # N / (K n_c) over the present classes, scaled so the examples' mean weight is 1: 4/(2·3), 4/(2·1)
    assert balanced.tolist() == pytest.approx([2 / 3, 2.0, 0.0])
    s = 4 / (3 / math.sqrt(3) + 1)  # 1/√n_c scaled to a mean example weight of 1
    assert class_weights("sqrt", labels, 3).tolist() == pytest.approx([s / math.sqrt(3), s, 0.0])
    assert class_weights("none", labels, 3) is None
    assert class_weights([1, 2, 0.5], labels, 3).tolist() == [1.0, 2.0, 0.5]
    with pytest.raises(ConfigError, match="3 classes"):
        class_weights([1, 2], labels, 3)


@pytest.mark.parametrize("use_weight", [False, True])
def test_label_smoothing_equals_torch(use_weight):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    labels = torch.randint(0, 5, (7,), generator=g)
    weight = torch.rand(5, generator=g) + 0.1 if use_weight else None
    for eps in (0.0, 0.1, 0.3):
        ours = weighted_cross_entropy(logits, labels, weight, eps)
        ref = F.cross_entropy(logits, labels, weight=weight, label_smoothing=eps)
        assert float(ours) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_unit_weights_train_exactly_like_the_models_own_loss(skewed_splits, tmp_path):
    common = {"max_steps": 6, "batch_size": 8, "lr": 5e-3, "log_every": 1, "eval_every": 100, **QUIET}
    base = tiny_bert()
    plain = train({**common, "output_dir": str(tmp_path / "a")}, model=copy.deepcopy(base), tokenizer=word_tokenizer(),
                  splits=skewed_splits)
    ours = train({**common, "output_dir": str(tmp_path / "b"), "class_weights": [1, 1]}, model=copy.deepcopy(base),
                 tokenizer=word_tokenizer(), splits=skewed_splits)
    la, lb = ([h["loss"] for h in r.history if "loss" in h] for r in (plain, ours))
    assert len(la) == 6 and la == pytest.approx(lb, abs=1e-6)
    weighted = train({**common, "output_dir": str(tmp_path / "c"), "class_weights": "balanced"},
                     model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=skewed_splits)
    assert [h["loss"] for h in weighted.history if "loss" in h] != pytest.approx(la, abs=1e-4)


# --- the head's learning rate --------------------------------------------------------------------------------------
def test_head_lr_puts_the_head_in_its_own_group():
    model = tiny_bert()
    dt.attach(model, dt.LoRA(r=4, modules_to_save=("classifier",)), "d")
    groups = param_groups(model, 1e-3, head_lr=5e-2, head_modules=("classifier",))
    names = {id(p): n for n, p in model.named_parameters()}
    by_lr = {g["lr"]: sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert by_lr[5e-2] == ["classifier.deltatune.d.bias", "classifier.deltatune.d.weight"]
    assert len(by_lr[1e-3]) == sum(p.requires_grad for p in model.parameters()) - 2
    assert all("lora_" in n for n in by_lr[1e-3])
    # without head_lr: one group, as before
    assert len(param_groups(model, 1e-3)) == 1
    # full fine-tuning (no delta): the classifier's own weight and bias
    full = tiny_bert()
    groups = param_groups(full, 1e-5, head_lr=1e-3)
    head = [names_ for g in groups if g["lr"] == 1e-3 for names_ in g["params"]]
    assert {id(p) for p in head} == {id(full.classifier.weight), id(full.classifier.bias)}


def test_head_lr_reaches_the_optimizer(skewed_splits, tmp_path):
    """With a negligible lr and a real head_lr only the head moves."""
    base = tiny_bert()
    model = copy.deepcopy(base)
    train({"output_dir": str(tmp_path), "max_steps": 5, "batch_size": 8, "lr": 1e-12, "head_lr": 1e-2,
           "warmup_ratio": 0.0, "schedule": "constant", "eval_every": 100, **QUIET,
           "delta": {"kind": "lora", "r": 4}}, model=model, tokenizer=word_tokenizer(), splits=skewed_splits)
    pieces = dict(model.named_parameters())
    head_moved = (pieces["classifier.deltatune.default.weight"] - base.classifier.weight).abs().max()
    assert head_moved > 1e-3
    lora_b = max(float(p.detach().abs().max()) for n, p in pieces.items() if n.endswith("lora_B"))
    assert lora_b < 1e-9  # B starts at zero and moved by ~lr per step


# --- selection and early stopping ----------------------------------------------------------------------------------
def test_selection_score_orders_by_the_chosen_metric():
    a = {"accuracy": 0.9, "macro_f1": 0.5, "loss": 0.3}
    b = {"accuracy": 0.8, "macro_f1": 0.7, "loss": 0.4}
    assert selection_score(a, "accuracy") > selection_score(b, "accuracy")
    assert selection_score(b, "macro_f1") > selection_score(a, "macro_f1")
    assert selection_score(a, "loss") > selection_score(b, "loss")
    assert selection_score(a, None) == 0.9 and selection_score({"loss": 2.0}, None) == -2.0


def test_macro_f1_selection_keeps_the_best_evaluation_and_early_stopping_stops(skewed_splits, tmp_path):
    base = tiny_bert()
    r = train({"output_dir": str(tmp_path), "max_steps": 60, "batch_size": 8, "lr": 2e-2, "eval_every": 2,
               "select_metric": "macro_f1", "early_stopping_patience": 3, "log_every": 2, **QUIET,
               "delta": {"kind": "lora", "r": 4}}, model=copy.deepcopy(base), tokenizer=word_tokenizer(),
              splits=skewed_splits)
    evals = [(h["step"], h["val_macro_f1"]) for h in r.history if "val_macro_f1" in h]
    best_step, best_f1 = max(evals, key=lambda e: (e[1], -e[0]))  # the first evaluation with the highest macro-F1
    assert r.metrics["best_step"] == best_step
    assert r.metrics["early_stopped"] and r.steps < 60
    assert r.steps == best_step + 3 * 2  # three evaluations (every 2 steps) without improvement
    # the saved delta is the best evaluation's state: on a fresh base it gives that evaluation's macro-F1
    fresh = tiny_bert()  # the same base, another head: the delta brings its own
    torch.nn.init.normal_(fresh.classifier.weight)
    dt.load(fresh, r.delta_path)
    again = evaluate_classification(fresh, word_tokenizer(), skewed_splits.validation, 2)
    assert again["macro_f1"] == pytest.approx(best_f1)
    test = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert test["test_macro_f1"] == pytest.approx(r.metrics["test_macro_f1"])


def test_loss_selection_without_patience_restores_the_lowest_loss(skewed_splits, tmp_path):
    r = train({"output_dir": str(tmp_path), "max_steps": 12, "batch_size": 8, "lr": 5e-2, "eval_every": 3,
               "select_metric": "loss", "label_smoothing": 0.1, "class_weights": "sqrt", **QUIET,
               "delta": {"kind": "lora", "r": 4}}, model=tiny_bert(), tokenizer=word_tokenizer(), splits=skewed_splits)
    evals = [(h["step"], h["val_loss"]) for h in r.history if "val_loss" in h]
    best_step, best_loss = min(evals, key=lambda e: (e[1], e[0]))
    assert r.metrics["best_step"] == best_step and not r.metrics["early_stopped"] and r.steps == 12
    fresh = tiny_bert()  # the same base, another head: the delta brings its own
    torch.nn.init.normal_(fresh.classifier.weight)
    dt.load(fresh, r.delta_path)
    assert evaluate_classification(fresh, word_tokenizer(), skewed_splits.validation, 2)["loss"] == \
        pytest.approx(best_loss, rel=1e-5)


# --- bad options ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    ({"class_weights": "inverse"}, "class_weights must be one of"),
    ({"class_weights": [1, -1]}, "class_weights must be one of"),
    ({"class_weights": [0, 0]}, "at least one weight"),
    ({"label_smoothing": 1.0}, r"label_smoothing must be a number in \[0, 1\)"),
    ({"label_smoothing": "a tenth"}, r"label_smoothing must be a number in \[0, 1\)"),
    ({"head_lr": 0}, "head_lr must be a positive number"),
    ({"select_metric": "f1"}, "select_metric must be one of"),
    ({"early_stopping_patience": 0}, "early_stopping_patience must be a positive integer"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_class_weights_must_match_the_classes(skewed_splits, tmp_path):
    with pytest.raises(ConfigError, match="2 classes"):
        train({"output_dir": str(tmp_path), "max_steps": 1, "class_weights": [1, 2, 3], **QUIET}, model=tiny_bert(),
              tokenizer=word_tokenizer(), splits=skewed_splits)


@pytest.mark.parametrize("options", [{"class_weights": "balanced"}, {"label_smoothing": 0.1},
                                     {"select_metric": "macro_f1"}])
def test_classification_options_are_refused_for_generation(options, tmp_path):
    from train_fixtures import additions, tiny_llama

    write_jsonl(tmp_path / "gen.jsonl", additions(40, 0))
    splits = local_splits(str(tmp_path / "gen.jsonl"), "generation")
    with pytest.raises(ConfigError, match="classification"):
        train({"output_dir": str(tmp_path / "o"), "max_steps": 1, "task": "generation", **options, **QUIET},
              model=tiny_llama(), tokenizer=word_tokenizer(causal=True), splits=splits)
    assert not (tmp_path / "o").exists()
