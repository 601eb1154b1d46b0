"""What a training run tells its user: plain log lines without a terminal, validation metrics in a terminal too,
an evaluation progress indicator, training.png, and transformers' load report only when it says something."""
from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from deltatune.core.progress import Progress, duration
from deltatune.train import TrainConfig, train
from deltatune.train.loop import load_model, trained_whole
from deltatune.train.plot import history_figure
from deltatune.zoo.load_report import missing_only

from train_fixtures import sentiment_splits, VOCAB, sentiment, tiny_bert, word_tokenizer, write_jsonl

STEP = re.compile(r"^step (\d+)/20  loss (\d+\.\d{4})  lr (\S+)  tokens/s (\d+)  ETA (\d+:\d\d)$")
EVAL = re.compile(r"^eval step (\d+)/20  val_accuracy (\d\.\d{4})  val_macro_f1 (\d\.\d{4})  val_loss (\d+\.\d{4})$")


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def cls_splits(tmp_path_factory):
    return sentiment_splits(tmp_path_factory.mktemp("data"), 120, 40, 20)


RUN = {"max_steps": 20, "batch_size": 8, "lr": 1e-2, "log_every": 5, "eval_every": 10, "eval_batch_size": 16}


def test_plain_lines_without_a_terminal(cls_splits, tmp_path, capsys):
    """stderr is not a terminal: one line per log_every steps (step, loss, lr, tokens/s, ETA) and one per evaluation,
    with the numbers metrics.jsonl holds; nothing on stdout; training.png names the run and plots macro-F1 and lr."""
    r = train({**RUN, "output_dir": str(tmp_path), "name": "sentiment-lora"}, model=tiny_bert(),
              tokenizer=word_tokenizer(), splits=cls_splits)
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    steps = [STEP.match(x) for x in lines if x.startswith("step ")]
    evals = [EVAL.match(x) for x in lines if x.startswith("eval step ")]
    assert all(steps) and all(evals), err
    train_records = [h for h in r.history if "loss" in h]
    val_records = [h for h in r.history if "val_accuracy" in h]
    assert [int(m[1]) for m in steps] == [h["step"] for h in train_records] == [5, 10, 15, 20]
    assert [m[2] for m in steps] == [f"{h['loss']:.4f}" for h in train_records]
    assert [float(m[3]) for m in steps] == pytest.approx([h["lr"] for h in train_records], rel=1e-2, abs=1e-12)
    assert [int(m[4]) for m in steps] == [round(h["tokens_per_s"]) for h in train_records]
    assert steps[-1][5] == "0:00"
    assert [int(m[1]) for m in evals] == [10, 20]
    assert [(m[2], m[3]) for m in evals] == [(f"{h['val_accuracy']:.4f}", f"{h['val_macro_f1']:.4f}") for h in val_records]
    lines_order = [x.split()[0] + x.split()[1] for x in lines if x.startswith(("step", "eval"))]
    assert lines_order == ["step5/20", "step10/20", "evalstep", "step15/20", "step20/20", "evalstep"]
    assert (tmp_path / "training.png").stat().st_size > 1000
    fig = history_figure(r.history, "run 'sentiment-lora'")
    try:
        _check_figure(fig, "sentiment-lora")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _check_figure(fig, run_name: str) -> None:
    """The title names the run; macro-F1 and lr are curves; no legend overlaps any panel."""
    assert run_name in fig._suptitle.get_text()
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert {"train loss", "validation loss", "validation accuracy", "validation macro-F1", "learning rate"} <= labels
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "a legend covers a panel"


def test_a_terminal_shows_a_bar_and_still_prints_validation_metrics(cls_splits, tmp_path, monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    r = train({**RUN, "output_dir": str(tmp_path), "plot": False}, model=tiny_bert(), tokenizer=word_tokenizer(),
              splits=cls_splits)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", term.getvalue())
    val = [h for h in r.history if "val_accuracy" in h]
    for h in val:  # the evaluation lines, above the bar
        assert f"eval step {h['step']}/20  val_accuracy {h['val_accuracy']:.4f}  val_macro_f1 {h['val_macro_f1']:.4f}" in text
    assert "20/20" in text and "train" in text  # the bar
    assert not re.search(r"^step \d+/20  loss", text, re.M)  # the bar carries the step lines' numbers


def test_evaluation_progress():
    """A phase is a second bar in a terminal (removed when it ends) and a `eval: done/total` line every `every` s in
    a log; disabled, it prints nothing."""
    log = io.StringIO()
    with Progress(10, stream=log, every=0.0) as bar:
        with bar.phase("eval", 100) as advance:
            for _ in range(4):
                advance(25)
        bar.line("after")
    assert log.getvalue().splitlines() == ["eval: 25/100", "eval: 50/100", "eval: 75/100", "after"]
    term = FakeTerminal()
    with Progress(10, stream=term) as bar:
        with bar.phase("eval", 100) as advance:
            advance(60)
            tasks = [(t.description, t.completed, t.total) for t in bar._bar.tasks]  # type: ignore[union-attr]
        assert tasks == [("train", 0, 10), ("eval", 60, 100)]
        assert [t.description for t in bar._bar.tasks] == ["train"]  # type: ignore[union-attr]
    quiet = io.StringIO()
    with Progress(10, stream=quiet, enabled=False, every=0.0) as bar:
        with bar.phase("eval", 100) as advance:
            advance(50)
        bar.line("x")
    assert quiet.getvalue() == ""
    assert duration(None) == "?" and duration(59.6) == "1:00" and duration(3725) == "1:02:05"


# --- transformers' load report --------------------------------------------------------------------------------
def _encoder_dir(path):
    """A pretrained encoder without a classification head, with a tokenizer: loading it for classification makes
    transformers report the new head's weights as MISSING."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=len(VOCAB), max_position_embeddings=64)).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def reports():
    handler = Records()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_load_report_left_out_only_when_the_delta_provides_the_reported_modules(tmp_path, reports):
    cfg = TrainConfig(model=str(_encoder_dir(tmp_path / "enc")))
    lora = TrainConfig(delta={"kind": "lora", "r": 4}).delta_config()
    load_model(cfg, "classification", 3, trained_whole(lora, "classification"))  # the head goes to modules_to_save
    assert not [m for m in reports.messages if "LOAD REPORT" in m]
    load_model(cfg, "classification", 3)  # no delta named: the report is shown as transformers wrote it
    shown = [m for m in reports.messages if "LOAD REPORT" in m]
    assert len(shown) == 1 and "classifier.weight" in shown[0] and "MISSING" in shown[0]
    other = lora.replace(modules_to_save=("pooler.dense",))  # the delta saves another module: the head stays random
    load_model(cfg, "classification", 3, trained_whole(other, "classification"))
    assert len([m for m in reports.messages if "LOAD REPORT" in m]) == 2
    assert sorted(missing_only(shown[0])) == ["classifier.bias", "classifier.weight"]  # in set order


def test_only_reports_of_missing_weights_can_be_left_out():
    report = ("BertForSequenceClassification LOAD REPORT from: x\nKey               | Status     | \n"
              "------------------+------------+-\nclassifier.weight | MISSING    | \n"
              "bert.extra        | UNEXPECTED | \n\nNotes:\n- MISSING: ...")
    assert missing_only(report) is None
    assert missing_only(report.replace("UNEXPECTED", "MISSING   ")) == ["classifier.weight", "bert.extra"]
    assert missing_only("Foo LOAD REPORT from: x\nlayers.{0, 1}.w | MISSING | \n") is None  # collapsed keys: kept


def test_eval_with_a_delta_that_saves_the_head_shows_no_load_report(tmp_path, reports):
    """`deltatune eval --delta`: the saved delta's modules_to_save (the head) count as provided; without a delta the
    random head is reported."""
    import deltatune as dt
    from deltatune.train.evaluation import run_eval
    from transformers import AutoModelForSequenceClassification

    enc = _encoder_dir(tmp_path / "enc")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment(40, 4))
    model = AutoModelForSequenceClassification.from_pretrained(enc, num_labels=2)
    dt.attach(model, dt.LoRA(r=2, modules_to_save=("classifier",)), "task")
    dt.save(model, tmp_path / "delta", name="task")
    reports.messages.clear()
    out = run_eval(str(enc), str(data), tmp_path / "delta")
    assert out["examples"] == 4 and not [m for m in reports.messages if "LOAD REPORT" in m]
    run_eval(str(enc), str(data), None)
    assert [m for m in reports.messages if "LOAD REPORT" in m and "classifier.weight" in m]


def test_held_load_reports_hold_only_this_threads_records(reports):
    """The filter sits on the process-wide transformers logger: a load report another thread logs meanwhile is
    shown at once, one of this thread is held until released."""
    import threading

    from torch import nn

    from deltatune.zoo.load_report import held_load_reports

    logger = logging.getLogger("transformers.modeling_utils")
    with held_load_reports() as held:
        other = threading.Thread(target=lambda: logger.warning("Other LOAD REPORT from: elsewhere"))
        other.start()
        other.join()
        logger.warning("Mine LOAD REPORT from: here")
        assert [m for m in reports.messages if "LOAD REPORT" in m] == ["Other LOAD REPORT from: elsewhere"]
    assert [r.getMessage() for r in held.records] == ["Mine LOAD REPORT from: here"]
    held.release(nn.Linear(1, 1))
    assert [m for m in reports.messages if "LOAD REPORT" in m] == ["Other LOAD REPORT from: elsewhere",
                                                                     "Mine LOAD REPORT from: here"]
