"""Draw a run from its step logs: loss and accuracy against steps and against bytes pushed.

:func:`plot_run` reads one or more workers' CSVs written by :class:`ranger_ps.observability.steplog.StepLog`
(and their evaluation logs, ``run.eval.csv`` next to ``run.csv``, when present) and writes one PNG
of 2 x 2 panels:

- top: training loss against the step (left) and against the megabytes the worker pushed (right);
  test loss as points where evaluations were logged;
- bottom: batch accuracy (where recorded) and test accuracy (points) against the same axes.

One line per worker (labelled by the CSV's name). Drawn with matplotlib's object API on the Agg
canvas: no display needed and no pyplot global state. From a shell::

    python -m ranger_ps.observability.plot worker-0.csv worker-1.csv --out run.png --title "mlp on digits"
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ranger_ps.observability.steplog import EvalRow, StepRow, eval_log_path, read_eval_log, read_step_log

_MB = 1e6


def _load(step_csvs: Sequence[Path]) -> list[tuple[str, list[StepRow], list[EvalRow]]]:
    runs = []
    for path in map(Path, step_csvs):
        steps = read_step_log(path)
        if not steps:
            raise ValueError(f"{path} has a header but no rows: nothing to plot")
        evals_path = eval_log_path(path)
        evals = read_eval_log(evals_path) if evals_path.is_file() and evals_path.stat().st_size > 0 else []
        runs.append((path.stem, steps, evals))
    return runs


def plot_run(step_csvs: Sequence[Path], out_png: Path, *, title: str = "") -> Path:
    """Draw the step logs ``step_csvs`` (one per worker) into the PNG ``out_png``; returns its path.

    Raises:
        FileNotFoundError: a CSV does not exist.
        ValueError: no CSV given, or one is empty, has no rows or lacks a column.
    """
    if not step_csvs:
        raise ValueError("plot_run needs at least one step log")
    runs = _load(step_csvs)
    figure = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(figure)
    (loss_step, loss_bytes), (acc_step, acc_bytes) = figure.subplots(2, 2, squeeze=False)
    any_accuracy = False
    for index, (name, steps, evals) in enumerate(runs):
        color = f"C{index % 10}"
        x_step = [r.step for r in steps]
        x_bytes = [r.bytes_pushed / _MB for r in steps]
        loss = [r.loss for r in steps]
        loss_step.plot(x_step, loss, color=color, linewidth=1, label=f"{name} (train)")
        loss_bytes.plot(x_bytes, loss, color=color, linewidth=1, label=f"{name} (train)")
        accuracy = [math.nan if r.batch_accuracy is None else r.batch_accuracy for r in steps]
        if any(r.batch_accuracy is not None for r in steps):
            any_accuracy = True
            acc_step.plot(x_step, accuracy, color=color, linewidth=1, alpha=0.6, label=f"{name} (batch)")
            acc_bytes.plot(x_bytes, accuracy, color=color, linewidth=1, alpha=0.6, label=f"{name} (batch)")
        if evals:
            any_accuracy = True
            e_step = [e.step for e in evals]
            e_bytes = [e.bytes_pushed / _MB for e in evals]
            for axes, xs in ((loss_step, e_step), (loss_bytes, e_bytes)):
                axes.plot(xs, [e.test_loss for e in evals], "o", color=color, mec="black", label=f"{name} (test)")
            for axes, xs in ((acc_step, e_step), (acc_bytes, e_bytes)):
                axes.plot(xs, [e.test_accuracy for e in evals], "o", color=color, mec="black", label=f"{name} (test)")
    _label(loss_step, "step", "loss", "loss against steps")
    _label(loss_bytes, "MB pushed", "loss", "loss against bytes pushed")
    _label(acc_step, "step", "accuracy", "accuracy against steps")
    _label(acc_bytes, "MB pushed", "accuracy", "accuracy against bytes pushed")
    if not any_accuracy:
        for axes in (acc_step, acc_bytes):
            axes.text(0.5, 0.5, "no accuracy recorded", ha="center", va="center", transform=axes.transAxes)
    if title:
        figure.suptitle(title)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)
    return out_png


def _label(axes: Axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ranger_ps.observability.plot STEP_CSV... --out PNG [--title T]``; exit 2 on a missing or bad CSV."""
    parser = argparse.ArgumentParser(prog="python -m ranger_ps.observability.plot", description=__doc__.splitlines()[0])
    parser.add_argument("step_csvs", type=Path, nargs="+", help="step logs written by StepLog (one per worker)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="a title above the panels")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.step_csvs, args.out, title=args.title)
    except (OSError, ValueError) as exc:
        print(f"ranger_ps.observability.plot: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
