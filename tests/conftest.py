"""Shared test configuration: hypothesis profiles and small helpers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# CI runs on 2 cores; a few dozen generated cases per property keep the suite within budget while
# still covering shapes and settings. NORMDROP_HYPOTHESIS=thorough for a deeper local run.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,  # CI must not flake: the same cases on every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("NORMDROP_HYPOTHESIS", "ci"))

# pytest -n auto already runs one worker per core; more threads per worker only oversubscribe.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_generators():
    """Every test starts from the same global RNG state, whatever ran before it on its worker:
    statistical assertions (99.9% intervals) then pass or fail deterministically."""
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 -- code under test may use numpy's global generator
    torch.manual_seed(0)


@pytest.fixture
def one_numba_thread():
    """The kernels on one numba thread (as torch above), restored afterwards. The kernel tests
    use it for the whole module: ``pytestmark = pytest.mark.usefixtures("one_numba_thread")``."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)
