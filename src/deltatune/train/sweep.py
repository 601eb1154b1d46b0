"""Grid sweeps: a training config run over a grid of options × seeds, one subprocess per run, resumable.

`deltatune sweep config.yaml --grid lr=1e-4,5e-4 --grid r=4,8 --seeds 3` (cli/sweep.py) calls `run_sweep`. A grid
key is a training option (`lr`, `epochs`, ...) or a field of the config's delta (`r`, or dotted `delta.alpha`).
Every run trains in its own process (`python -m deltatune.train.sweep RUN/config.json`, `OMP_NUM_THREADS` set to
the sweep's threads per run), writes RUN/result.json, and the sweep records it in OUT/sweep.json as soon as it
finishes; a sweep started again with the same OUT skips recorded runs and reruns any that were interrupted.
OUT/sweep.md is the table (mean ± standard deviation over seeds of the chosen metric per grid point) and
OUT/sweep.png its plot.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, StateError
from ..core.parsing import load_yaml, read_json, short
from ..io.atomic import write_text
from .config import TrainConfig

#: options a sweep sets itself (per run), never from the grid
RESERVED = ("seed", "output_dir", "resume", "progress")
#: metrics tried, in order, when none is named
AUTO_METRICS = ("test_accuracy", "val_accuracy", "val_loss", "train_loss")
VERSION = 1


def split_values(text: str) -> list[str]:
    """`1e-4,5e-4` → ['1e-4', '5e-4']; commas inside brackets or braces stay (`targets=[q,v],all-linear`)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [*out, cur]


def parse_value(text: str, key: str) -> Any:
    """A grid value: an int or float as Python reads it (so `1e-4` is a number, which YAML 1.1 would keep as a
    string), otherwise YAML (`true`, `[q, v]`, `{a: 1}`, a bare word)."""
    text = text.strip()
    if not text:
        raise ConfigError(f"--grid {key}: empty value")
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return load_yaml(text, f"--grid {key} value {text!r}")


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`["lr=1e-4,5e-4", "r=4,8"]` → {"lr": [0.0001, 0.0005], "r": [4, 8]} (keys in the order given)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--grid {key} given twice; list all its values in one --grid")
        vals = [parse_value(v, key) for v in split_values(values)]
        if len({json.dumps(v, sort_keys=True) for v in vals}) != len(vals):
            raise ConfigError(f"--grid {key} repeats a value: {values}")
        grid[key] = vals
    if not grid:
        raise ConfigError("give at least one --grid key=v1,v2,...")
    return grid


def _delta_fields(delta: dict[str, Any]) -> list[str]:
    cfg = DeltaConfig.from_dict(dict(delta))
    return sorted(f.name for f in dataclasses.fields(cfg) if f.name != "kind")


def resolve_key(key: str, base: TrainConfig) -> tuple[str, str]:
    """Where a grid key goes: ("train", option) or ("delta", field). Training options win over delta fields of the
    same name; `delta.<field>` always names the delta's field."""
    options = sorted(f.name for f in dataclasses.fields(TrainConfig) if f.name not in (*RESERVED, "delta"))
    fields_ = _delta_fields(base.delta)
    if key.startswith("delta."):
        name = key[len("delta."):]
        if name in fields_:
            return "delta", name
        raise ConfigError(f"grid key {key!r}: the {base.delta['kind']!r} delta has no field {name!r}; its fields: "
                          f"{', '.join(fields_)}")
    if key in RESERVED:
        raise ConfigError(f"grid key {key!r} is set by the sweep itself" + (" (use --seeds)" if key == "seed" else ""))
    if key in options:
        return "train", key
    if key in fields_:
        return "delta", key
    raise ConfigError(f"unknown grid key {key!r}; known: training options {', '.join(options)}; fields of the "
                      f"{base.delta['kind']!r} delta {', '.join(fields_)} (or delta.<field>)")


def point_name(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={json.dumps(v, sort_keys=True) if not isinstance(v, str) else v}" for k, v in point.items())


def dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)[:150]


def run_options(base: TrainConfig, point: dict[str, Any], where: dict[str, tuple[str, str]], seed: int,
                out: Path) -> dict[str, Any]:
    """The full training options of one run (validated)."""
    opts = base.to_dict()
    delta = dict(opts["delta"])
    for key, value in point.items():
        kind, name = where[key]
        if kind == "delta":
            delta[name] = value
        else:
            opts[name] = value
    opts.update(delta=delta, seed=seed, output_dir=str(out), resume=False, progress=False)
    try:
        TrainConfig.from_dict(opts)
    except ConfigError as e:
        raise ConfigError(f"grid point {point_name(point)}: {e}") from None
    except (TypeError, ValueError) as e:  # a value of the wrong type for its option (lr=abc)
        raise ConfigError(f"grid point {point_name(point)}: a value of the wrong type ({e})") from None
    return opts


def parse_seeds(text: str | int) -> list[int]:
    """`3` → [0, 1, 2]; `0,5,7` → [0, 5, 7]."""
    text = str(text).strip()
    try:
        seeds = [int(s) for s in text.split(",")] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds takes a count (3) or a comma-separated list (0,5,7), got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds must give distinct seeds >= 0 (at least one), got {text!r}")
    return seeds


@dataclass
class Sweep:
    """What a sweep runs and what it has recorded (OUT/sweep.json)."""

    config: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: list[int]
    metric: str = "auto"
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        keys = list(self.grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(self.grid[k] for k in keys))]

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "config": self.config, "grid": self.grid, "seeds": self.seeds,
                "metric": self.metric, "runs": self.runs}


def run_id(point: dict[str, Any], seed: int) -> str:
    return f"{point_name(point)}/seed={seed}"


def load_state(out: Path, sweep: Sweep) -> Sweep:
    """The runs recorded in OUT/sweep.json (kept when the grid or seeds change); a different base config refuses."""
    path = out / "sweep.json"
    if not path.exists():
        return sweep
    stored = read_json(path, "sweep record", ConfigError)
    if not isinstance(stored, dict) or not isinstance(stored.get("runs"), dict):
        raise ConfigError(f"{str(path)!r} is not a sweep record (no runs)")
    if stored.get("config") != sweep.config:
        changed = sorted(k for k in set(sweep.config) | set(stored.get("config") or {})
                         if (stored.get("config") or {}).get(k) != sweep.config.get(k))
        raise ConfigError(f"{str(out)!r} holds a sweep of a different config (options that differ: "
                          f"{', '.join(changed)}); use another --out or remove it")
    sweep.runs = dict(stored["runs"])
    return sweep


def subprocess_runner(threads: int) -> Callable[[dict[str, Any], Path], dict[str, Any]]:
    """Run one training in its own process with `threads` CPU threads; its result.json."""

    def run(options: dict[str, Any], run_dir: Path) -> dict[str, Any]:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("result.json", "metrics.jsonl"):  # an interrupted earlier attempt
            (run_dir / stale).unlink(missing_ok=True)
        write_text(run_dir / "config.json", json.dumps(options, indent=1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        src = str(Path(__file__).resolve().parents[2])  # the package's root, for source checkouts
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        with (run_dir / "log.txt").open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "deltatune.train.sweep", str(run_dir / "config.json")],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0 or not (run_dir / "result.json").exists():
            tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise StateError(f"run {str(run_dir)!r} failed (exit {proc.returncode}): {short(tail[0], 300)}; full "
                             f"log in {str(run_dir / 'log.txt')!r}")
        return read_json(run_dir / "result.json", "run result", StateError)

    return run


def run_sweep(sweep: Sweep, out: Path, jobs: int = 1, threads: int = 1,
              runner: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None,
              log: Callable[[str], None] = lambda s: None) -> Sweep:
    """Run every (grid point, seed) not yet recorded in OUT/sweep.json, `jobs` at a time; record each as it
    finishes; write OUT/sweep.md and OUT/sweep.png. Returns the sweep with all its runs."""
    if jobs < 1 or threads < 1:
        raise ConfigError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    base = TrainConfig.from_dict(dict(sweep.config))
    sweep.config = {k: v for k, v in base.to_dict().items() if k not in RESERVED}  # normalised: defaults filled in
    where = {k: resolve_key(k, base) for k in sweep.grid}
    runs = [(run_id(point, seed), point, seed,
             run_options(base, point, where, seed, out / dir_name(point_name(point)) / f"seed-{seed}"))
            for point in sweep.points() for seed in sweep.seeds]  # every point checked before anything runs
    load_state(out, sweep)
    out.mkdir(parents=True, exist_ok=True)
    todo = [t for t in runs if t[0] not in sweep.runs]
    runner = runner or subprocess_runner(threads)
    total = len(runs)
    log(f"{total - len(todo)} of {total} runs recorded in {out / 'sweep.json'}; {len(todo)} to run, {jobs} at a time")
    failures: list[str] = []
    finished = total - len(todo)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(_timed, runner, opts): (rid, point, seed) for rid, point, seed, opts in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                rid, point, seed = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:  # one failed run does not discard the others
                    failures.append(str(e))
                    log(f"failed: {rid}: {e}")
                    continue
                sweep.runs[rid] = {"point": point, "seed": seed, **result}
                write_text(out / "sweep.json", json.dumps(sweep.to_dict(), indent=1))
                finished += 1
                log(f"done {finished}/{total}: {rid} ({result.get('wall_s', 0):.0f} s)")
    write_text(out / "sweep.json", json.dumps(sweep.to_dict(), indent=1))
    if failures:
        raise StateError(f"{len(failures)} run(s) failed; finished runs are kept (run again to retry): {failures[0]}")
    write_text(out / "sweep.md", render(sweep))
    plot(sweep, out / "sweep.png")
    return sweep


def _timed(runner: Callable[[dict[str, Any], Path], dict[str, Any]], opts: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = runner(opts, Path(opts["output_dir"]))
    return {"wall_s": time.perf_counter() - t0, **res}


def chosen_metric(sweep: Sweep) -> str:
    runs = [r for r in sweep.runs.values() if "metrics" in r]
    if sweep.metric != "auto":
        missing = [r for r in runs if sweep.metric not in r["metrics"]]
        if missing:
            raise ConfigError(f"metric {sweep.metric!r} is not among the runs' metrics "
                              f"{sorted(missing[0]['metrics'])}")
        return sweep.metric
    for name in AUTO_METRICS:
        if runs and all(name in r["metrics"] for r in runs):
            return name
    raise ConfigError(f"no metric common to all runs among {AUTO_METRICS}; name one with --metric")


def summary(sweep: Sweep) -> list[dict[str, Any]]:
    """Per grid point: its values, the metric's per-seed values, mean and sample standard deviation."""
    metric = chosen_metric(sweep)
    rows = []
    for point in sweep.points():
        vals = [sweep.runs[rid]["metrics"][metric] for seed in sweep.seeds
                if (rid := run_id(point, seed)) in sweep.runs]
        rows.append({"point": point, "values": vals, "mean": statistics.fmean(vals) if vals else math.nan,
                     "std": statistics.stdev(vals) if len(vals) > 1 else math.nan})
    return rows


def lower_is_better(metric: str) -> bool:
    return "loss" in metric


def render(sweep: Sweep) -> str:
    metric = chosen_metric(sweep)
    rows = summary(sweep)
    done = [r for r in rows if r["values"]]
    pick = (min if lower_is_better(metric) else max)(done, key=lambda r: r["mean"]) if done else None
    keys = list(sweep.grid)
    lines = [f"| {' | '.join(keys)} | {metric} (mean ± std) | seeds | per seed |",
             "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        cell = (f"{r['mean']:.4f} ± {r['std']:.4f}" if r["std"] == r["std"] else f"{r['mean']:.4f}") if r["values"] \
            else "—"
        if r is pick:
            cell = f"**{cell}**"
        vals = ", ".join(f"{v:.4f}" for v in r["values"])
        lines.append(f"| {' | '.join(_fmt(r['point'][k]) for k in keys)} | {cell} | {len(r['values'])} | {vals} |")
    lines += ["", f"{len(sweep.seeds)} seed(s) per point ({', '.join(map(str, sweep.seeds))}); std is the sample "
                  f"standard deviation over seeds; bold: the best mean ({'lowest' if lower_is_better(metric) else 'highest'})."]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else (json.dumps(v) if not isinstance(v, str) else v)


def plot(sweep: Sweep, path: Path) -> Path:
    """The metric (mean, std as error bars) against the first grid key, one line per value of the other keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = chosen_metric(sweep)
    rows = summary(sweep)
    keys = list(sweep.grid)
    xs = sweep.grid[keys[0]]
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    others = [dict(zip(keys[1:], c)) for c in itertools.product(*(sweep.grid[k] for k in keys[1:]))]
    for other in others:
        line = [r for r in rows if all(r["point"][k] == v for k, v in other.items()) and r["values"]]
        pos = [r["point"][keys[0]] if numeric else xs.index(r["point"][keys[0]]) for r in line]
        ax.errorbar(pos, [r["mean"] for r in line], yerr=[0 if r["std"] != r["std"] else r["std"] for r in line],
                    marker="o", capsize=3, label=", ".join(f"{k}={_fmt(v)}" for k, v in other.items()) or None)
    if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(xs)), [_fmt(x) for x in xs])
    ax.set_xlabel(keys[0])
    ax.set_ylabel(f"{metric} (mean ± std, {len(sweep.seeds)} seeds)")
    if len(others) > 1:
        ax.legend()
    ax.set_title("deltatune sweep")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _worker(config_path: str) -> None:
    """One run of a sweep: train with the options in CONFIG.json, write result.json beside it."""
    from .loop import train

    path = Path(config_path)
    options = read_json(path, "run config", ConfigError)
    t0 = time.perf_counter()
    result = train(options)
    metrics = {k: v for k, v in result.metrics.items() if k not in ("steps", "best_step")
               and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    losses = [r["loss"] for r in result.history if "loss" in r]
    if losses:
        metrics["train_loss"] = losses[-1]
    vals = [r for r in result.history if "val_loss" in r or "val_accuracy" in r]
    if vals:
        metrics.update({k: v for k, v in vals[-1].items() if k.startswith("val_") and isinstance(v, (int, float))})
    write_text(path.parent / "result.json", json.dumps({"metrics": metrics, "steps": result.steps,
                                                         "train_s": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    _worker(sys.argv[1])
