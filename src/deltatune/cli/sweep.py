"""`deltatune sweep`: a training config over a grid of options × seeds (registered on the app in main.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def sweep_command(
    config: Path = typer.Argument(..., help="YAML file of training options (as for `deltatune train`)"),
    grid: list[str] = typer.Option(..., "--grid", help="key=v1,v2,...: a training option (lr, epochs, ...) or a field "
                                   "of the delta (r, or delta.alpha); repeat for more keys (the grid is their product)"),
    seeds: str = typer.Option("1", "--seeds", help="seeds per point: a count (3 = seeds 0, 1, 2) or a list (0,5,7)"),
    jobs: int = typer.Option(1, "--jobs", help="runs at a time (each its own process)"),
    threads: int = typer.Option(1, "--threads", help="CPU threads per run (OMP_NUM_THREADS)"),
    metric: str = typer.Option("auto", "--metric", help="the metric tabulated: test_accuracy, test_macro_f1, val_loss, "
                               "train_loss, ... (auto: test accuracy, else validation accuracy, else losses)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="sweep directory (default runs/sweep-<config name>); "
                                       "running again with the same one resumes"),
) -> None:
    """Train every grid point with every seed (resumable); writes OUT/sweep.json, the table OUT/sweep.md (mean ± std
    of the metric per point) and the plot OUT/sweep.png."""
    from ..train.config import TrainConfig
    from ..train.sweep import Sweep, parse_grid, parse_seeds, render, run_sweep
    from .serve import _user_errors  # the one-line `error:` handling shared by the commands outside main.py

    with _user_errors():
        base = TrainConfig.from_yaml(config)
        sweep = Sweep(config=base.to_dict(), grid=parse_grid(grid), seeds=parse_seeds(seeds), metric=metric)
        target = out or Path("runs") / f"sweep-{config.stem}"
        run_sweep(sweep, target, jobs=jobs, threads=threads, log=lambda s: typer.echo(s, err=True))
        typer.echo(render(sweep))
    typer.echo(f"table {target / 'sweep.md'}, plot {target / 'sweep.png'}, runs {target / 'sweep.json'}")
