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

from train_fixtures import sentiment_splits, sentiment, tiny_bert, word_tokenizer, write_jsonl

QUIET = {"progress": False, "plot": False}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def cls_splits(tmp_path_factory):
    return sentiment_splits(tmp_path_factory.mktemp("data"))


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.history if "loss" in h]


def test_device_and_precision_options_are_checked(monkeypatch):
    for bad in ("gpu", "cuda:", "CUDA", "cuda:x"):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            TrainConfig(device=bad)
    with pytest.raises(ConfigError, match="TrainConfig.device must be a string, got 0"):
        TrainConfig(device=0)
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(precision="fp8")
    assert TrainConfig(device="cuda:1", precision="bf16").device == "cuda:1"  # spelling only: checked when a run starts
    from deltatune.train import device as device_mod

    monkeypatch.setattr(device_mod, "_CPU_FP16", False)  # a torch build without fp16 autocast on the CPU
    with pytest.raises(ConfigError, match="no fp16 autocast on the CPU; use bf16 or fp32"):
        Precision("fp16", torch.device("cpu"))
    monkeypatch.setattr(device_mod, "_CPU_FP16", None)
    assert Precision("fp16", torch.device("cpu")).scaler is not None  # torch 2.13 has it: probed, then allowed
    from typer.testing import CliRunner

    from deltatune.cli import app

    helptext = " ".join(CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output.split())
    assert "--device" in helptext and "cuda:LOCAL_RANK" in helptext  # the help box wraps phrases: words only
    assert "--precision" in helptext and "bf16" in helptext and "scaler" in helptext
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")  # DELTATUNE_DEVICE=cpu (tests/conftest.py)
    monkeypatch.setenv("DELTATUNE_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="DELTATUNE_DEVICE must be"):
        resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")  # the variable only says what auto means
    monkeypatch.delenv("DELTATUNE_DEVICE")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            train({"device": "cuda:0", **QUIET}, model=tiny_bert(), tokenizer=word_tokenizer(),
                  splits=None)  # refused before any data or model is touched
    else:
        assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() + 1))  # more processes than GPUs
        assert resolve_device("auto") == torch.device("cpu")
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


# --- every training feature on every device, in mixed precision ---------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_lisa_and_early_stopping_in_bf16(cls_splits, tmp_path, device):
    """LISA: only the sampled layer's LoRA B matrices move. Early stopping: the saved delta is the best evaluated
    state (its validation accuracy, evaluated again on a fresh CPU base, is the best one logged)."""
    from deltatune.train import lisa as lisa_mod

    model, seen = tiny_bert(), []
    orig = lisa_mod.Lisa.step
    lisa_mod.Lisa.step = lambda self, step: (orig(self, step), seen.append(list(self.current)))[0]
    try:
        train({"output_dir": str(tmp_path / "lisa"), "max_steps": 3, "batch_size": 8, "lr": 1e-2, "lisa_layers": 1,
               "lisa_interval": 100, "device": device, "precision": "bf16", **QUIET}, model=model,
              tokenizer=word_tokenizer(), splits=cls_splits)
    finally:
        lisa_mod.Lisa.step = orig
    bs = {n: p for n, p in model.named_parameters() if n.endswith("lora_B") and ".layer." in n}
    assert bs and all(bool(p.abs().sum() > 0) == (f".layer.{seen[0][0]}." in n) for n, p in bs.items())

    r = train({"output_dir": str(tmp_path / "es"), "max_steps": 60, "batch_size": 8, "lr": 1e-2, "eval_every": 5,
               "early_stopping_patience": 2, "schedule": "constant", "warmup_ratio": 0.0, "device": device,
               "precision": "bf16", **QUIET}, model=tiny_bert(), tokenizer=word_tokenizer(), splits=cls_splits)
    vals = [(h["step"], h["val_accuracy"]) for h in r.history if "val_accuracy" in h]
    best = max(a for _, a in vals)
    assert r.metrics["early_stopped"] and r.steps < 60
    assert r.metrics["best_step"] == min(s for s, a in vals if a == best)
    fresh = tiny_bert()
    dt.load(fresh, r.delta_path)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = evaluate_classification(fresh, word_tokenizer(), cls_splits.validation, 2)
    assert again["accuracy"] == pytest.approx(best, abs=1 / 40)  # bf16 kernels of another device may flip one example


@pytest.mark.parametrize("device", DEVICES)
def test_lt_sft_and_spiel_regrowth_in_bf16(tmp_path, device, monkeypatch):
    """LT-SFT: phase 2 changes only the entries it selected. SpIEL: the loop regrows entries at its schedule and the
    loss falls."""
    from deltatune.methods.sparse import spiel
    from train_fixtures import additions, tiny_llama

    write_jsonl(tmp_path / "cls.jsonl", sentiment(96, 1))
    cls = local_splits(str(tmp_path / "cls.jsonl"), "classification")
    base = tiny_bert()
    r = train({"output_dir": str(tmp_path / "lt"), "batch_size": 8, "lr": 1e-2, "max_steps": 4, "eval_every": 100,
               "delta": {"kind": "dense"}, "procedure": {"kind": "lt_sft", "k": 300}, "device": device,
               "precision": "bf16", **QUIET}, model=copy.deepcopy(base), tokenizer=word_tokenizer(), splits=cls)
    delta = dt.Delta.read(r.delta_path)
    assert delta.config.kind == "sparse" and r.metrics["selected_entries"] == 300
    model = copy.deepcopy(base)
    dt.load(model, r.delta_path)
    dt.merge(model)
    moved = 0
    for path, st in delta.state.items():
        if "index" in st:
            diff = (model.get_submodule(path).weight - base.get_submodule(path).weight).reshape(-1)
            changed = set(torch.nonzero(diff).reshape(-1).tolist())
            assert changed <= set(st["index"].tolist()), path
            moved += len(changed)
    assert moved > 0

    write_jsonl(tmp_path / "gen.jsonl", additions(64, 1))
    gen = local_splits(str(tmp_path / "gen.jsonl"), "generation")
    seen: list[int] = []
    orig = spiel.regrow
    monkeypatch.setattr(spiel, "regrow", lambda *a: seen.append(orig(*a)) or seen[-1])
    r = train({"output_dir": str(tmp_path / "spiel"), "max_steps": 30, "batch_size": 8, "lr": 2e-2, "log_every": 5,
               "warmup_ratio": 0.0, "task": "generation", "device": device, "precision": "bf16",
               "delta": {"kind": "sparse", "density": 0.1, "regrow_every": 5, "regrow_window": 2}, **QUIET},
              model=tiny_llama(), tokenizer=word_tokenizer(causal=True), splits=gen)
    losses = _losses(r)
    assert losses[-1] < 0.8 * losses[0]
    assert len(seen) == 5 * 14 and sum(seen) > 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ddp_over_nccl_matches_one_gpu(tmp_path):
    """torchrun, 2 processes × batch 4 on 2 GPUs (NCCL) follow the loss curve of 1 GPU × batch 8."""
    import os
    import socket
    import subprocess
    import sys

    from train_fixtures import save_bert_dir

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    model_dir = save_bert_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", sentiment(160, 7))
    common = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "8", "--lr", "0.01",
              "--device", "cuda", "--set", "log_every=1", "--set", "progress=false", "--set", "plot=false",
              "--set", "eval_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DELTATUNE_DEVICE", None)
    one = subprocess.run([sys.executable, "-m", "deltatune.cli.main", *common, "--batch-size", "8", "-o",
                          str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "-m", "deltatune.cli.main", *common, "--batch-size", "4", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(p):
        return [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-4)
    assert len(losses(tmp_path / "two")) == 8


def test_a_skipped_fp16_step_moves_neither_the_schedule_nor_the_pieces_hooks(cls_splits, tmp_path, monkeypatch):
    """When the gradient scaler skips a step (inf/NaN gradients), the pieces' after-step hooks (e.g. AdaLoRA's
    importance scores, which would fold the inf gradients in) and the lr schedule do not see it."""
    from deltatune.train import loop

    calls = {"step": 0, "hooks": []}
    real_step = Precision.step

    def every_third_skipped(self, optimizer):
        calls["step"] += 1
        if calls["step"] % 3 == 0:
            optimizer.zero_grad(set_to_none=True)
            return False
        return real_step(self, optimizer)

    monkeypatch.setattr(Precision, "step", every_third_skipped)
    real_hooks = loop.after_optimizer_step
    monkeypatch.setattr(loop, "after_optimizer_step",
                        lambda model, opt, step, *a, **k: (calls["hooks"].append(step), real_hooks(model, opt, step, *a, **k)))
    sched_steps = []
    real_sched = torch.optim.lr_scheduler.LRScheduler.step
    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "step",
                        lambda self, *a, **k: (sched_steps.append(1), real_sched(self, *a, **k)))
    train({"output_dir": str(tmp_path), "max_steps": 9, "batch_size": 8, "lr": 1e-2, "precision": "fp16", **QUIET},
          model=tiny_bert(), tokenizer=word_tokenizer(), splits=cls_splits)
    assert calls["step"] == 9 and calls["hooks"] == [1, 2, 4, 5, 7, 8]
    assert len(sched_steps) == 1 + 6  # the scheduler's own first step at construction, then the 6 steps taken
