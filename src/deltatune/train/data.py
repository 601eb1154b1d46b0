"""Turning examples into batches: classification (text → label) and causal-LM instruction tuning
(prompt → response, loss on the response tokens only, chat template when the tokenizer has one)."""
from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.errors import ConfigError, DeltaNotFoundError
from ..core.parsing import load_json, short
from ..zoo.splits import Splits

Example = dict[str, Any]

__all__ = ["Collator", "Splits", "count_tokens", "format_prompt", "local_splits", "read_table"]


def read_table(path: str | Path) -> list[Example]:
    """Rows of a local .jsonl / .json / .csv / .tsv file as dicts."""
    path = Path(path)
    if not path.is_file():
        raise DeltaNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise ConfigError(f"unsupported data file type {suffix!r} for {str(path)!r}; use .jsonl, .json, .csv or .tsv")
    try:
        if suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                rows = [load_json(line, f"data file {str(path)!r} line {i}", ConfigError)
                        for i, line in enumerate(f, 1) if line.strip()]
        elif suffix == ".json":
            rows = load_json(path.read_text(encoding="utf-8"), f"data file {str(path)!r}", ConfigError)
            if not isinstance(rows, list):
                raise ConfigError(f"{str(path)!r} must hold a JSON list of objects")
        else:
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError as e:
        raise ConfigError(f"data file {str(path)!r} is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise ConfigError(f"data file {str(path)!r} is not a readable {suffix[1:].upper()} file ({e})") from None
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise ConfigError(f"data file {str(path)!r}: example {bad} is {short(rows[bad])}; every example is a JSON "
                          f"object of columns")
    return rows


def _column(rows: list[Example], col: str, path: str) -> None:
    if rows and col not in rows[0]:
        raise ConfigError(f"column {col!r} not found in {path!r}; columns are {sorted(rows[0])}")


def local_splits(path: str, task: str, text_col: str = "text", label_col: str = "label",
                 prompt_col: str = "prompt", response_col: str = "response", answer_col: str = "answer",
                 validation: str | None = None, test: str | None = None, seed: int = 0) -> Splits:
    """Splits from local files: given validation/test files, or a fixed seeded 80/10/10 split of one file."""
    rows = read_table(path)
    parts = [rows, read_table(validation) if validation else None, read_table(test) if test else None]
    if parts[1] is None or parts[2] is None:
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, len(rows) // 10)
        val_idx, test_idx, train_idx = order[:n_val], order[n_val:2 * n_val], order[2 * n_val:]
        parts = [[rows[i] for i in train_idx], parts[1] or [rows[i] for i in val_idx], parts[2] or [rows[i] for i in test_idx]]
    if task == "classification":
        for part in parts:
            _column(part, text_col, path)
            _column(part, label_col, path)
        labels = sorted({str(r[label_col]) for part in parts for r in part})
        index = {lab: i for i, lab in enumerate(labels)}
        conv = [[{"text": str(r[text_col]), "label": index[str(r[label_col])]} for r in part] for part in parts]
        return Splits(str(path), "classification", *conv, labels=labels)
    for part in parts:
        _column(part, prompt_col, path)
        _column(part, response_col, path)
    conv = [[{"prompt": str(r[prompt_col]), "response": str(r[response_col]),
              "answer": str(r.get(answer_col, ""))} for r in part] for part in parts]
    return Splits(str(path), "generation", *conv, labels=None)


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model should see it: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt.rstrip() + "\n"


class Collator:
    """Pads a list of examples into a batch dict for the task."""

    def __init__(self, tokenizer: Any, task: str, max_length: int) -> None:
        self.tok, self.task, self.max_length = tokenizer, task, max_length
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def __call__(self, examples: list[Example]) -> dict[str, Tensor]:
        if self.task == "classification":
            enc = self.tok([e["text"] for e in examples], truncation=True, max_length=self.max_length,
                           padding=True, return_tensors="pt")
            enc["labels"] = torch.tensor([e["label"] for e in examples])
            return dict(enc)
        return self._causal(examples)

    def _causal(self, examples: list[Example]) -> dict[str, Tensor]:
        ids, labels = [], []
        eos = self.tok.eos_token or ""
        for e in examples:
            p = self.tok(format_prompt(self.tok, e["prompt"]), add_special_tokens=False)["input_ids"]
            r = self.tok(e["response"] + eos, add_special_tokens=False)["input_ids"]
            seq = (p + r)[: self.max_length]
            lab = ([-100] * len(p) + r)[: self.max_length]
            ids.append(seq)
            labels.append(lab)
        width = max(len(s) for s in ids)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        lab_t = torch.full((len(ids), width), -100, dtype=torch.long)
        for i, (s, l) in enumerate(zip(ids, labels)):
            input_ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            lab_t[i, : len(l)] = torch.tensor(l)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": lab_t}


def count_tokens(batch: dict[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def subset(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    """`n` of `examples` that represent them (all with None or n ≥ len): classification examples stratified by label
    (each class gets its share by largest remainder, at least one where n allows), others a seeded sample; the chosen
    examples keep their original order. Splits are often stored class by class, so the first n would be one class."""
    if n is None or n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    if not all("label" in e for e in examples):
        return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]
    by_label: dict[Any, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e["label"], []).append(i)
    labels = sorted(by_label, key=lambda lab: (-len(by_label[lab]), str(lab)))
    exact = {lab: n * len(by_label[lab]) / len(examples) for lab in labels}
    share = {lab: int(exact[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda lab: exact[lab] - share[lab], reverse=True)[: n - sum(share.values())]:
        share[lab] += 1
    for lab in labels:  # every class present where n allows, taken from the largest ones
        if share[lab] == 0 and n >= len(labels):
            donor = max(labels, key=lambda d: share[d])
            share[donor] -= 1
            share[lab] = 1
    chosen = [i for lab in labels for i in rng.sample(by_label[lab], share[lab])]
    return [examples[i] for i in sorted(chosen)]
