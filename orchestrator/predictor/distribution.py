"""Length distributions held as a grid of quantiles in log-token space."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

#: Quantile levels every prediction exposes in `LengthPrediction.quantiles`.
REPORTED_LEVELS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
#: Dense grid the model outputs; the expected value and conditioning integrate over it.
GRID_LEVELS: tuple[float, ...] = tuple(round(0.005 + 0.01 * i, 3) for i in range(100))


def _interp_level(levels: np.ndarray, values: np.ndarray, q: float) -> float:
    """Quantile at level q from a sorted grid, flat beyond the grid's ends."""
    return float(np.interp(q, levels, values))


@dataclass(frozen=True)
class LengthPrediction:
    """A predicted output length distribution, in the served model's tokens.

    `quantiles` maps levels (at least 0.5 and 0.9) to token counts; `quantile(q)` interpolates
    any level between 0.005 and 0.995. `remaining(generated)` conditions on tokens already
    produced, so a scheduler can re-predict the remaining length while decoding.
    """

    expected_tokens: float
    quantiles: Mapping[float, float]
    _grid: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __reduce__(self) -> tuple[object, ...]:
        """Pickled with its quantiles as a plain dict (a read-only view does not pickle): the
        coordinator receives predictions from its predictor process."""
        return (_rebuild, (self.expected_tokens, dict(self.quantiles), self._grid))

    def quantile(self, q: float) -> float:
        """Token count at level q (0 < q < 1), interpolated in log space."""
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile level must lie in (0, 1), got {q}")
        if self._grid and q in self.quantiles:
            return self.quantiles[q]  # computed from the grid as below, once
        levels, log_values = self._log_grid()
        return float(np.expm1(_interp_level(levels, log_values, q)))

    def _log_grid(self) -> tuple[np.ndarray, np.ndarray]:
        if self._grid:
            return np.asarray(GRID_LEVELS), np.log1p(np.asarray(self._grid))
        levels = np.asarray(sorted(self.quantiles))
        return levels, np.log1p(np.asarray([self.quantiles[q] for q in levels]))

    def remaining(self, generated: int) -> LengthPrediction:
        """Distribution of the tokens still to come, given `generated` already produced.

        Conditions the grid on length > generated: P(L <= x | L > g) = (F(x) - F(g)) / (1 - F(g)).
        When generation already passed the grid's top (p99.5), the remainder keeps the
        grid's shape scaled so that its top is TAIL_GROWTH_FRACTION of what was generated
        (the tail is unknown there; long outputs tend to go on).
        """
        if generated < 0:
            raise ValueError(f"generated tokens must be >= 0, got {generated}")
        if generated == 0:
            return self
        levels, log_values = self._log_grid()
        values = np.expm1(log_values)
        f_g = float(np.interp(generated, values, levels, left=0.0, right=1.0))
        if f_g >= levels[-1]:
            tail = np.maximum(values / values[-1], 1e-3) * generated * TAIL_GROWTH_FRACTION
            return distribution_from_grid(np.log1p(tail))
        new_levels = f_g + np.asarray(GRID_LEVELS) * (1.0 - f_g)
        conditioned = np.expm1(np.interp(new_levels, levels, log_values))
        remaining = np.maximum(conditioned - generated, 1.0)
        return distribution_from_grid(np.log1p(remaining))


#: Past the predicted p99.5, the remaining length's largest quantile is this share of the
#: tokens generated so far.
TAIL_GROWTH_FRACTION = 0.25


def _rebuild(
    expected_tokens: float, quantiles: dict[float, float], grid: tuple[float, ...]
) -> LengthPrediction:
    return LengthPrediction(expected_tokens, MappingProxyType(quantiles), grid)


def distribution_from_grid(log_grid: np.ndarray) -> LengthPrediction:
    """Build a prediction from log1p(tokens) at GRID_LEVELS (sorted to stay monotone)."""
    log_grid = np.sort(np.asarray(log_grid, dtype=np.float64))
    tokens = np.expm1(np.maximum(log_grid, 0.0))
    levels = np.asarray(GRID_LEVELS)
    reported = {q: float(np.expm1(np.interp(q, levels, np.log1p(tokens)))) for q in REPORTED_LEVELS}
    expected = float(tokens.mean())
    if not math.isfinite(expected):
        raise ValueError("non-finite prediction")
    return LengthPrediction(
        expected_tokens=expected,
        quantiles=MappingProxyType(reported),
        _grid=tuple(float(t) for t in tokens),
    )
