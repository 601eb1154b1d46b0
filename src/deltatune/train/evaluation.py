"""`deltatune eval`: a model (optionally with a delta) on a split of a zoo or local dataset."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import ConfigError
from ..core.parsing import read_json, short
from ..core.targeting import head_paths
from ..io.checkpoints import CheckpointReader
from ..io.delta import Delta
from ..io.files import apply
from ..io.formats import format_of
from .config import TrainConfig
from .data import subset
from .evaluate import evaluate_classification, evaluate_generation
from .loop import load_model, load_splits
from ..core.progress import Progress


#: the options of a training run that say how its data is read and its model built: `deltatune eval --delta
#: <run>/delta` takes them from <run>/train_config.json (flags override), so it evaluates what the run trained
RUN_OPTIONS = ("model", "data", "task", "text_column", "label_column", "prompt_column", "response_column",
               "answer_column", "validation_data", "test_data", "max_length", "max_new_tokens", "seed", "quantize")


def run_options(delta: Path | None) -> dict[str, Any]:
    """The data and model options of the training run whose delta is `delta` (<run>/delta, next to
    <run>/train_config.json), or {} for a delta that is not in a run directory."""
    if delta is None:
        return {}
    path = Path(delta).parent / "train_config.json"
    if not path.is_file():
        return {}
    saved = read_json(path, "run config", ConfigError)
    if not isinstance(saved, dict):
        raise ConfigError(f"run config {str(path)!r} must be a JSON object of training options, got {short(saved)}")
    return {k: saved[k] for k in RUN_OPTIONS if saved.get(k) is not None}


def run_eval(model: str | None, data: str | None, delta: Path | None, split: str = "test", limit: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, max_length: int | None = None,
             output: Path | None = None) -> dict[str, Any]:
    """Metrics of `model` (with `delta`, if given) on `limit` examples of `split`, stratified by label (all with None). Every
    argument is checked before anything is loaded; `output`, if given, is where the caller will write the metrics
    (checked here, before the evaluation runs: a directory that exists, a name that is not a directory).

    A delta saved by a training run (<run>/delta) is evaluated with the run's data and model options (`RUN_OPTIONS`:
    model, data, max_length, columns, seed, ...) read from <run>/train_config.json; arguments given here override
    them. A classification delta must hold the model's head (its `modules_to_save`): a head left at its random
    initialisation is refused."""
    if split not in ("train", "validation", "test"):
        raise ConfigError(f"split must be train, validation or test, got {short(split)}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ConfigError(f"limit must be a positive number of examples (or None for all), got {short(limit)}")
    if type(batch_size) is not int or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {short(batch_size)}")
    if output is not None:
        check_output_file(Path(output))
    provided = None
    if delta is not None:
        format_of(Path(delta))  # the delta directory exists and holds a delta, before the model is loaded
        saved = Delta.read_meta(delta).config.modules_to_save  # modules it brings (e.g. the head): no load warning
        provided = lambda _: saved  # noqa: E731
    given = {"model": model, "data": data, "max_new_tokens": max_new_tokens, "max_length": max_length}
    options = {**run_options(delta), **{k: v for k, v in given.items() if v is not None}}
    for name in ("model", "data"):
        if name not in options:
            raise ConfigError(f"give the {name} to evaluate on (--{name}), or the delta of a training run "
                              f"(<run>/delta), whose train_config.json names it")
    cfg = TrainConfig.from_dict(options)  # typed and checked like a training run's options
    splits = load_splits(cfg)
    examples = subset(getattr(splits, split), limit, cfg.seed)  # stratified by label, not the first `limit`
    if not examples:
        raise ConfigError(f"dataset {short(cfg.data)} has no {split} examples")
    net, tok = load_model(cfg, splits.task, len(splits.labels) if splits.labels else None, provided)
    if delta is not None:
        detached = Delta.read(delta)
        if splits.task == "classification":
            check_head(net, cfg.model, detached, delta)
        apply(net, detached)
    if splits.task == "classification":
        with Progress(len(examples), description="eval") as bar:
            done = [0]

            def advance(n: int) -> None:
                done[0] += n
                bar.update(done[0])

            out = evaluate_classification(net, tok, examples, len(splits.labels), batch_size, cfg.max_length, advance)
    else:
        with Progress(len(examples), description="generate") as bar:
            done = [0]

            def tick(n: int) -> None:
                done[0] += n
                bar.update(done[0])

            out = evaluate_generation(net, tok, examples, batch_size, cfg.max_new_tokens, progress=tick)
    return {"model": cfg.model, "data": cfg.data, "delta": str(delta) if delta else None, "split": split,
            "examples": len(examples), "max_length": cfg.max_length, **out}


def check_head(net: nn.Module, model: str, delta: Delta, where: Path) -> None:
    """ConfigError unless `delta` holds every classification head of `net` that the base model does not bring
    trained: a zoo model's head is always new, a local directory's is new unless its checkpoint holds it."""
    heads = sorted(head_paths(net) & {p for p, m in net.named_modules() if hasattr(m, "weight")})
    from .. import zoo

    saved: set[str] = set()
    if model not in zoo.list_models() and Path(model).is_dir():
        saved = {k[: -len(".weight")] for k in CheckpointReader(model).files if k.endswith(".weight")}
    fresh = [h for h in heads if not any(k == h or k.endswith("." + h) for k in saved)]
    missing = [h for h in fresh if h not in delta.state]
    if missing:
        raise ConfigError(f"delta {str(where)!r} holds no classification head: {', '.join(missing)} would keep its "
                          f"random initialisation and the metrics would mean nothing; a classification delta saves its "
                          f"head whole in modules_to_save (training does so by default; a merge recipe's modules "
                          f"filter must keep it)")


def check_output_file(output: Path) -> None:
    """Refuse, before any work, an output file whose directory does not exist or that names a directory."""
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"output file {str(output)!r}: the directory {str(parent)!r} does not exist"
                          + (" (it is a file)" if parent.exists() else "") + "; create it first")
    if output.is_dir():
        raise ConfigError(f"output file {str(output)!r} is a directory; give a file name, e.g. "
                          f"{str(output / 'metrics.json')!r}")
