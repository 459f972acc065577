"""What a reproduction returns: its criteria with PASS/FAIL, its figures and its measurements.

A criterion is one number compared with one threshold: ``measured <op> threshold``, with
``op`` one of ``<``, ``<=``, ``>``, ``>=`` or ``in`` (a closed interval ``(low, high)``). A NaN
measurement never passes. A criterion on a mean over seeds may also carry the per-seed values
(``seeds``): it then passes only if every seed passes too, so that a sign ("BN - BRN > 0") is
not called reproduced when the mean of three seeds leans one way and a seed the other.
Composite claims ("BN is ahead at every checkpoint") are reduced to
one number first ("the smallest BN-minus-plain difference over the checkpoints >= 0"), so
every verdict can be read off ``results.json``.
"""

from __future__ import annotations

import math
import operator
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

_OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Criterion:
    """One pass criterion: ``measured <op> threshold``.

    ``key`` is a short identifier, ``claim`` says in words what is checked, ``detail`` carries
    the numbers behind ``measured`` (per seed, per setting).
    """

    key: str
    claim: str
    measured: float
    op: str
    threshold: float | tuple[float, float]
    detail: str = ""
    seeds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.op == "in":
            if not (isinstance(self.threshold, tuple) and len(self.threshold) == 2):
                raise ValueError(f"criterion {self.key}: 'in' needs a (low, high) threshold")
        elif self.op not in _OPERATORS:
            raise ValueError(f"criterion {self.key}: op must be <, <=, >, >= or in, not {self.op}")

    @property
    def passed(self) -> bool:
        return self._holds(self.measured) and self.seeds_agree

    @property
    def seeds_agree(self) -> bool:
        return all(self._holds(value) for value in self.seeds)

    def seeds_text(self) -> str:
        """What the per-seed values add to the threshold: ``" (every seed too: a, b, c)"``."""
        if not self.seeds:
            return ""
        values = ", ".join(f"{value:.4g}" for value in self.seeds)
        agree = "" if self.seeds_agree else ", not every seed does"
        return f" (every seed too: {values}{agree})"

    def _holds(self, value: float) -> bool:
        value = float(value)
        if math.isnan(value):
            return False
        if self.op == "in":
            low, high = self.threshold  # type: ignore[misc]
            return low <= value <= high
        return bool(_OPERATORS[self.op](value, self.threshold))

    def threshold_text(self) -> str:
        if self.op == "in":
            low, high = self.threshold  # type: ignore[misc]
            return f"in [{_fmt(low)}, {_fmt(high)}]"
        return f"{self.op} {_fmt(self.threshold)}"  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        threshold = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        return {
            "key": self.key,
            "claim": self.claim,
            "measured": _json_number(self.measured),
            "op": self.op,
            "threshold": threshold,
            "passed": self.passed,
            "detail": self.detail,
            "seeds": [_json_number(value) for value in self.seeds],
        }


@dataclass
class Outcome:
    """Everything one reproduction run produced.

    ``paper``: the paper's setup and number; ``setup``: ours, scaled down; ``choices``: every
    setting the paper or the issue leaves unstated, as we chose it; ``measurements``: JSON-able
    numbers behind the criteria and plots; ``figures``: name -> matplotlib Figure (saved as
    ``name.png``).
    """

    name: str
    title: str
    paper: str
    setup: str
    choices: list[str]
    seeds: list[int]
    config: dict[str, Any]
    criteria: list[Criterion] = field(default_factory=list)
    measurements: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Why the criteria's thresholds do not apply to this run as calibrated (a --scale other
    # than 1, fewer seeds than they were calibrated with); empty when they do.
    uncalibrated: str = ""

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def qualifier(self) -> str:
        """What follows the verdict of a run off the calibration: ``" (uncalibrated: ...)"``."""
        return f" (uncalibrated: {self.uncalibrated})" if self.uncalibrated else ""

    @property
    def passed(self) -> bool:
        return bool(self.criteria) and all(c.passed for c in self.criteria)

    def check(
        self,
        key: str,
        claim: str,
        measured: float,
        op: str,
        threshold: float | tuple[float, float],
        detail: str = "",
        seeds: Sequence[float] = (),
    ) -> Criterion:
        """Add a criterion and return it; ``seeds``: the per-seed values of ``measured``, each
        of which must pass too."""
        seeds = tuple(float(value) for value in seeds)
        criterion = Criterion(key, claim, float(measured), op, threshold, detail, seeds)
        self.criteria.append(criterion)
        return criterion


def mean(values: Sequence[float]) -> float:
    """The mean, NaN when any value is NaN (a diverged seed must not vanish from the mean)."""
    return statistics.fmean(values) if values else math.nan


def per_seed(values: Sequence[float], digits: int = 2) -> str:
    """``"a, b, c"``: the per-seed values behind a mean, for a criterion's detail."""
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_number(value: float) -> float | str:
    """JSON has no NaN or infinity: write them as strings so the file stays standard JSON."""
    return value if math.isfinite(value) else str(value)
