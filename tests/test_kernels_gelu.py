"""The kernels' float32 erf and exp (vectorizable formulas behind the fused GELU) against
libm in float64; float64 inputs keep libm's erf itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numba import njit

from normdrop.kernels import cpu


@njit(cache=False)
def _erf_of(values, out):
    for i in range(values.size):
        out[i] = cpu._erf(values[i])


@njit(cache=False)
def _exp32_of(values, out):
    for i in range(values.size):
        out[i] = cpu._exp32(values[i])


@njit(cache=False)
def _apply_pair(values, erf_out, gauss_out):
    for i in range(values.size):
        x = values[i]
        erf_out[i], gauss_out[i] = cpu._erf_gauss(x, -(x * x))


def _evaluate(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(cpu._erf(values), cpu._exp32(values))``, the second for float32 only."""
    erf_out = np.empty_like(values)
    _erf_of(values, erf_out)
    if values.dtype != np.float32:
        return erf_out, None
    exp_out = np.empty_like(values)
    _exp32_of(values, exp_out)
    return erf_out, exp_out


def test_float32_erf_is_within_2e7_of_libm():
    # dense where GELU lives, across the series/A&S switch at 1, and out to where erf is +-1
    x = np.concatenate([np.linspace(-6, 6, 240_001), np.linspace(0.99, 1.01, 2001)])
    x = x.astype(np.float32)
    got, _ = _evaluate(x)
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    error = np.abs(got.astype(np.float64) - want)
    assert error.max() <= 2e-7, (error.max(), x[error.argmax()])
    # small values keep their relative accuracy (no 1 - (1 - erf) cancellation)
    small = np.float32([1e-30, 1e-8, -3e-4, 0.02, -0.4])
    got_small, _ = _evaluate(small)
    want_small = np.array([math.erf(v) for v in small.astype(np.float64)])
    np.testing.assert_allclose(got_small, want_small, rtol=3e-7)


def test_float32_exp_is_within_one_ulp_of_libm_over_its_range():
    x = np.linspace(-87, 88, 400_001).astype(np.float32)
    _, got = _evaluate(x)
    want = np.exp(x.astype(np.float64))
    relative = np.abs(got.astype(np.float64) - want) / want
    assert relative.max() <= 2.0**-23, relative.max()


def test_float32_special_values():
    x = np.float32([np.nan, np.inf, -np.inf, -200.0, 0.0])
    erf, exp = _evaluate(x)
    assert np.isnan(erf[0]) and np.isnan(exp[0])
    assert erf[1] == 1 and erf[2] == -1 and erf[3] == -1 and erf[4] == 0
    # exp clamps its argument to [-87, 88]: tiny but normal below, large but finite above
    assert 0 < exp[2] < 2e-38 and 0 < exp[3] < 2e-38 and exp[1] > 1e38 and exp[4] == 1


@pytest.mark.parametrize("value", [-3.7, -0.25, 1e-9, 0.5, 2.0, 5.5])
def test_float64_uses_libm_exactly(value):
    erf, _ = _evaluate(np.array([value]))
    assert erf[0] == math.erf(value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_with_its_gaussian_matches_the_separate_functions(dtype):
    """GELU's backward takes erf(x) and e^(-x^2) together (float32 shares the exponential)."""
    x = np.linspace(-6, 6, 20_001).astype(dtype)
    erf, gauss = np.empty_like(x), np.empty_like(x)
    _apply_pair(x, erf, gauss)
    alone, _ = _evaluate(x)
    np.testing.assert_array_equal(erf, alone)
    want = np.exp(-np.square(x.astype(np.float64)))
    if dtype == np.float64:
        np.testing.assert_array_equal(gauss, [math.exp(-(v * v)) for v in x])
    else:  # the square rounded to float32 first (relative error of e^y: |y| * 2^-24 more)
        np.testing.assert_allclose(gauss, want, rtol=2.0**-23 * (1 + 36), atol=0)
        # below float32's normal range the Gaussian is 0, not exp's clamped ~1.7e-38 (GELU's
        # gradient multiplies it by z, which can be huge)
        far = np.float32([9.5, -20.0, 1e20, -3e38])
        erf_far, gauss_far = np.empty_like(far), np.empty_like(far)
        _apply_pair(far, erf_far, gauss_far)
        assert (gauss_far == 0).all() and (np.abs(erf_far) == 1).all()
