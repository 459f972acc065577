"""Criteria: measured <op> threshold, NaN never passes; results.json stays standard JSON."""

from __future__ import annotations

import json
import math
import operator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from normdrop.repro.outcome import Criterion, Outcome, mean
from normdrop.repro.output import jsonable, results_json

finite = st.floats(-1e6, 1e6, allow_nan=False)
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@given(finite, finite, st.sampled_from(sorted(OPS)))
def test_comparisons_match_python(measured, threshold, op):
    assert Criterion("k", "c", measured, op, threshold).passed is OPS[op](measured, threshold)


@given(finite, finite, finite)
def test_interval_is_closed(measured, a, b):
    low, high = min(a, b), max(a, b)
    assert Criterion("k", "c", measured, "in", (low, high)).passed is (low <= measured <= high)
    assert Criterion("k", "c", low, "in", (low, high)).passed


@pytest.mark.parametrize("op", ["<", "<=", ">", ">="])
def test_nan_never_passes(op):
    assert not Criterion("k", "c", math.nan, op, 0.0).passed
    assert not Criterion("k", "c", math.nan, "in", (-math.inf, math.inf)).passed


def test_infinity_compares_as_a_number():
    assert Criterion("k", "c", math.inf, ">", 1.0).passed
    assert not Criterion("k", "c", math.inf, "<=", 2000.0).passed


def test_bad_operator_or_interval_is_refused():
    with pytest.raises(ValueError, match="op"):
        Criterion("k", "c", 1.0, "==", 1.0)
    with pytest.raises(ValueError, match="low, high"):
        Criterion("k", "c", 1.0, "in", 1.0)


def test_outcome_passes_only_with_criteria_all_passing():
    outcome = Outcome("n", "t", "p", "s", [], [0], {})
    assert not outcome.passed  # nothing checked is not a pass
    outcome.check("a", "a", 1.0, "<", 2.0)
    assert outcome.passed
    outcome.check("b", "b", 3.0, "<", 2.0)
    assert not outcome.passed


def test_mean_keeps_nan():
    assert math.isnan(mean([1.0, math.nan]))
    assert mean([1.0, 2.0, 6.0]) == 3.0


def test_results_json_is_standard_json_with_verdicts():
    outcome = Outcome("n", "t", "p", "s", ["c"], [1, 2], {"steps": 10})
    outcome.check("a", "claim", math.nan, "<", 1.0)
    outcome.check("b", "claim", math.inf, ">", 1.0)
    outcome.measurements = {"x": [math.nan, (1.0, -math.inf)], 3: {0.1: 2}}
    text = json.dumps(results_json(outcome, {"wall_seconds": 1.0}), allow_nan=False)
    document = json.loads(text)
    assert [c["passed"] for c in document["criteria"]] == [False, True]
    assert document["criteria"][0]["measured"] == "nan"
    assert document["measurements"] == {"x": ["nan", [1.0, "-inf"]], "3": {"0.1": 2}}
    assert jsonable((1, {2: math.inf})) == [1, {"2": "inf"}]


def test_a_sign_on_a_mean_passes_only_when_every_seed_agrees(capsys):
    """ioffe2017's BN - BRN at batch 4 passed at +0.87 points with one seed at -4.6: with the
    per-seed values the criterion fails, says so, and keeps them in results.json."""
    from normdrop.repro.output import print_outcome

    outcome = Outcome("ioffe2017", "t", "p", "s", [], [0, 1, 2], {})
    leaning = outcome.check("k", "BN - BRN", 0.87, ">", 0.0, seeds=[6.6, -4.6, 0.6])
    agreeing = outcome.check("j", "BN - BRN", 2.0, ">", 0.0, seeds=[1.0, 3.0, 2.0])
    plain = outcome.check("i", "no seeds given", 0.87, ">", 0.0)
    assert not leaning.passed and not leaning.seeds_agree
    assert agreeing.passed and plain.passed
    assert not Criterion("n", "nan seed", 1.0, ">", 0.0, "", (1.0, math.nan)).passed
    print_outcome(outcome)
    out = capsys.readouterr().out
    assert (
        "[FAIL] BN - BRN: measured 0.87, needs > 0 (every seed too: 6.6, -4.6, 0.6, not every"
        in out
    )
    from normdrop.repro.report import section_html

    assert "6.6, -4.6, 0.6, not every seed does" in section_html(outcome, {})
    document = results_json(outcome, {})
    assert document["criteria"][0]["seeds"] == [6.6, -4.6, 0.6]
    assert document["criteria"][0]["passed"] is False
