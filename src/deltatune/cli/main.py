"""The `deltatune` command line: train, eval, inspect, convert, merge, compress, extract, serve, export, sweep, keys."""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import typer

from ..core.errors import DeltaTuneError
from ..core.parsing import load_yaml, printable
from .convert import convert_command
from .export import export_command
from .serve import keys_app, serve_command
from .threads import file_command_threads
from .sweep import sweep_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient fine-tuning as deltas.")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"deltatune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print deltatune's version and exit")) -> None:
    """Parameter-efficient fine-tuning as deltas."""


def _parse_sets(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = load_yaml(value, f"--set {key.strip()!r}")
    return out


def _print_report(report: Any, as_json: bool, done: str) -> None:
    """A compression/extraction report as JSON, or as a table followed by what was written."""
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.render())
        if done:
            typer.echo(done)


def _fail(e: Exception) -> None:
    """One `error:` line on stderr (control characters escaped, so a file's contents cannot drive the terminal) and
    exit status 2."""
    text = str(e) if not isinstance(e, OSError) or not e.strerror else (
        f"{e.strerror}: {e.filename!r}" if e.filename is not None else e.strerror)
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    typer.secho(f"error: {printable(line)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every error a user can cause into one `error:` line and exit status 2: deltatune's own errors and the
    operating system's (a path that cannot be read or written). Anything else is a bug and keeps its traceback."""
    try:
        yield
    except (DeltaTuneError, OSError) as e:
        _fail(e)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML file of training options (flags override it)"),
    model: Optional[str] = typer.Option(None, help="zoo model name or local HF directory"),
    data: Optional[str] = typer.Option(None, help="zoo dataset name or local .jsonl/.csv file"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="run directory (delta, metrics, "
                                                                            "checkpoints); default runs/default"),
    delta: Optional[str] = typer.Option(None, help='delta config as JSON/YAML, e.g. \'{kind: lora, r: 8}\''),
    epochs: Optional[float] = typer.Option(None, help="passes over the training set (fractions allowed)"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop after this many optimizer steps"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate, e.g. 2e-4"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="examples per optimizer step"),
    seed: Optional[int] = typer.Option(None, help="seed of initialisation, data order and subsets"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in output-dir"),
    device: Optional[str] = typer.Option(None, help="auto (a GPU when CUDA is available, else the CPU), cpu, cuda "
                                                     "(cuda:LOCAL_RANK under torchrun) or cuda:N; default auto"),
    precision: Optional[str] = typer.Option(None, help="fp32, bf16 (autocast) or fp16 (autocast with a gradient "
                                                        "scaler); parameters keep their dtype; default fp32"),
    set_: list[str] = typer.Option([], "--set", help="any training option as key=value (repeatable)"),
) -> None:
    """Train a delta on a zoo or local model and dataset; saves OUTPUT_DIR/delta, metrics.jsonl, training.png."""
    from ..train import TrainConfig, train as run

    opts: dict[str, Any] = {"model": model, "data": data, "output_dir": output_dir, "epochs": epochs,
                            "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "seed": seed,
                            "device": device, "precision": precision}
    with _user_errors():
        if delta is not None:
            opts["delta"] = load_yaml(delta, "--delta")
        if resume:
            opts["resume"] = True
        opts.update(_parse_sets(set_))
        opts = {k: v for k, v in opts.items() if v is not None}
        cfg = TrainConfig.from_yaml(config, **opts) if config else TrainConfig.from_dict(opts)
        result = run(cfg)
    typer.echo(json.dumps(result.metrics, indent=2))
    if "test_accuracy" in result.metrics:
        typer.echo(f"test accuracy {result.metrics['test_accuracy']:.4f}, macro-F1 {result.metrics['test_macro_f1']:.4f}")
    typer.echo(f"delta saved to {result.delta_path}; metrics and plot in {result.output_dir}")


@app.command("eval")
def evaluate(
    model: Optional[str] = typer.Option(None, help="zoo model name or local HF directory; default: the training "
                                                   "run's (<run>/train_config.json next to --delta)"),
    data: Optional[str] = typer.Option(None, help="zoo dataset name or local file; default: the training run's"),
    delta: Optional[Path] = typer.Option(None, help="delta directory (native or PEFT); none = the base model"),
    split: str = typer.Option("test", help="train, validation or test"),
    limit: Optional[int] = typer.Option(None, help="evaluate N examples of the split, stratified by label"),
    batch_size: int = typer.Option(16, "--batch-size", help="examples per forward pass"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="generation: tokens generated per "
                                                 "example; default: the training run's, else 256"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="tokens per example (longer ones are cut); "
                                             "default: the training run's, else 128"),
    output: Optional[Path] = typer.Option(None, help="write metrics (and generations) as JSON here"),
) -> None:
    """Accuracy and macro-F1 (classification) or final-number exact match (GSM8K-style generation).

    A delta in a training run's directory (<run>/delta) is evaluated with that run's model, data and data options
    (max_length, columns, seed) from <run>/train_config.json; flags override them."""
    from ..train.evaluation import run_eval

    with _user_errors():  # run_eval checks --output before it evaluates anything
        metrics = run_eval(model, data, delta, split, limit, batch_size, max_new_tokens, max_length, output=output)
        if output is not None:
            output.write_text(json.dumps(metrics, indent=2))
    typer.echo(json.dumps({k: v for k, v in metrics.items() if k != "outputs"}, indent=2))


@app.command()
def inspect(path: Path = typer.Argument(..., help="delta directory (native, PEFT or AdapterHub)"),
            as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """Format, the libraries that load it, config, targets, parameter count, size on disk and base identity of a delta."""
    from ..io.inspect import describe, render

    with _user_errors():
        info = describe(path)
    typer.echo(json.dumps(info, indent=2) if as_json else render(info))


@app.command("compress")
def compress_cmd(
    src: Path = typer.Argument(..., metavar="IN", help="delta directory (native or PEFT)"),
    out: Path = typer.Argument(..., metavar="OUT", help="directory to write the compressed delta to"),
    method: str = typer.Option("compeft", help="compeft (top-k, ternary values) or svd (low rank)"),
    density: float = typer.Option(0.1, help="compeft: fraction of each tensor's entries kept"),
    alpha: float = typer.Option(1.0, help="compeft: kept entries become ±alpha·std of the original tensor"),
    on: str = typer.Option("delta_w", help="compeft: delta_w (ternary result: bit mask, sign bits, one scale) or factors (A and B of a LoRA delta)"),
    rank: Optional[int] = typer.Option(None, help="svd: rank cap per module"),
    energy: Optional[float] = typer.Option(None, help="svd: fraction of each module's squared norm to keep"),
    base: Optional[Path] = typer.Option(None, help="base model directory, for updates that depend on it (DoRA, full copies)"),
    force: bool = typer.Option(False, "--force", help="write the result even when it is not smaller than IN"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Compress a delta (ComPEFT or SVD); prints size ratio and relative error per module, writes OUT atomically.
    A result that is not smaller than IN is not written (exit status 2) unless --force."""
    from ..core.errors import NotSmallerWarning
    from ..io.delta import Delta
    from ..io.formats import check_output
    from ..merging.compress import compress

    with _user_errors(), warnings.catch_warnings(), file_command_threads():
        warnings.simplefilter("ignore", NotSmallerWarning)  # said below, once, as one line
        check_output(out)  # an unsafe output is refused before any work
        delta = Delta.read(src)
        result, report = compress(delta, method, density=density, alpha=alpha, on=on, rank=rank, energy=energy,
                                  base=base, progress=not as_json)
        if not report.smaller and not force:
            _print_report(report, as_json, "")
            raise DeltaTuneError(f"{report.notes[-1]}; nothing written to {str(out)!r} (--force writes it anyway)")
        result.write(out)
    _print_report(report, as_json, f"compressed delta ({result.config.kind}) written to {out}")
    if not report.smaller:
        typer.secho(f"warning: the compressed delta is not smaller than its input (size ratio {report.ratio:.2f}x)",
                    fg=typer.colors.YELLOW, err=True)


@app.command("extract")
def extract_cmd(
    base: Path = typer.Option(..., "--base", help="base model directory (HF, safetensors)"),
    tuned: Path = typer.Option(..., "--tuned", help="fine-tuned model directory of the same architecture"),
    output: Path = typer.Option(..., "--output", "-o", help="directory to write the LoRA delta to"),
    rank: Optional[int] = typer.Option(None, help="rank cap per module"),
    energy: Optional[float] = typer.Option(None, help="per module, the smallest rank keeping this fraction of ‖ΔW‖²"),
    dense: list[str] = typer.Option([], "--dense", help="module-name suffix kept whole, e.g. embed_tokens (repeatable)"),
    targets: list[str] = typer.Option([], "--targets", help="module-name suffix to factor (repeatable); default all-linear"),
    name: str = typer.Option("extracted", help="the delta's name"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """LoRA delta from W_tuned − W_base (per-module SVD); prints each module's rank and relative error."""
    from ..io.formats import check_output
    from ..merging.extract import extract

    with _user_errors(), file_command_threads():
        check_output(output)  # an unsafe output is refused before any work
        delta, report = extract(base, tuned, rank=rank, energy=energy, dense=tuple(dense),
                                targets=tuple(targets) if targets else "all-linear", name=name, progress=not as_json)
        delta.write(output)
    _print_report(report, as_json, f"delta {name!r} written to {output}")


@app.command("merge")
def merge_cmd(
    recipe: Path = typer.Argument(..., help="YAML merge recipe (docs/merging.md, section Recipes)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Merge deltas, PEFT adapters or full models as a recipe says; checks the whole recipe before any work."""
    from ..merging.recipe import load_recipe, render, run_recipe

    with _user_errors(), file_command_threads():
        summary = run_recipe(load_recipe(recipe), progress=not (quiet or as_json))
    typer.echo(json.dumps(summary, indent=2) if as_json else render(summary))


app.command("serve")(serve_command)
app.command("convert")(convert_command)
app.command("sweep")(sweep_command)
app.command("export")(export_command)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
