"""deltatune's LoRA and peft's LoRA from identical weights on the same training path give the same loss curve."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from deltatune.train.data import local_splits

from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

pytest.importorskip("peft")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "same_start.py"


def _bench():
    spec = importlib.util.spec_from_file_location("deltatune_bench_same_start", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    paths = [write_jsonl(d / f"{n}.jsonl", sentiment(k, s)) for n, k, s in (("train", 160, 1), ("val", 16, 2),
                                                                               ("test", 48, 3))]
    return local_splits(str(paths[0]), "classification", validation=str(paths[1]), test=str(paths[2]))


def _base():
    model = tiny_bert(seed=3)
    model.config.hidden_dropout_prob = 0.1  # the model's own dropout on: both runs must draw the same masks
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    return model


def test_same_start_gives_the_same_loss_curve_and_metrics(splits, tmp_path):
    bench = _bench()
    res = bench.same_start(_base(), word_tokenizer(), splits, tmp_path, r=4, alpha=8, dropout=0.0, max_steps=20,
                           lr=2e-2, batch_size=8)
    ours, theirs = res["deltatune"], res["peft"]
    assert res["modules_copied"] == 2 * 6 + 1 + 1  # 6 linears per layer, the pooler, the head
    assert res["steps"] == 20 and len(ours["losses"]) == 20
    assert ours["losses"][0] > ours["losses"][-1]  # it trains
    assert res["max_loss_gap"] < 1e-5, (ours["losses"], theirs["losses"])
    assert ours["accuracy"] == theirs["accuracy"] and ours["macro_f1"] == theirs["macro_f1"]


def test_a_different_start_is_detected(splits, tmp_path):
    """The comparison can fail: one module's A 1.5x larger than peft's, and the curves part within 20 steps."""
    bench = _bench()
    base = _base()
    theirs = bench.peft_lora(copy.deepcopy(base), 4, 8, 0.0)
    ours = bench.our_lora(copy.deepcopy(base), 4, 8, 0.0)
    bench.copy_peft_start(theirs, ours)
    from deltatune.runtime import slot_of

    piece = slot_of(dict(ours.named_modules())["bert.encoder.layer.0.attention.self.query"])["default"]
    with torch.no_grad():
        piece.lora_A.mul_(1.5)
    a = bench.losses(bench.train_quietly(ours, word_tokenizer(), splits, tmp_path / "a", max_steps=20, lr=2e-2,
                                         batch_size=8))
    b = bench.losses(bench.train_quietly(theirs, word_tokenizer(), splits, tmp_path / "b", max_steps=20, lr=2e-2,
                                         batch_size=8))
    assert max(abs(x - y) for x, y in zip(a, b)) > 1e-4
