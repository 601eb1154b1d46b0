"""The `deltatune` command line: train, eval, inspect."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from .errors import DeltaTuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning as deltas.")


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML file of training options (flags override it)"),
    model: Optional[str] = typer.Option(None, help="zoo model name or local HF directory"),
    data: Optional[str] = typer.Option(None, help="zoo dataset name or local .jsonl/.csv file"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o"),
    delta: Optional[str] = typer.Option(None, help='delta config as JSON/YAML, e.g. \'{kind: lora, r: 8}\''),
    epochs: Optional[float] = None,
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    lr: Optional[float] = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    seed: Optional[int] = None,
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output-dir"),
    set_: list[str] = typer.Option([], "--set", help="any training option as key=value (repeatable)"),
) -> None:
    """Train a delta on a zoo or local model and dataset; saves OUTPUT_DIR/delta, metrics.jsonl, training.png."""
    from .train import TrainConfig, train as run

    opts: dict[str, Any] = {"model": model, "data": data, "output_dir": output_dir, "epochs": epochs,
                            "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    if delta is not None:
        opts["delta"] = yaml.safe_load(delta)
    if resume:
        opts["resume"] = True
    opts.update(_parse_sets(set_))
    opts = {k: v for k, v in opts.items() if v is not None}
    try:
        cfg = TrainConfig.from_yaml(config, **opts) if config else TrainConfig.from_dict(opts)
        result = run(cfg)
    except DeltaTuneError as e:
        _fail(e)
    typer.echo(json.dumps(result.metrics, indent=2))
    if "test_accuracy" in result.metrics:
        typer.echo(f"test accuracy {result.metrics['test_accuracy']:.4f}, macro-F1 {result.metrics['test_macro_f1']:.4f}")
    typer.echo(f"delta saved to {result.delta_path}; metrics and plot in {result.output_dir}")


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., help="zoo model name or local HF directory"),
    data: str = typer.Option(..., help="zoo dataset name or local file"),
    delta: Optional[Path] = typer.Option(None, help="delta directory (native or PEFT); none = the base model"),
    split: str = typer.Option("test", help="train, validation or test"),
    limit: Optional[int] = typer.Option(None, help="evaluate the first N examples of the split"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    max_length: int = typer.Option(128, "--max-length"),
    output: Optional[Path] = typer.Option(None, help="write metrics (and generations) as JSON here"),
) -> None:
    """Accuracy and macro-F1 (classification) or final-number exact match (GSM8K-style generation)."""
    from .evaluation import run_eval

    try:
        metrics = run_eval(model, data, delta, split, limit, batch_size, max_new_tokens, max_length)
    except DeltaTuneError as e:
        _fail(e)
    if output is not None:
        output.write_text(json.dumps(metrics, indent=2))
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "outputs"}, indent=2))


@app.command()
def inspect(path: Path, as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Config, targets, parameter count, size on disk and base identity of a native or PEFT delta."""
    from .inspect_delta import describe, render

    try:
        info = describe(path)
    except DeltaTuneError as e:
        _fail(e)
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
