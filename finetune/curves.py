"""curves.png: a picture of a run (loss, eval loss, learning rate, tokens/s, and any extra series over steps).

matplotlib is the field's standard plotting library; the Agg backend draws to a file with no display.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

Series = Sequence[Sequence[float]]  # [[step, value], ...] as summary.json stores them


def write_curves(
    path: str | Path,
    losses: Series,
    evals: Series,
    lrs: Optional[Series] = None,
    tokens_per_s: Optional[Series] = None,
    extra: Optional[Mapping[str, Mapping[str, Series]]] = None,
):
    """Draw the run's curves into `path` (a PNG, replaced atomically) and return the matplotlib Figure.

    `extra` adds one panel per entry, each with named series: e.g. for DPO
    {"rewards": {"chosen": [...], "rejected": [...]}, "margin": {"margin": [...]}}.
    Panels with no data are left out; train loss always has its panel.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display: draw to a file, also in a headless training job
    from matplotlib.figure import Figure

    panels: list[tuple[str, dict[str, Series]]] = [("loss", {"train": losses, "eval": evals})]
    if lrs:
        panels.append(("learning rate", {"lr": lrs}))
    if tokens_per_s:
        panels.append(("tokens/s", {"tokens/s": tokens_per_s}))
    for title, series in (extra or {}).items():
        if any(series.values()):
            panels.append((title, dict(series)))

    # A Figure not registered with pyplot: no global state, freed with the last reference.
    fig = Figure(figsize=(8, 2.6 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, series) in zip(axes, panels):
        for label, points in series.items():
            if not points:
                continue
            steps, values = zip(*((float(s), float(v)) for s, v in points))
            # A lone eval point would be invisible as a line.
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 20 else None)
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        if len([p for p in series.values() if p]) > 1:
            ax.legend(loc="best")
    axes[-1].set_xlabel("step")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed over it: a reader never sees half a PNG.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fig


def write_run_curves(path: str | Path, losses: Series, evals: Series, history: Sequence) -> None:
    """curves.png of a training run from its recorded steps (TrainState: losses, evals, and history's
    [step, {lr, tokens_per_s, objective metrics}]); DPO/ORPO runs get rewards and margin panels."""

    def series(key: str) -> list[list[float]]:
        return [[step, values[key]] for step, values in history if key in values]

    extra = {}
    if series("rewards/chosen"):
        extra = {"rewards": {"chosen": series("rewards/chosen"), "rejected": series("rewards/rejected")},
                 "reward margin": {"margin": series("rewards/margins")},
                 "reward accuracy": {"accuracy": series("rewards/accuracies")}}
    write_curves(path, losses, evals, series("lr"), series("tokens_per_s"), extra)
