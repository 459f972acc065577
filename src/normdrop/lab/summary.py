"""From completed runs to the lab's tables: one row per variant, every number with its interval.

Accuracies are in percent, with 95% Student-t intervals over seeds. The gap is train accuracy
minus test accuracy of the selected model (how much it fits its training data beyond what
generalizes). ``Δ test`` is the paired difference in test accuracy against ``plain`` (same
seeds), with its interval and the paired t-test's p-value. The console and the HTML report
print the same cells, made here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from normdrop.lab.stats import Comparison, Interval, mean_interval, paired_comparison

__all__ = [
    "ACCURACY_COLUMNS",
    "LOSS_COLUMNS",
    "VariantSummary",
    "accuracy_rows",
    "claims",
    "loss_rows",
    "summarize",
]

BASELINE = "plain"
_METRICS = ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss")


@dataclass(frozen=True)
class VariantSummary:
    """Intervals over the completed seeds of one variant, and its paired tests against plain."""

    variant: str
    seeds: tuple[int, ...]
    metrics: dict[str, Interval]  # _METRICS, "gap", "best_epoch", "seconds"
    test_vs_plain: Comparison | None
    gap_vs_plain: Comparison | None


def _gap(run: dict) -> float:
    if run["test_acc"] is None:
        return math.nan
    return run["train_acc"] - run["test_acc"]


def _value(run: dict, name: str) -> float:
    if name == "gap":
        return _gap(run)
    value = run[name]
    return math.nan if value is None else float(value)


def _paired(runs: list[dict], baseline: dict[int, dict], metric: str) -> Comparison | None:
    pairs = [(run, baseline[run["seed"]]) for run in runs if run["seed"] in baseline]
    if not pairs:
        return None
    return paired_comparison(
        [_value(run, metric) for run, _ in pairs], [_value(base, metric) for _, base in pairs]
    )


def summarize(runs: Sequence[dict]) -> list[VariantSummary]:
    """Summaries of the complete runs, by variant in order of first appearance."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        if run["status"] == "complete":
            by_variant.setdefault(run["variant"], []).append(run)
    baseline = {run["seed"]: run for run in by_variant.get(BASELINE, [])}
    summaries = []
    for variant, group in by_variant.items():
        names = (*_METRICS, "gap", "best_epoch", "seconds")
        metrics = {name: mean_interval([_value(run, name) for run in group]) for name in names}
        compare = variant != BASELINE and baseline
        summaries.append(
            VariantSummary(
                variant,
                tuple(run["seed"] for run in group),
                metrics,
                _paired(group, baseline, "test_acc") if compare else None,
                _paired(group, baseline, "gap") if compare else None,
            )
        )
    return summaries


def format_p(p_value: float) -> str:
    if math.isnan(p_value):
        return "n/a"
    return "<0.001" if p_value < 0.001 else f"{p_value:.3f}"


def _comparison_cells(variant: str, comparison: Comparison | None) -> list[str]:
    if comparison is None:
        return ["(baseline)" if variant == BASELINE else "no plain runs", ""]
    return [comparison.difference.format(100, sign=True), format_p(comparison.p_value)]


ACCURACY_COLUMNS = (
    "variant",
    "seeds",
    "train acc %",
    "val acc %",
    "test acc %",
    "gap (train-test)",
    "best epoch",
    "time s",
    "Δ test vs plain",
    "p",
)
LOSS_COLUMNS = ("variant", "train loss", "val loss", "test loss", "Δ acc gap vs plain", "p")


def accuracy_rows(summaries: Sequence[VariantSummary]) -> list[list[str]]:
    """The accuracy table's cells, one row per variant (columns: ``ACCURACY_COLUMNS``)."""
    return [
        [
            s.variant,
            str(len(s.seeds)),
            s.metrics["train_acc"].format(100),
            s.metrics["val_acc"].format(100),
            s.metrics["test_acc"].format(100),
            s.metrics["gap"].format(100, sign=True),
            s.metrics["best_epoch"].format(),
            s.metrics["seconds"].format(),
            *_comparison_cells(s.variant, s.test_vs_plain),
        ]
        for s in summaries
    ]


def loss_rows(summaries: Sequence[VariantSummary]) -> list[list[str]]:
    """The loss table's cells (columns: ``LOSS_COLUMNS``)."""
    return [
        [
            s.variant,
            s.metrics["train_loss"].format(digits=3),
            s.metrics["val_loss"].format(digits=3),
            s.metrics["test_loss"].format(digits=3),
            *_comparison_cells(s.variant, s.gap_vs_plain),
        ]
        for s in summaries
    ]


def _verdict(comparison: Comparison, higher: str, lower: str) -> str:
    if math.isnan(comparison.p_value):
        return "not testable with fewer than 2 paired seeds"
    if comparison.p_value >= 0.05:
        return "no significant difference at the 5% level"
    return higher if comparison.difference.mean > 0 else lower


def _points(fraction: float) -> str:
    return f"{round(fraction * 100, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def _span(interval: Interval) -> str:
    if math.isnan(interval.half_width):
        return "no interval with one seed"
    return f"95% CI {_points(interval.low)} to {_points(interval.high)}"


def claims(summaries: Sequence[VariantSummary]) -> list[str]:
    """One sentence per variant against plain, each with its interval and p-value."""
    sentences = []
    for s in summaries:
        test, gap = s.test_vs_plain, s.gap_vs_plain
        if test is None or gap is None:
            continue
        sentences.append(
            f"{s.variant} vs plain over {test.difference.n} paired seeds: test accuracy "
            f"{_points(test.difference.mean)} points ({_span(test.difference)}, "
            f"p={format_p(test.p_value)}): "
            f"{_verdict(test, 'significantly higher', 'significantly lower')}; "
            f"train-test gap {_points(gap.difference.mean)} points ({_span(gap.difference)}, "
            f"p={format_p(gap.p_value)}): "
            f"{_verdict(gap, 'significantly more overfitting', 'significantly less overfitting')}."
        )
    return sentences
