"""LengthPrediction: quantiles, interpolation, expected value and conditioning."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from orchestrator.predictor.distribution import (
    GRID_LEVELS,
    REPORTED_LEVELS,
    distribution_from_grid,
)


def lognormalish(median: float = 100.0, spread: float = 0.8) -> np.ndarray:
    z = np.asarray([np.sqrt(2) * _erfinv(2 * q - 1) for q in GRID_LEVELS])
    return np.log1p(median * np.exp(spread * z))


def _erfinv(y: float) -> float:
    from math import erf

    lo, hi = -6.0, 6.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if erf(mid) < y:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def test_reported_levels_and_order() -> None:
    pred = distribution_from_grid(lognormalish())
    assert set(REPORTED_LEVELS) <= set(pred.quantiles)
    values = [pred.quantiles[q] for q in REPORTED_LEVELS]
    assert values == sorted(values)
    assert pred.quantiles[0.5] == pytest.approx(100.0, rel=0.02)
    assert pred.expected_tokens > pred.quantiles[0.5], "right-skewed: mean above median"


def test_quantile_interpolates_and_validates() -> None:
    pred = distribution_from_grid(lognormalish())
    assert pred.quantile(0.5) == pytest.approx(pred.quantiles[0.5], rel=1e-6)
    assert pred.quantiles[0.5] < pred.quantile(0.6) < pred.quantiles[0.75]
    with pytest.raises(ValueError):
        pred.quantile(1.0)


def test_remaining_conditions_on_generated() -> None:
    pred = distribution_from_grid(lognormalish())
    assert pred.remaining(0) is pred
    later = pred.remaining(150)
    # Having survived 150 tokens, the total is above 150: remaining = total - 150 > 0.
    assert later.quantiles[0.5] > 0
    assert later.quantiles[0.5] + 150 > pred.quantiles[0.5]
    assert later.quantiles[0.9] >= later.quantiles[0.5]
    far = pred.remaining(100_000)
    assert far.quantiles[0.5] > 0 and np.isfinite(far.expected_tokens)
    with pytest.raises(ValueError):
        pred.remaining(-1)


def test_unsorted_grid_is_made_monotone() -> None:
    grid = lognormalish()[::-1]
    pred = distribution_from_grid(grid)
    assert pred.quantiles[0.1] <= pred.quantiles[0.9]


def test_a_prediction_pickles_whole_and_reads_its_reported_levels_as_the_grid_gives_them() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        prediction = distribution_from_grid(np.sort(rng.normal(5.0, 1.5, len(GRID_LEVELS))))
        back = pickle.loads(pickle.dumps(prediction))
        assert back == prediction and back._grid == prediction._grid
        levels, log_values = prediction._log_grid()
        for q in REPORTED_LEVELS:
            interpolated = float(np.expm1(np.interp(q, levels, log_values)))
            assert prediction.quantile(q) == back.quantile(q) == interpolated
