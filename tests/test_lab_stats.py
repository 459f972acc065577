"""Confidence intervals and paired tests against scipy's, and the coverage they promise."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from normdrop.lab.stats import Interval, mean_interval, paired_comparison

samples = st.lists(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False), min_size=2, max_size=30
)


@given(samples, st.sampled_from([0.9, 0.95, 0.99]))
@settings(max_examples=60, deadline=None)
def test_interval_matches_scipy_t_interval(values, confidence):
    interval = mean_interval(values, confidence)
    x = np.asarray(values)
    assert interval.n == len(values)
    assert interval.mean == pytest.approx(x.mean(), abs=1e-9)
    if x.std(ddof=1) == 0:
        assert interval.half_width == 0
        return
    low, high = stats.t.interval(confidence, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert interval.low == pytest.approx(low, rel=1e-9, abs=1e-9)
    assert interval.high == pytest.approx(high, rel=1e-9, abs=1e-9)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, n, true_mean = 4000, 5, 3.0
    covered = sum(
        interval.low <= true_mean <= interval.high
        for interval in (mean_interval(rng.normal(true_mean, 2.0, n)) for _ in range(trials))
    )
    # 99.9% binomial interval around the promised 95% coverage.
    low, high = stats.binom.interval(0.999, trials, 0.95)
    assert low <= covered <= high


def test_interval_of_one_or_no_value_has_no_width():
    one = mean_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width) and one.n == 1
    assert one.format(100) == "70.0 (n=1)"
    none = mean_interval([])
    assert none.n == 0 and math.isnan(none.mean)


def test_format_scales_and_signs():
    interval = Interval(0.9723, 0.0041, 5)
    assert interval.format(100) == "97.2 ± 0.4"
    assert Interval(0.012, 0.003, 5).format(100, sign=True) == "+1.2 ± 0.3"
    assert Interval(12.0, 0.5, 3).format(digits=2) == "12.00 ± 0.50"
    assert Interval(-1e-17, 0.01, 5).format(100, sign=True) == "+0.0 ± 1.0"


@given(samples, st.integers(0, 2**32 - 1))
@settings(max_examples=50, deadline=None)
def test_paired_comparison_matches_scipy_ttest_rel(values, seed):
    a = np.asarray(values)
    b = a + np.random.default_rng(seed).normal(0.5, 1.0, len(a))
    comparison = paired_comparison(a, b)
    assert comparison.difference.mean == pytest.approx((a - b).mean(), abs=1e-9)
    assert comparison.p_value == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9, abs=1e-12)
    assert comparison.difference.n == len(a)


def test_paired_comparison_degenerate_cases():
    assert paired_comparison([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]).p_value == 1.0
    # A constant shift (up to rounding) is decided by the sign test: 3 seeds, p = 2 / 2**3.
    assert paired_comparison([0.6, 0.7, 0.8], [0.5, 0.6, 0.7]).p_value == 0.25
    assert math.isnan(paired_comparison([0.6], [0.5]).p_value)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1.0, 2.0], [1.0])


def test_constant_difference_over_two_seeds_is_not_significant():
    # Each seed better by exactly one of 60 test samples: the review's example, once read as p=0.
    comparison = paired_comparison([0.60, 0.70], [0.5833333, 0.6833333])
    assert comparison.difference.format(100, sign=True) == "+1.7 ± 0.0"
    assert comparison.p_value == 0.5
    assert not comparison.p_value < 0.05
    # Negative shifts are symmetric (two-sided), exact or with rounding noise.
    assert paired_comparison([0.5, 0.6], [0.6, 0.7]).p_value == 0.5
    assert paired_comparison([1 / 60, 2 / 60], [2 / 60, 3 / 60]).p_value == 0.5


@pytest.mark.parametrize("n", [2, 3, 5, 6, 11, 20])
def test_constant_difference_p_value_is_the_exact_sign_test(n):
    rng = np.random.default_rng(n)
    b = rng.integers(0, 90, n) / 100  # accuracies k / 100
    a = b + 1 / 100  # every seed better by exactly one test sample
    p_value = paired_comparison(a, b).p_value
    assert p_value == pytest.approx(2 * 0.5**n, rel=1e-12)
    assert p_value == pytest.approx(stats.binomtest(n, n, 0.5).pvalue, rel=1e-12)
    assert paired_comparison(b, a).p_value == p_value


def test_all_zero_differences_give_p_one():
    for n in (2, 5, 11):
        values = list(np.linspace(0.3, 0.9, n))
        assert paired_comparison(values, values).p_value == 1.0
    assert paired_comparison([0.7, 0.7], [0.7, 0.7]).p_value == 1.0


def test_report_does_not_call_a_two_seed_constant_shift_significant():
    from normdrop.lab.summary import ACCURACY_COLUMNS, accuracy_rows, claims, summarize

    def run(variant, seed, test_acc):
        return {
            "variant": variant,
            "seed": seed,
            "status": "complete",
            "train_acc": 0.9,
            "val_acc": 0.8,
            "test_acc": test_acc,
            "train_loss": 0.1,
            "val_loss": 0.2,
            "test_loss": 0.3,
            "best_epoch": 3,
            "seconds": 1.0,
        }

    runs = [run("plain", 0, 35 / 60), run("plain", 1, 41 / 60)]
    runs += [run("bn", 0, 36 / 60), run("bn", 1, 42 / 60)]  # one more test sample right per seed
    summaries = summarize(runs)
    row = accuracy_rows(summaries)[1]
    assert row[ACCURACY_COLUMNS.index("p")] == "0.500"
    (sentence,) = claims(summaries)
    assert "p=0.500): no significant difference at the 5% level" in sentence
    assert "significantly higher" not in sentence


def test_non_degenerate_differences_still_use_the_t_test():
    a = [0.61, 0.72, 0.65, 0.70, 0.68]
    b = [0.60, 0.69, 0.66, 0.67, 0.65]
    expected = stats.ttest_rel(a, b).pvalue
    assert paired_comparison(a, b).p_value == pytest.approx(expected, rel=1e-12)
    # Two seeds, unequal differences of one sign: still the t-test, not the sign test.
    a2, b2 = [0.60, 0.70], [0.58, 0.69]
    expected2 = stats.ttest_rel(a2, b2).pvalue
    assert paired_comparison(a2, b2).p_value == pytest.approx(expected2, rel=1e-12)
    assert expected2 != pytest.approx(0.5)


def test_paired_test_rejects_a_real_shift_and_keeps_the_null_at_its_level():
    rng = np.random.default_rng(1)
    trials, n = 2000, 8
    rejections = 0
    for _ in range(trials):
        base = rng.normal(0, 1, n)  # the seed effect both variants share
        a, b = base + rng.normal(0, 0.1, n), base + rng.normal(0, 0.1, n)
        rejections += paired_comparison(a, b).p_value < 0.05
    low, high = stats.binom.interval(0.999, trials, 0.05)
    assert low <= rejections <= high
    base = rng.normal(0, 1, n)
    shifted = paired_comparison(base + 0.5 + rng.normal(0, 0.1, n), base)
    assert shifted.p_value < 1e-4 and shifted.difference.low > 0
