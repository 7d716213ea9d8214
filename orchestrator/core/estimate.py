"""A request's predicted output length as the core sees it: an expectation and a few quantiles.

The predictor (or, in the simulator, a fake one or the truth) produces it once per request; the
core derives from it the remaining length once some tokens are generated (ELIS-style
re-prediction): the distribution of ``L - g`` given ``L > g``, read off the same quantiles.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

TAIL_MEAN_FACTOR: Final = 1.5
"""Mean of the mass above the top predicted quantile, as a multiple of that quantile: output
lengths are heavy-tailed, so whatever outlives the prediction is expected to run on a while."""
BEYOND_PREDICTION_FRACTION: Final = 0.5
"""Remaining tokens expected of a request that has outlived its top quantile, as a fraction of
what it has generated (a Pareto-like mean residual life that grows with age)."""
MIN_REMAINING_TOKENS: Final = 1.0


@dataclass(frozen=True, slots=True)
class LengthEstimate:
    """Predicted output tokens: ``expected`` and ``quantiles`` as sorted ``(q, tokens)``."""

    expected: float
    quantiles: tuple[tuple[float, float], ...]
    _qs: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)
    _ts: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)
    _suffix: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)
    certain: bool = field(default=False, init=False, repr=False, compare=False)
    """One length, not a spread (its quantiles all equal)."""

    def __post_init__(self) -> None:
        """Tabulate the CDF's knots and the suffix sums of E[L; segment] so that the hot
        paths (cdf, quantile, expected remaining) cost a bisection, not a scan."""
        if not self.quantiles:
            raise ValueError("a LengthEstimate needs at least one quantile")
        qs = tuple(q for q, _ in self.quantiles)
        ts = tuple(t for _, t in self.quantiles)
        suffix = [0.0] * len(qs)
        for i in range(len(qs) - 2, -1, -1):
            suffix[i] = suffix[i + 1] + (qs[i + 1] - qs[i]) * (ts[i] + ts[i + 1]) / 2.0
        object.__setattr__(self, "_qs", qs)
        object.__setattr__(self, "_ts", ts)
        object.__setattr__(self, "_suffix", tuple(suffix))
        object.__setattr__(self, "certain", ts[0] == ts[-1])

    @classmethod
    def exact(cls, tokens: float) -> LengthEstimate:
        """A certain length (the oracle's view, or a finished prediction)."""
        value = max(0.0, float(tokens))
        return cls(value, ((0.5, value),))

    @classmethod
    def of(cls, expected: float, quantiles: Mapping[float, float]) -> LengthEstimate:
        """Build from a predictor's mapping, sorting it and making tokens non-decreasing."""
        points: list[tuple[float, float]] = []
        top = 0.0
        for q, tokens in sorted(quantiles.items()):
            top = max(top, float(tokens))
            points.append((float(q), top))
        return cls(float(expected), tuple(points))

    def quantile(self, q: float) -> float:
        """Tokens at probability ``q``, linear between the known quantiles, flat beyond."""
        qs = self._qs
        i = bisect.bisect_left(qs, q)
        if i == 0:
            return self.quantiles[0][1]
        if i == len(qs):
            return self.quantiles[-1][1]
        (q0, t0), (q1, t1) = self.quantiles[i - 1], self.quantiles[i]
        return t0 + (t1 - t0) * (q - q0) / (q1 - q0)

    def cdf(self, tokens: float) -> float:
        """P(L <= tokens), linear between the known quantiles."""
        ts, qs = self._ts, self._qs
        if tokens < ts[0]:
            return 0.0
        if tokens >= ts[-1]:
            return qs[-1]
        i = bisect.bisect_right(ts, tokens)
        t0, t1, q0, q1 = ts[i - 1], ts[i], qs[i - 1], qs[i]
        return q0 + (q1 - q0) * (tokens - t0) / (t1 - t0)

    def remaining(self, generated: float) -> LengthEstimate:
        """The distribution of the tokens still to come given ``generated`` so far."""
        if generated <= 0:
            return self
        if self.certain:
            return LengthEstimate.exact(max(MIN_REMAINING_TOKENS, self.quantiles[0][1] - generated))
        top_q, top_t = self.quantiles[-1]
        survived = self.cdf(generated)
        if generated >= top_t or survived >= top_q:
            rest = max(MIN_REMAINING_TOKENS, generated * BEYOND_PREDICTION_FRACTION)
            return LengthEstimate(rest, ((0.5, rest), (0.9, rest * 3.0)))
        points: list[tuple[float, float]] = []
        mass = 1.0 - survived
        for q, _ in self.quantiles:
            absolute = survived + q * mass
            if absolute <= top_q:
                points.append((q, max(MIN_REMAINING_TOKENS, self.quantile(absolute) - generated)))
        if not points:
            rest = max(MIN_REMAINING_TOKENS, generated * BEYOND_PREDICTION_FRACTION)
            return LengthEstimate(rest, ((0.5, rest), (0.9, rest * 3.0)))
        expected = self._mean_above(generated, survived) - generated
        return LengthEstimate(max(MIN_REMAINING_TOKENS, expected), tuple(points))

    def expected_remaining(self, generated: float) -> float:
        """E[L - g | L > g] without building the conditional distribution (the hot path)."""
        if generated <= 0:
            return self.expected
        if self.certain:
            return max(MIN_REMAINING_TOKENS, self.quantiles[0][1] - generated)
        top_q, top_t = self.quantiles[-1]
        survived = self.cdf(generated)
        if generated >= top_t or survived >= top_q:
            return max(MIN_REMAINING_TOKENS, generated * BEYOND_PREDICTION_FRACTION)
        return max(MIN_REMAINING_TOKENS, self._mean_above(generated, survived) - generated)

    def remaining_quantile(self, q: float, generated: float) -> float:
        """The ``q`` quantile of the tokens still to come given ``generated`` so far."""
        if generated <= 0:
            return self.quantile(q)
        if self.certain:
            return max(MIN_REMAINING_TOKENS, self.quantiles[0][1] - generated)
        top_q, top_t = self.quantiles[-1]
        survived = self.cdf(generated)
        if generated >= top_t or survived >= top_q:
            rest = max(MIN_REMAINING_TOKENS, generated * BEYOND_PREDICTION_FRACTION)
            return rest * (1.0 + 2.0 * q)
        absolute = min(top_q, survived + q * (1.0 - survived))
        return max(MIN_REMAINING_TOKENS, self.quantile(absolute) - generated)

    def _mean_above(self, floor: float, survived: float) -> float:
        """E[L | L > floor] under the piecewise-linear CDF plus a tail past the top quantile
        (``survived``: ``cdf(floor)``)."""
        ts, qs = self._ts, self._qs
        if floor < ts[0]:
            total = self._suffix[0]
        else:
            i = bisect.bisect_right(ts, floor)
            total = 0.0
            if i < len(ts):
                total = (qs[i] - survived) * (floor + ts[i]) / 2.0 + self._suffix[i]
        top_q, top_t = self.quantiles[-1]
        total += (1.0 - top_q) * max(top_t * TAIL_MEAN_FACTOR, floor)
        return total / max(1e-9, 1.0 - survived)
