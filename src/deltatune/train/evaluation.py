"""`deltatune eval`: a model (optionally with a delta) on a split of a zoo or local dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..io.files import load
from .config import TrainConfig
from .evaluate import evaluate_classification, evaluate_generation
from .loop import load_model, load_splits
from ..core.progress import Progress


def run_eval(model: str, data: str, delta: Path | None, split: str = "test", limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, max_length: int = 128) -> dict[str, Any]:
    cfg = TrainConfig(model=model, data=data)
    splits = load_splits(cfg)
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {split!r}")
    examples = getattr(splits, split)[:limit] if limit else getattr(splits, split)
    if not examples:
        raise ConfigError(f"dataset {data!r} has no {split} examples")
    net, tok = load_model(cfg, splits.task, len(splits.labels) if splits.labels else None)
    if delta is not None:
        load(net, delta)
    if splits.task == "classification":
        out = evaluate_classification(net, tok, examples, len(splits.labels), batch_size, max_length)
    else:
        with Progress(len(examples), description="generate") as bar:
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                bar.update(done[0])

            out = evaluate_generation(net, tok, examples, batch_size, max_new_tokens, progress=tick)
    return {"model": model, "data": data, "delta": str(delta) if delta else None, "split": split,
            "examples": len(examples), **out}
