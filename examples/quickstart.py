"""Quickstart: attach LoRA to a small Llama, train a few steps, save, reload, check the logits.

Run: make demo   (or: .venv/bin/python examples/quickstart.py)
"""
from __future__ import annotations

import copy
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt


def main() -> None:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    model = copy.deepcopy(base)

    # A toy task: continue a sequence with the next token (t -> t+1 mod 64).
    starts = torch.randint(0, 64, (32, 1))
    batch = (starts + torch.arange(16)) % 64

    dt.attach(model, dt.LoRA(r=8, alpha=16, dropout=0.05, targets="all-linear"), name="count")
    print(dt.summary(model))

    opt = torch.optim.AdamW(dt.param_groups(model, lr=3e-3, lr_ratio=4.0))
    model.train()
    for step in range(60):
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == 59:
            print(f"step {step:3d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        trained = model(batch).logits
        with dt.active(model, None):
            bare = model(batch).logits
    acc = (trained[:, :-1].argmax(-1) == batch[:, 1:]).float().mean().item()
    print(f"next-token accuracy with the delta: {acc:.1%}; without: "
          f"{(bare[:, :-1].argmax(-1) == batch[:, 1:]).float().mean().item():.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        dt.save(model, tmp, name="count")
        fresh = dt.load(copy.deepcopy(base).eval(), tmp)
        with torch.no_grad():
            reloaded = fresh(batch).logits
        err = (reloaded - trained).abs().max().item()
        print(f"saved to {tmp} and reloaded: max |Δlogits| = {err:.2e}")
        assert err < 1e-5, "reloaded delta gives different logits"

        dt.merge(fresh)
        with torch.no_grad():
            merged = fresh(batch).logits
        print(f"merged into the base weights: max |Δlogits| = {(merged - trained).abs().max().item():.2e}")
    print("quickstart OK")


if __name__ == "__main__":
    main()
