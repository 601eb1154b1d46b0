"""Evaluation: accuracy and macro-F1 for classification; exact match of the final number for GSM8K-style data
with batched greedy generation using the KV cache."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .data import Collator, Example, format_prompt
from .device import model_device, to_device

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def classification_metrics(preds: list[int], gold: list[int], n_classes: int) -> dict[str, float]:
    correct = sum(int(p == g) for p, g in zip(preds, gold))
    f1s = []
    for c in range(n_classes):
        tp = sum(1 for p, g in zip(preds, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(preds, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(preds, gold) if p != c and g == c)
        if tp + fp + fn == 0:
            continue  # class absent from gold and predictions: no F1 to average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / max(len(gold), 1), "macro_f1": sum(f1s) / max(len(f1s), 1)}


@torch.no_grad()
def evaluate_classification(model: nn.Module, tokenizer: Any, examples: list[Example], n_classes: int,
                            batch_size: int = 64, max_length: int = 128, progress: Any = None) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss; batches go to the model's device; `progress(n)` after each batch of n."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    collate = Collator(tokenizer, "classification", max_length)
    preds, gold, loss_sum = [], [], 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size])
        gold += batch["labels"].tolist()
        out = model(**to_device(batch, device))
        loss_sum += float(out.loss) * len(batch["labels"])
        preds += out.logits.argmax(-1).tolist()
        if progress is not None:
            progress(len(batch["labels"]))
    model.train(was_training)
    metrics = classification_metrics(preds, gold, n_classes)
    metrics["loss"] = loss_sum / max(len(gold), 1)
    return metrics


def final_number(text: str) -> float | None:
    """The last number in a text ("#### 1,234" → 1234.0), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


@torch.no_grad()
def evaluate_generation(model: nn.Module, tokenizer: Any, examples: list[Example], batch_size: int = 16,
                        max_new_tokens: int = 256, progress: Any = None) -> dict[str, Any]:
    """Greedy decoding (KV cache on) with left padding; exact match of the final number against `answer`."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    correct, outputs = 0, []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer([format_prompt(tokenizer, e["prompt"]) for e in chunk], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            enc = to_device(dict(enc), model_device(model))
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for e, text in zip(chunk, texts):
                pred, gold = final_number(text), final_number(str(e.get("answer", "")))
                ok = pred is not None and gold is not None and abs(pred - gold) < 1e-6
                correct += int(ok)
                outputs.append({"prompt": e["prompt"], "output": text, "answer": e.get("answer"), "correct": ok})
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return {"exact_match": correct / max(len(examples), 1), "n": len(examples), "outputs": outputs}
