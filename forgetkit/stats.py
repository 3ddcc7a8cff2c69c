"""Intervals of estimates: one percentile bootstrap for every figure forgetkit reports.

Every number forgetkit reports that depends on which probes (or records) were drawn carries a
95% interval from :func:`bootstrap_ci`: a percentile bootstrap (:func:`scipy.stats.bootstrap`)
over the items, seeded, so the same inputs give the same interval. Two quantities measured on
the same items (two fine-tunes on one probe set) are compared with a *paired* bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = ["Interval", "bootstrap_ci", "intervals_overlap", "mean_ci", "ratio_ci"]

N_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate and its interval.

    Attributes:
        value: the estimate on all items.
        low, high: the interval (NaN with fewer than two items).
        confidence: its level.
        n: items it rests on.
    """

    value: float
    low: float
    high: float
    confidence: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def bootstrap_ci(samples: Sequence[Sequence[float]] | Sequence[np.ndarray],
                 statistic: Callable[..., np.ndarray], *, paired: bool = False,
                 confidence: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = 0
                 ) -> Interval:
    """Percentile bootstrap interval of ``statistic(*samples)``.

    Args:
        samples: one or more 1-D samples (paired samples have equal lengths, item by item).
        statistic: vectorized, ``statistic(*resampled, axis=-1)``.
        paired: resample the items of every sample together (same indices).
        confidence: level of the interval.
        n_resamples: bootstrap resamples.
        seed: of the resampling.

    Returns:
        The :class:`Interval`; its bounds are NaN when a sample has fewer than two items or
        every resample gives the same value.

    Raises:
        ValueError: an empty sample, unequal lengths when paired, or confidence outside (0, 1).
    """
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("bootstrap_ci: every sample must be a non-empty 1-D sequence")
    if paired and len({a.size for a in arrays}) > 1:
        raise ValueError(f"bootstrap_ci: paired samples need equal lengths, got "
                         f"{[a.size for a in arrays]}")
    value = float(statistic(*arrays, axis=-1))
    n = min(a.size for a in arrays)
    if n < 2:
        return Interval(value, float("nan"), float("nan"), confidence, n)
    if all(np.all(a == a[0]) for a in arrays):
        return Interval(value, value, value, confidence, n)
    result = stats.bootstrap(arrays, statistic, n_resamples=n_resamples, paired=paired,
                             vectorized=True, confidence_level=confidence, method="percentile",
                             rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(value, float(low), float(high), confidence, n)


def mean_ci(values: Sequence[float] | np.ndarray, **kwargs) -> Interval:
    """Mean of ``values`` with its bootstrap interval (keywords as :func:`bootstrap_ci`)."""
    return bootstrap_ci((values,), lambda x, axis: np.mean(x, axis=axis), **kwargs)


def ratio_ci(numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray,
             **kwargs) -> Interval:
    """``mean(numerator) / mean(denominator)`` over the same items, paired bootstrap."""
    return bootstrap_ci((numerator, denominator),
                        lambda a, b, axis: np.mean(a, axis=axis) / np.mean(b, axis=axis),
                        paired=True, **kwargs)


def intervals_overlap(a: Interval, b: Interval) -> bool:
    """Whether two intervals share a point (True when either bound is unknown)."""
    if any(np.isnan(x) for x in (a.low, a.high, b.low, b.high)):
        return True
    return a.low <= b.high and b.low <= a.high
