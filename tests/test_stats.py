"""Bootstrap intervals: coverage of the point, pairing, degenerate samples, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from forgetkit.stats import bootstrap_ci, intervals_overlap, mean_ci, ratio_ci


def test_mean_interval_covers_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    a, b = mean_ci(small), mean_ci(large)
    assert a.value == pytest.approx(small.mean()) and a.low < a.value < a.high
    assert (b.high - b.low) < 0.25 * (a.high - a.low)
    assert b.low < 1.0 < b.high
    assert mean_ci(small, seed=3) == mean_ci(small, seed=3)


def test_paired_ratio_is_tighter_than_the_spread_of_the_items():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0.0, 1.0, 200)  # items differ a lot ...
    twice = 2.0 * base * rng.normal(1.0, 0.01, 200)  # ... but the pair moves together
    ci = ratio_ci(twice, base)
    assert ci.low < 2.0 < ci.high and ci.high - ci.low < 0.02


def test_degenerate_and_bad_samples():
    one = mean_ci([3.0])
    assert one.value == 3.0 and np.isnan(one.low) and np.isnan(one.high)
    flat = mean_ci([2.0, 2.0, 2.0])
    assert (flat.low, flat.high) == (2.0, 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="equal lengths"):
        bootstrap_ci(([1.0, 2.0], [1.0]), lambda a, b, axis: a.mean(axis), paired=True)
    assert intervals_overlap(mean_ci([1.0, 2.0]), mean_ci([1.5, 3.0]))
    assert not intervals_overlap(mean_ci([1.0, 1.1, 0.9]), mean_ci([5.0, 5.1, 4.9]))
