"""Paired bootstrap confidence intervals for the difference of a metric between two models.

Both models were scored on the same items, so each resample draws item indices once and
evaluates the metric on the base and the tuned columns at those indices (a paired bootstrap:
the item-to-item variation that both models share cancels). The interval is the percentile
interval of the resampled differences; a fixed seed makes it reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

__all__ = ["Columns", "PairedDiff", "paired_bootstrap", "bootstrap_interval", "take"]

Columns = Mapping[str, np.ndarray]
MetricFn = Callable[[Columns], float]


@dataclass(frozen=True)
class PairedDiff:
    """``tuned - base`` with a percentile bootstrap interval at ``confidence``."""

    base: float
    tuned: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    n_items: int
    n_resamples: int


def take(columns: Columns, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``idx`` of every column."""
    return {k: np.asarray(v)[idx] for k, v in columns.items()}


def _check(columns: Columns, name: str) -> int:
    lengths = {k: len(v) for k, v in columns.items()}
    if not lengths:
        raise ValueError(f"{name} columns are empty")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{name} columns have different lengths: {lengths}")
    return next(iter(lengths.values()))


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def paired_bootstrap(
    metric: MetricFn,
    base: Columns,
    tuned: Columns,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> PairedDiff:
    """Paired bootstrap of ``metric(tuned) - metric(base)`` over items.

    ``base`` and ``tuned`` hold per-item columns in the same item order. Resamples where the
    metric is undefined (NaN, e.g. a bias score with no item of one kind drawn) are left out of
    the percentiles.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = _check(base, "base")
    if _check(tuned, "tuned") != n:
        raise ValueError(f"base has {n} items but tuned has {_check(tuned, 'tuned')}; a paired comparison needs the same items")
    b_full = float(metric(base))
    t_full = float(metric(tuned))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    diffs = np.empty(n_resamples, dtype=np.float64)
    for r in range(n_resamples):
        diffs[r] = float(metric(take(tuned, idx[r]))) - float(metric(take(base, idx[r])))
    lo, hi = _percentiles(diffs, confidence)
    return PairedDiff(b_full, t_full, t_full - b_full, lo, hi, confidence, n, n_resamples)


def bootstrap_interval(
    metric: MetricFn, columns: Columns, *, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(value, ci_low, ci_high)`` of one model's metric by the percentile bootstrap."""
    n = _check(columns, "model")
    value = float(metric(columns))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    samples = np.array([float(metric(take(columns, idx[r]))) for r in range(n_resamples)])
    lo, hi = _percentiles(samples, confidence)
    return value, lo, hi
