"""Devices and mixed precision in dt.train: bf16/fp16 autocast trains like fp32, fp16's gradient scaler skips
overflowing steps, resume gives the uninterrupted losses in every precision and across precisions. Each check runs
on the CPU, and again on CUDA (marked `gpu`, skipped without a GPU)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import deltatune as dt
from deltatune.core.errors import ConfigError
from deltatune.train import TrainConfig, train
from deltatune.train.data import local_splits
from deltatune.train.device import Precision, resolve_device
from deltatune.train.evaluate import evaluate_classification

from train_fixtures import sentiment, tiny_bert, word_tokenizer, write_jsonl

QUIET = {"progress": False, "plot": False}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def cls_splits(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", sentiment(160, 1))
    write_jsonl(d / "val.jsonl", sentiment(40, 2))
    write_jsonl(d / "test.jsonl", sentiment(40, 3))
    return local_splits(str(d / "train.jsonl"), "classification", validation=str(d / "val.jsonl"),
                        test=str(d / "test.jsonl"))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history if "loss" in h]


def test_device_and_precision_options_are_checked():
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x", 0):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            TrainConfig(device=bad)
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    assert TrainConfig(device="cuda:1", precision="bf16").device == "cuda:1"  # spelling only: checked when a run starts
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train({"device": "cuda:0", **QUIET}, model=tiny_bert(), tokenizer=word_tokenizer(),
                  splits=None)  # refused before any data or model is touched
    else:
        assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
        with pytest.raises(ConfigError, match="GPU"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_trains_like_fp32(cls_splits, tmp_path, device):
    """bf16 and fp16 autocast: the forward really runs in the low precision (the head's logits have its dtype),
    the parameters stay fp32, and the loss curve stays close to fp32's; all three learn the task."""
    base = tiny_bert()
    common = {"max_steps": 30, "batch_size": 8, "lr": 1e-2, "log_every": 5, "eval_every": 30, "device": device, **QUIET}
    runs, seen = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        model = copy.deepcopy(base)
        dtypes: set[torch.dtype] = set()
        model.classifier.register_forward_hook(lambda m, i, o, dtypes=dtypes: dtypes.add(o.dtype))
        runs[precision] = train({**common, "precision": precision, "output_dir": str(tmp_path / precision)},
                                model=model, tokenizer=word_tokenizer(), splits=cls_splits)
        seen[precision] = dtypes
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.device.type for p in model.parameters()} == {device}
        assert runs[precision].metrics["test_accuracy"] >= 0.9, precision
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "fp16": {torch.float16}}
    ref = _losses(runs["fp32"])
    for precision, tol in (("bf16", 0.03), ("fp16", 0.01)):
        low = _losses(runs[precision])
        assert low != ref  # rounded differently: the precision is in effect
        assert low[:4] == pytest.approx(ref[:4], abs=tol), precision  # before the curves reach ~0 and diverge in noise


def test_fp16_scaler_skips_steps_with_overflowing_gradients():
    """fp16: a step whose gradients overflow leaves the parameters as they were and halves the loss scale; a finite
    step updates them (unscaled: AdamW's first step moves each parameter by lr, whatever the scale)."""
    layer = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    prec = Precision("fp16", torch.device("cpu"))
    before, scale = layer.weight.detach().clone(), prec.scaler.get_scale()
    with prec.autocast():
        loss = layer(torch.ones(2, 4)).float().sum() * 1e10  # finite loss; its fp16 gradients overflow once scaled
    prec.backward(loss)
    assert prec.step(opt) is False
    assert torch.equal(layer.weight, before) and prec.scaler.get_scale() == scale / 2
    opt.zero_grad()
    with prec.autocast():
        loss = layer(torch.ones(1, 4)).float().sum()  # scaled gradient 32768: within fp16's range
    prec.backward(loss)
    assert prec.step(opt) is True
    assert torch.allclose((layer.weight - before).abs(), torch.full_like(before, 0.1), atol=1e-3)
    assert Precision("bf16", torch.device("cpu")).scaler is None and Precision("fp32", torch.device("cpu")).state() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_gives_the_same_losses_in_mixed_precision(cls_splits, tmp_path, device, precision):
    """As in fp32 (test_train.py): a run checkpointed at step 12 and resumed logs the uninterrupted run's losses,
    dropout included; the fp16 checkpoint carries the gradient scaler's state."""
    base = tiny_bert()
    common = {"max_steps": 24, "batch_size": 8, "lr": 5e-3, "log_every": 1, "eval_every": 8, "device": device,
              "precision": precision, "delta": {"kind": "lora", "r": 4, "dropout": 0.1}, **QUIET}
    straight = train({**common, "output_dir": str(tmp_path / "a")}, model=copy.deepcopy(base),
                     tokenizer=word_tokenizer(), splits=cls_splits)
    train({**common, "output_dir": str(tmp_path / "b"), "checkpoint_every": 12}, model=copy.deepcopy(base),
          tokenizer=word_tokenizer(), splits=cls_splits)
    state = json.loads((tmp_path / "b" / "checkpoint-12" / "trainer_state.json").read_text())
    assert (state["grad_scaler"] is not None) == (precision == "fp16")
    if precision == "fp16":
        assert state["grad_scaler"]["scale"] > 0
    resumed = train({**common, "output_dir": str(tmp_path / "b"), "resume": True}, model=copy.deepcopy(base),
                    tokenizer=word_tokenizer(), splits=cls_splits)
    la, lb = _losses(straight), _losses(resumed)
    assert len(la) == len(lb) == 24
    assert la == pytest.approx(lb, abs=1e-6)
    assert la[0] != pytest.approx(la[-1])


@pytest.mark.parametrize("device", DEVICES)
def test_resume_across_precisions(cls_splits, tmp_path, device):
    """A checkpoint written under fp16 resumes under fp32 (and one written under fp32 under bf16): the run continues
    from the checkpoint's state — its losses follow the uninterrupted run's (within the precisions' rounding) instead
    of starting again from the untrained ~0.69 — and the final delta evaluates like the uninterrupted one."""
    base = tiny_bert()
    common = {"max_steps": 24, "batch_size": 8, "lr": 1e-2, "log_every": 1, "eval_every": 24, "device": device,
              "schedule": "constant", "warmup_ratio": 0.0, **QUIET}
    for first, then in (("fp16", "fp32"), ("fp32", "bf16")):
        out = tmp_path / f"{first}-{then}"
        straight = train({**common, "precision": first, "output_dir": str(out / "a")}, model=copy.deepcopy(base),
                         tokenizer=word_tokenizer(), splits=cls_splits)
        train({**common, "precision": first, "output_dir": str(out / "b"), "checkpoint_every": 12},
              model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=cls_splits)
        model = copy.deepcopy(base)
        resumed = train({**common, "precision": then, "output_dir": str(out / "b"), "resume": True}, model=model,
                        tokenizer=word_tokenizer(), splits=cls_splits)
        la, lb = _losses(straight), _losses(resumed)
        assert lb[:12] == pytest.approx(la[:12], abs=1e-6)  # the first half is the checkpointed run's own record
        assert sum(lb[12:16]) / 4 < sum(la[:4]) / 4 - 0.1, (la, lb)  # not a restart from the untrained model
        assert lb[12:16] == pytest.approx(la[12:16], abs=0.03), (first, then)
        assert resumed.metrics["test_accuracy"] >= 0.9


@pytest.mark.gpu
def test_cuda_run_saves_a_delta_that_loads_on_the_cpu(cls_splits, tmp_path):
    """Trained on the GPU (bf16), saved, loaded on a CPU copy of the base: the same test accuracy."""
    r = train({"output_dir": str(tmp_path), "max_steps": 30, "batch_size": 8, "lr": 1e-2, "device": "cuda",
               "precision": "bf16", **QUIET}, model=tiny_bert(), tokenizer=word_tokenizer(), splits=cls_splits)
    fresh = tiny_bert()
    dt.load(fresh, r.delta_path)
    again = evaluate_classification(fresh, word_tokenizer(), cls_splits.test, 2)
    assert again["accuracy"] == pytest.approx(r.metrics["test_accuracy"], abs=0.05)  # bf16 vs fp32 evaluation
