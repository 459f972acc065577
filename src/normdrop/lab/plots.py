"""The lab's figures, written as PNG and SVG side by side.

- ``learning_curves``: train and validation accuracy per epoch, per variant: the mean over seeds
  with its 95% confidence band (Student t; seeds that stopped early drop out of later epochs).
- ``gap``: the train - validation accuracy gap per epoch, and the final train - test gap per
  variant with its 95% interval.
- ``preactivations``: the 15th, 50th and 85th percentiles of one hidden unit's input to its
  activation, over training (Ioffe & Szegedy 2015, fig. 1), for the first seed of each variant.
- for ``tune``: parameter importances and the optimization history.

Matplotlib's object API is used without pyplot: no global state, no display needed. Files carry
no date, so the same results give the same bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normdrop.lab.files import replace_atomically
from normdrop.lab.stats import mean_interval
from normdrop.lab.summary import VariantSummary

__all__ = [
    "Plot",
    "gap_plot",
    "importance_plot",
    "learning_curves",
    "preactivation_plot",
    "tune_history_plot",
]

History = Sequence[Mapping[str, float]]  # one run's epoch rows, in order


@dataclass(frozen=True)
class Plot:
    """A written figure: its name, title, caption, and the PNG and SVG paths."""

    name: str
    title: str
    caption: str
    png: Path
    svg: Path


def _save(figure: Figure, out_dir: Path, name: str, title: str, caption: str) -> Plot:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, svg = out_dir / f"{name}.png", out_dir / f"{name}.svg"
    with matplotlib.rc_context({"svg.hashsalt": "normdrop", "svg.fonttype": "none"}):
        # Written aside, then renamed: two labs finishing at once never interleave a file.
        for path, options in (
            (png, {"dpi": 110, "metadata": {"Software": None}}),
            (svg, {"metadata": {"Date": None, "Creator": None}}),
        ):
            save = functools.partial(figure.savefig, format=path.suffix[1:], **options)
            replace_atomically(path, save)
    return Plot(name, title, caption, png, svg)


def _band(runs: Sequence[History], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs, mean and half-width over the runs that reached each epoch."""
    longest = max((len(run) for run in runs), default=0)
    means, halves = [], []
    for epoch in range(longest):
        interval = mean_interval([run[epoch][key] for run in runs if len(run) > epoch])
        means.append(interval.mean)
        halves.append(0.0 if np.isnan(interval.half_width) else interval.half_width)
    return np.arange(1, longest + 1), np.array(means), np.array(halves)


def _epoch_axis(ax) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _axes_row(count: int, height: float = 3.2):
    figure = Figure(figsize=(max(4.0, 3.4 * count), height), layout="constrained")
    axes = figure.subplots(1, count, sharey=True, squeeze=False)[0]
    return figure, axes


def learning_curves(histories: Mapping[str, Sequence[History]], out_dir: Path) -> Plot:
    """Train and validation accuracy (%) per epoch, per variant, with 95% bands over seeds."""
    figure, axes = _axes_row(len(histories))
    for ax, (variant, runs) in zip(axes, histories.items(), strict=True):
        for key, label, color in (("train_acc", "train", "C0"), ("val_acc", "validation", "C1")):
            epochs, mean, half = _band(runs, key)
            ax.plot(epochs, 100 * mean, color=color, label=label)
            ax.fill_between(
                epochs, 100 * (mean - half), 100 * (mean + half), color=color, alpha=0.25
            )
        ax.set_title(f"{variant} ({len(runs)} seeds)")
        _epoch_axis(ax)
    # A t-interval of a mean near 100% can poke above it; the view stops at the possible.
    axes[0].set_ylim(top=min(axes[0].get_ylim()[1], 101))
    axes[0].set_ylabel("accuracy % (eval mode)")
    axes[0].legend(loc="lower right")
    caption = "Mean over seeds; bands: 95% Student-t confidence interval of the mean."
    return _save(figure, out_dir, "learning_curves", "Learning curves", caption)


def gap_plot(
    histories: Mapping[str, Sequence[History]],
    summaries: Sequence[VariantSummary],
    out_dir: Path,
) -> Plot:
    """Train - validation gap per epoch, and final train - test gap per variant (points)."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    over_time, final = figure.subplots(1, 2)
    for i, (variant, runs) in enumerate(histories.items()):
        gaps = [[{"gap": r["train_acc"] - r["val_acc"]} for r in run] for run in runs]
        epochs, mean, half = _band(gaps, "gap")
        over_time.plot(epochs, 100 * mean, color=f"C{i}", label=variant)
        over_time.fill_between(
            epochs, 100 * (mean - half), 100 * (mean + half), color=f"C{i}", alpha=0.2
        )
    over_time.set(ylabel="train - validation accuracy (points)")
    over_time.set_title("gap during training")
    over_time.legend()
    _epoch_axis(over_time)
    names = [s.variant for s in summaries]
    means = [100 * s.metrics["gap"].mean for s in summaries]
    errors = [100 * np.nan_to_num(s.metrics["gap"].half_width) for s in summaries]
    final.bar(names, means, yerr=errors, capsize=6, color=[f"C{i}" for i in range(len(names))])
    final.set(ylabel="train - test accuracy (points)")
    final.set_title("gap of the selected model")
    final.axhline(0, color="black", linewidth=0.8)
    final.grid(axis="y", alpha=0.3)
    caption = "Generalization gap; bands and error bars: 95% confidence intervals over seeds."
    return _save(figure, out_dir, "gap", "Generalization gap", caption)


def preactivation_plot(histories: Mapping[str, History], out_dir: Path) -> Plot:
    """15/50/85th percentiles of one hidden unit's pre-activation per epoch, per variant."""
    figure, axes = _axes_row(len(histories))
    for ax, (variant, run) in zip(axes, histories.items(), strict=True):
        epochs = np.arange(1, len(run) + 1)
        for key, label, style in (
            ("preact_p85", "85th", "--"),
            ("preact_p50", "50th", "-"),
            ("preact_p15", "15th", ":"),
        ):
            ax.plot(epochs, [row[key] for row in run], style, color="C2", label=label)
        ax.set_title(variant)
        _epoch_axis(ax)
    axes[0].set_ylabel("input of the last hidden ReLU, unit 0")
    axes[0].legend(title="percentile")
    caption = (
        "Distribution over the validation set (eval mode) of one unit's pre-activation in the "
        "last hidden layer, first seed (Ioffe & Szegedy 2015, fig. 1)."
    )
    return _save(figure, out_dir, "preactivations", "Pre-activation percentiles", caption)


def importance_plot(importances: Mapping[str, float], out_dir: Path) -> Plot:
    """Horizontal bars: each hyperparameter's share of the variance of validation accuracy."""
    figure = Figure(figsize=(6, 0.6 * len(importances) + 1.2), layout="constrained")
    ax = figure.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[name] for name in names], color="C0")
    ax.set(xlabel="importance (fANOVA)", xlim=(0, 1))
    ax.grid(axis="x", alpha=0.3)
    caption = "Share of validation-accuracy variance explained by each hyperparameter (fANOVA)."
    return _save(figure, out_dir, "importance", "Hyperparameter importance", caption)


def tune_history_plot(trials: Sequence[Mapping], out_dir: Path) -> Plot:
    """Each trial's validation accuracy (pruned ones marked) and the best so far.

    ``trials``: mappings with ``number``, ``state`` (``complete``/``pruned``) and ``value``.
    """
    figure = Figure(figsize=(7, 3.6), layout="constrained")
    ax = figure.subplots()
    values = [(t["number"], t["value"], t["state"]) for t in trials if t["value"] is not None]
    for state, marker, color in (("complete", "o", "C0"), ("pruned", "x", "C3")):
        points = [(number, value) for number, value, s in values if s == state]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, 100 * np.array(ys), marker=marker, color=color, label=state)
    complete = sorted((n, v) for n, v, s in values if s == "complete")
    if complete:
        numbers, scores = zip(*complete, strict=True)
        ax.step(
            numbers, 100 * np.maximum.accumulate(scores), where="post", color="C1", label="best"
        )
    ax.set(xlabel="trial", ylabel="validation accuracy %")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)
    caption = "Best validation accuracy of each trial; pruned trials: their last reported value."
    return _save(figure, out_dir, "history", "Optimization history", caption)
