"""`deltatune eval`: a model (optionally with a delta) on a split of a zoo or local dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from ..core.parsing import short
from ..io.delta import Delta
from ..io.files import load
from ..io.formats import format_of
from .config import TrainConfig
from .data import subset
from .evaluate import evaluate_classification, evaluate_generation
from .loop import load_model, load_splits
from ..core.progress import Progress


def run_eval(model: str, data: str, delta: Path | None, split: str = "test", limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int = 256, max_length: int = 128,
             output: Path | None = None) -> dict[str, Any]:
    """Metrics of `model` (with `delta`, if given) on `limit` examples of `split`, stratified by label (all with None). Every
    argument is checked before anything is loaded; `output`, if given, is where the caller will write the metrics
    (checked here, before the evaluation runs: a directory that exists, a name that is not a directory)."""
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {short(split)}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ConfigError(f"limit must be a positive number of examples (or None for all), got {short(limit)}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("max_length", max_length)):
        if type(value) is not int or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {short(value)}")
    if output is not None:
        check_output_file(Path(output))
    provided = None
    if delta is not None:
        format_of(Path(delta))  # the delta directory exists and holds a delta, before the model is loaded
        saved = Delta.read_meta(delta).config.modules_to_save  # modules it brings (e.g. the head): no load warning
        provided = lambda _: saved  # noqa: E731
    cfg = TrainConfig(model=model, data=data)
    splits = load_splits(cfg)
    examples = subset(getattr(splits, split), limit, cfg.seed)  # stratified by label, not the first `limit`
    if not examples:
        raise ConfigError(f"dataset {short(data)} has no {split} examples")
    net, tok = load_model(cfg, splits.task, len(splits.labels) if splits.labels else None, provided)
    if delta is not None:
        load(net, delta)
    if splits.task == "classification":
        with Progress(len(examples), description="eval") as bar:
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                bar.update(done[0])

            out = evaluate_classification(net, tok, examples, len(splits.labels), batch_size, max_length, advance)
    else:
        with Progress(len(examples), description="generate") as bar:
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                bar.update(done[0])

            out = evaluate_generation(net, tok, examples, batch_size, max_new_tokens, progress=tick)
    return {"model": model, "data": data, "delta": str(delta) if delta else None, "split": split,
            "examples": len(examples), **out}


def check_output_file(output: Path) -> None:
    """Refuse, before any work, an output file whose directory does not exist or that names a directory."""
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"output file {str(output)!r}: the directory {str(parent)!r} does not exist"
                          + (" (it is a file)" if parent.exists() else "") + "; create it first")
    if output.is_dir():
        raise ConfigError(f"output file {str(output)!r} is a directory; give a file name, e.g. "
                          f"{str(output / 'metrics.json')!r}")
