import numpy as np
import pytest

from qlorakit.eval.bootstrap import bootstrap_interval, paired_bootstrap
from qlorakit.eval.tasks import mean_metric, ratio_metric


def _synthetic(seed, n=400, true_diff=0.1):
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.2, 0.8, n)  # shared per-item difficulty: pairing removes it
    base = (rng.uniform(size=n) < difficulty).astype(float)
    tuned = (rng.uniform(size=n) < np.clip(difficulty + true_diff, 0, 1)).astype(float)
    return {"acc": base}, {"acc": tuned}


def test_interval_covers_true_difference_in_most_datasets():
    metric = mean_metric("acc")
    covered = 0
    for seed in range(40):
        b, t = _synthetic(seed)
        d = paired_bootstrap(metric.fn, b, t, n_resamples=300, seed=seed)
        assert d.ci_low <= d.delta <= d.ci_high
        covered += d.ci_low <= 0.1 <= d.ci_high
    assert covered >= 34  # nominal 95% of 40 = 38; allow sampling noise


def test_deterministic_with_seed_and_varies_without():
    metric = mean_metric("acc")
    b, t = _synthetic(7)
    d1 = paired_bootstrap(metric.fn, b, t, seed=3)
    d2 = paired_bootstrap(metric.fn, b, t, seed=3)
    d3 = paired_bootstrap(metric.fn, b, t, seed=4)
    assert (d1.ci_low, d1.ci_high) == (d2.ci_low, d2.ci_high)
    assert (d1.ci_low, d1.ci_high) != (d3.ci_low, d3.ci_high)


def test_identical_models_give_zero_interval():
    b, _ = _synthetic(1)
    d = paired_bootstrap(mean_metric("acc").fn, b, b)
    assert d.delta == 0.0 and d.ci_low == 0.0 and d.ci_high == 0.0


def test_ratio_metric_and_mismatched_items():
    cols = {"nll": np.array([2.0, 4.0]), "tokens": np.array([1.0, 3.0])}
    assert ratio_metric("loss", "nll", "tokens").fn(cols) == pytest.approx(1.5)
    value, lo, hi = bootstrap_interval(ratio_metric("loss", "nll", "tokens").fn, cols, n_resamples=50)
    assert lo <= value <= hi
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap(mean_metric("acc").fn, {"acc": np.zeros(3)}, {"acc": np.zeros(4)})
