"""training.png: the run's curves against steps, in panels sharing the step axis — loss (train and validation),
validation accuracy and macro-F1, learning rate — under a title naming the run. Legends sit outside the panels,
so no curve is ever hidden under one."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(history: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]


def history_figure(history: list[dict[str, Any]], title: str = "deltatune training") -> Any:
    """The matplotlib figure of a run's history (records as in metrics.jsonl): a panel per quantity present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, list[tuple[str, list[tuple[int, float]], dict[str, Any]]], tuple[float, float] | None]] = []
    loss = [("train loss", _series(history, "loss"), {}),
            ("validation loss", _series(history, "val_loss"), {"marker": "o"})]
    scores = [("validation accuracy", _series(history, "val_accuracy"), {"marker": "s"}),
              ("validation macro-F1", _series(history, "val_macro_f1"), {"marker": "^"})]
    lr = [("learning rate", _series(history, "lr"), {"color": "tab:gray"})]
    for name, curves, limits in (("loss", loss, None), ("score", scores, (0.0, 1.02)), ("lr", lr, None)):
        curves = [c for c in curves if c[1]]
        if curves:
            panels.append((name, curves, limits))
    fig, axes = plt.subplots(max(len(panels), 1), 1, sharex=True, squeeze=False,
                             figsize=(9, 2.3 * max(len(panels), 1) + 0.8))
    for ax, (name, curves, limits) in zip(axes[:, 0], panels):
        for label, points, style in curves:
            ax.plot(*zip(*points), label=label, **style)
        ax.set_ylabel(name)
        if limits is not None:
            ax.set_ylim(*limits)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict[str, Any]], path: Path, title: str = "deltatune training") -> Path:
    import matplotlib.pyplot as plt

    fig = history_figure(history, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def run_title(name: str, output_dir: str, kind: str, model: str, data: str) -> str:
    """The plot's title: the run's name and directory, and what was trained on what."""
    return f"run {name!r} ({output_dir}): {kind} on {model}, data {Path(data).name}"
