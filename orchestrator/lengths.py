"""Length estimates for the simulator and the bench: a fake predictor with controllable error,
the truth (for ``oracle``), and an adapter for the real predictor (``orchestrator.predictor``).

The fake predictor draws a predicted median ``m = L * exp(sigma * Z)`` around each true length
``L`` and reports the log-normal quantiles ``m * exp(sigma * z_q)``, so it is calibrated (the
truth is the predicted distribution's draw) and its rank quality is set by ``sigma``;
``FakePredictor.for_tau`` picks the ``sigma`` that gives a target Kendall tau on given lengths.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, Final

import numpy as np

from orchestrator.core.estimate import LengthEstimate
from orchestrator.errors import InvalidRequest

QUANTILE_LEVELS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
DEFAULT_FAKE_TAU: Final = 0.55
"""Kendall tau of the development fake predictor: between the TF-IDF baseline (0.40) and the
agreement of two models' lengths on the same prompts (Spearman 0.70, about tau 0.52-0.55)."""
CALIBRATION_STEPS: Final = 16
MAX_SIGMA: Final = 5.0
TAU_SAMPLE: Final = 800
"""Lengths used to calibrate sigma (tau-b is O(n^2) here; 800 gives about +-0.02)."""


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either variable accounted for), O(n^2) with numpy."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(a)
    concordant = discordant = ties_a = ties_b = 0.0
    for i in range(n - 1):
        da = np.sign(a[i + 1 :] - a[i])
        db = np.sign(b[i + 1 :] - b[i])
        product = da * db
        concordant += float(np.sum(product > 0))
        discordant += float(np.sum(product < 0))
        ties_a += float(np.sum((da == 0) & (db != 0)))
        ties_b += float(np.sum((db == 0) & (da != 0)))
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return 0.0 if denominator == 0 else (concordant - discordant) / denominator


class FakePredictor:
    """Seeded log-normal noise around the truth; see the module docstring."""

    def __init__(self, sigma: float, seed: int) -> None:
        if sigma < 0:
            raise InvalidRequest(f"fake predictor sigma must be >= 0, got {sigma}")
        self.sigma = sigma
        self.seed = seed

    @classmethod
    def for_tau(cls, tau: float, lengths: Sequence[int], seed: int) -> FakePredictor:
        """The predictor whose medians reach Kendall ``tau`` against ``lengths`` (bisection)."""
        if not 0.0 < tau <= 1.0:
            raise InvalidRequest(f"fake predictor tau must be in (0, 1], got {tau}", field="tau")
        if tau >= 1.0:
            return cls(0.0, seed)
        sample = list(lengths[:TAU_SAMPLE])
        lo, hi = 0.0, MAX_SIGMA
        for _ in range(CALIBRATION_STEPS):
            mid = (lo + hi) / 2
            medians = cls(mid, seed).medians(sample)
            if kendall_tau(medians, sample) > tau:
                lo = mid
            else:
                hi = mid
        return cls((lo + hi) / 2, seed)

    def medians(self, lengths: Sequence[int]) -> list[float]:
        noise = np.random.default_rng(self.seed).standard_normal(len(lengths))
        return [max(1.0, n * math.exp(self.sigma * z)) for n, z in zip(lengths, noise, strict=True)]

    def estimates(self, lengths: Sequence[int]) -> list[LengthEstimate]:
        z = {q: NormalDist().inv_cdf(q) for q in QUANTILE_LEVELS}
        mean_factor = math.exp(self.sigma**2 / 2)
        return [
            LengthEstimate(
                m * mean_factor,
                tuple((q, max(1.0, m * math.exp(self.sigma * z[q]))) for q in QUANTILE_LEVELS),
            )
            for m in self.medians(lengths)
        ]


def exact_estimates(lengths: Sequence[int]) -> list[LengthEstimate]:
    """The truth, for ``oracle``."""
    return [LengthEstimate.exact(n) for n in lengths]


def real_estimates(prompts: Sequence[str], scale: float) -> list[LengthEstimate]:
    """Estimates from the shipped predictor (``orchestrator.predictor``), multiplied by the
    bench's ``--length-scale`` (the trace's answers are scaled the same way)."""
    try:
        module: Any = importlib.import_module("orchestrator.predictor")
    except ImportError as exc:
        raise InvalidRequest(
            f"--predictor real needs orchestrator.predictor, which is not installed here ({exc})",
            field="predictor",
        ) from None
    predictor = module.LengthPredictor.load()
    out: list[LengthEstimate] = []
    for prompt in prompts:
        prediction = predictor.predict(prompt)
        quantiles = {float(q): float(v) * scale for q, v in prediction.quantiles.items()}
        if not quantiles:
            quantiles = {0.5: float(prediction.expected_tokens) * scale}
        out.append(LengthEstimate.of(float(prediction.expected_tokens) * scale, quantiles))
    return out


def parse_predictor(spec: str) -> tuple[str, float]:
    """``fake``, ``fake:TAU`` or ``real`` -> (kind, tau)."""
    kind, _, value = spec.partition(":")
    if kind == "real" and not value:
        return "real", 0.0
    if kind == "fake":
        try:
            tau = float(value) if value else DEFAULT_FAKE_TAU
        except ValueError:
            raise InvalidRequest(
                f"--predictor fake:TAU needs a number, got {value!r}", field="predictor"
            ) from None
        if not 0.0 < tau <= 1.0:
            raise InvalidRequest(
                f"--predictor fake tau must be in (0, 1], got {tau}", field="predictor"
            )
        return "fake", tau
    raise InvalidRequest(
        f"--predictor must be fake, fake:TAU or real, got {spec!r}", field="predictor"
    )
