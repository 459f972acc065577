"""Every reproduction end to end at a tiny scale: criteria, figures and JSON are produced, and
the numbers depend on the seeds only (not on repetition or on the number of processes).

Full-scale runs are not tests (minutes each); docs/REPRODUCTIONS.md records them.
"""

from __future__ import annotations

import json
import math

import pytest

from normdrop import use_backend
from normdrop.repro import REPRODUCTIONS, module
from normdrop.repro.output import jsonable, results_json


@pytest.fixture(autouse=True)
def _reference_backend():
    """``normdrop repro`` runs on the reference math by default (see run_one); so do these."""
    with use_backend("reference"):
        yield


# Scales that make each run take seconds: a few steps or one epoch of everything.
TINY = {
    "ioffe2015": 0.01,
    "srivastava2014": 0.01,
    "li2019": 0.05,
    "zhang2017": 0.01,
    "ioffe2017": 0.001,
    "hoffer2017": 0.001,
    "gal2016": 0.02,
    "santurkar2018": 0.02,
}


def _measured(outcome) -> list[tuple[str, float]]:
    return [(c.key, c.measured) for c in outcome.criteria]


def test_every_reproduction_has_a_tiny_scale():
    assert set(TINY) == set(REPRODUCTIONS)


@pytest.mark.parametrize("name", list(REPRODUCTIONS))
def test_tiny_run_produces_criteria_figures_and_json(name):
    outcome = module(name).run([3], scale=TINY[name])
    assert outcome.name == name and outcome.seeds == [3]
    assert outcome.criteria and outcome.figures and outcome.choices
    for criterion in outcome.criteria:
        assert criterion.passed in (True, False)
        low_high = criterion.threshold if criterion.op == "in" else (criterion.threshold,)
        assert all(math.isfinite(t) for t in low_high)
    assert len({c.key for c in outcome.criteria}) == len(outcome.criteria)
    document = json.loads(json.dumps(results_json(outcome, {}), allow_nan=False))
    assert document["passed"] == all(c["passed"] for c in document["criteria"])


def test_same_seeds_same_numbers():
    first = module("li2019").run([5], scale=TINY["li2019"])
    second = module("li2019").run([5], scale=TINY["li2019"])
    assert json.dumps(jsonable(_measured(first))) == json.dumps(jsonable(_measured(second)))
    assert json.dumps(jsonable(first.measurements)) == json.dumps(jsonable(second.measurements))
    other = module("li2019").run([6], scale=TINY["li2019"])
    assert _measured(other) != _measured(first)


def test_worker_processes_give_the_same_numbers():
    alone = module("santurkar2018").run([1, 2], scale=0.015, jobs=1)
    spread = module("santurkar2018").run([1, 2], scale=0.015, jobs=2)
    # JSON text: NaN (a diverged probe) compares equal to itself there
    assert json.dumps(jsonable(_measured(alone))) == json.dumps(jsonable(_measured(spread)))
    assert json.dumps(jsonable(alone.measurements)) == json.dumps(jsonable(spread.measurements))
