"""Length estimates for the simulator and the bench: a fake predictor with controllable error,
the truth (for ``oracle``), and an adapter for the real predictor (``orchestrator.predictor``).

The fake predictor draws a predicted median ``m = L * exp(sigma * Z)`` around each true length
``L`` and reports the log-normal quantiles ``m * exp(sigma * z_q)``, so its quantiles cover the
truth at their levels and its rank quality is set by ``sigma``; ``FakePredictor.for_tau`` picks
the ``sigma`` that gives a target Kendall tau on given lengths. Its medians are more spread than
the truth, where a trained predictor's are shrunk towards the typical length. The
``calibrated`` fake (``--predictor calibrated:TAU``) reads the same noisy signal as a trained
model would: its estimate is the posterior of the true log length given the signal under a
normal prior fitted to the lengths (the population a model learns), so the same ranking comes
with estimates that are right on average at every predicted length, as the shipped
predictor's nearly are (docs/SCHED_RESULTS.md, "Why the real predictor schedules unlike the
fake one").
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, Final

import numpy as np

from orchestrator.core.estimate import LengthEstimate
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import ConversationHint

QUANTILE_LEVELS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
Z_SCORES: Final = {q: NormalDist().inv_cdf(q) for q in QUANTILE_LEVELS}
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
    """Seeded log-normal noise around the truth, reported as is or (``calibrated``) as the
    posterior given it; see the module docstring."""

    def __init__(self, sigma: float, seed: int, calibrated: bool = False) -> None:
        if sigma < 0:
            raise InvalidRequest(f"fake predictor sigma must be >= 0, got {sigma}")
        self.sigma = sigma
        self.seed = seed
        self.calibrated = calibrated

    @classmethod
    def for_tau(
        cls, tau: float, lengths: Sequence[int], seed: int, calibrated: bool = False
    ) -> FakePredictor:
        """The predictor whose medians reach Kendall ``tau`` against ``lengths`` (bisection)."""
        if not 0.0 < tau <= 1.0:
            raise InvalidRequest(f"fake predictor tau must be in (0, 1], got {tau}", field="tau")
        if tau >= 1.0:
            return cls(0.0, seed, calibrated)
        sample = list(lengths[:TAU_SAMPLE])
        lo, hi = 0.0, MAX_SIGMA
        for _ in range(CALIBRATION_STEPS):
            mid = (lo + hi) / 2
            medians = cls(mid, seed).medians(sample)
            if kendall_tau(medians, sample) > tau:
                lo = mid
            else:
                hi = mid
        return cls((lo + hi) / 2, seed, calibrated)

    def medians(self, lengths: Sequence[int]) -> list[float]:
        noise = np.random.default_rng(self.seed).standard_normal(len(lengths))
        return [max(1.0, n * math.exp(self.sigma * z)) for n, z in zip(lengths, noise, strict=True)]

    def estimates(self, lengths: Sequence[int]) -> list[LengthEstimate]:
        medians = self.medians(lengths)
        if not self.calibrated or len(lengths) < 2:
            return [_log_normal(m, self.sigma) for m in medians]
        truth = np.log(np.maximum(np.asarray(lengths, dtype=np.float64), 1.0))
        prior_mean, prior_var = float(truth.mean()), float(truth.var())
        weight = prior_var / (prior_var + self.sigma**2) if prior_var > 0 else 0.0
        spread = math.sqrt(weight) * self.sigma
        return [
            _log_normal(math.exp(prior_mean + weight * (math.log(m) - prior_mean)), spread)
            for m in medians
        ]


def _log_normal(median: float, sigma: float) -> LengthEstimate:
    """The estimate of a log-normal length: its mean and ``QUANTILE_LEVELS``, at least 1."""
    return LengthEstimate(
        median * math.exp(sigma**2 / 2),
        tuple((q, max(1.0, median * math.exp(sigma * Z_SCORES[q]))) for q in QUANTILE_LEVELS),
    )


def exact_estimates(lengths: Sequence[int]) -> list[LengthEstimate]:
    """The truth, for ``oracle``."""
    return [LengthEstimate.exact(n) for n in lengths]


def _predictor_module() -> Any:
    try:
        return importlib.import_module("orchestrator.predictor")
    except ImportError as exc:
        raise InvalidRequest(
            f"--predictor real needs orchestrator.predictor, which is not installed here ({exc})",
            field="predictor",
        ) from None


class RealEstimates:
    """The shipped predictor as the coordinator runs it, for the simulator.

    Each request is predicted on arrival; a chat turn (``conversations[i]`` set) from its
    latest user message and its earlier answers' lengths, as the coordinator predicts what the
    OpenAI gateway sends. With ``adapt_every`` > 0 the predictor is
    recalibrated, as the coordinator's automatic mode does, after every ``adapt_every``
    completions on all completions so far (`fit_calibration` over the stored features), and
    requests arriving afterwards get the recalibrated prediction. Token counts are multiplied
    by the bench's ``--length-scale`` (the trace's answers are scaled the same way). The
    encoder runs once per prompt; ``fresh()`` gives another run the same start.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        request_ids: Sequence[str],
        scale: float,
        adapt_every: int,
        conversations: Sequence[ConversationHint | None] | None = None,
    ) -> None:
        module = _predictor_module()
        self._adapt: Any = importlib.import_module("orchestrator.predictor.adapt")
        self._distribution: Any = importlib.import_module("orchestrator.predictor.distribution")
        self._chat: Any = importlib.import_module("orchestrator.predictor.conversation")
        self._predictor = module.LengthPredictor.load()
        hints = conversations or [None] * len(prompts)
        self._earlier = [() if hint is None else hint.earlier_answer_tokens for hint in hints]
        texts = [p if h is None else h.last_user for p, h in zip(prompts, hints, strict=True)]
        self._raw = self._predictor.raw_outputs(texts)
        self._features = np.hstack([self._raw.embeddings, self._raw.cues]).astype(np.float64)
        self._loc = self._raw.log_grid[:, len(self._raw.log_grid[0]) // 2].astype(np.float64)
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._scale = scale
        self.adapt_every = adapt_every
        self.base = [self._estimate(row, i) for i, row in enumerate(self._raw.log_grid)]
        self._reset()

    def _reset(self) -> None:
        self._completed: list[tuple[int, float]] = []
        self._calibrated = False
        self.adaptations = 0

    def fresh(self) -> RealEstimates:
        """The same predictions with no completions seen yet (its own calibration; the ONNX
        sessions and encoder outputs are shared)."""
        other = copy.copy(self)
        other._predictor = copy.copy(self._predictor)
        other._reset()
        return other

    def _estimate(self, log_grid: np.ndarray, index: int) -> LengthEstimate:
        earlier = self._earlier[index]
        if earlier:
            shift = self._chat.conversation_shift(float(log_grid[len(log_grid) // 2]), earlier)
            log_grid = np.maximum(log_grid + shift, 0.0)
        prediction = self._distribution.distribution_from_grid(log_grid)
        quantiles = {float(q): float(v) * self._scale for q, v in prediction.quantiles.items()}
        return LengthEstimate.of(float(prediction.expected_tokens) * self._scale, quantiles)

    def on_arrival(self, request_id: str) -> LengthEstimate:
        """What the coordinator would predict for the request now."""
        i = self._index[request_id]
        if not self._calibrated:
            return self.base[i]
        row = dataclasses.replace(
            self._raw,
            embeddings=self._raw.embeddings[i : i + 1],
            cues=self._raw.cues[i : i + 1],
            log_grid=self._raw.log_grid[i : i + 1],
        )
        return self._estimate(self._predictor.calibrated_grid(row, None)[0], i)

    def on_completion(self, request_id: str, output_tokens: int) -> None:
        """Record a finished request; recalibrate every ``adapt_every`` completions."""
        if self.adapt_every <= 0:
            return
        self._completed.append((self._index[request_id], output_tokens / self._scale))
        if len(self._completed) % self.adapt_every:
            return
        rows = np.asarray([i for i, _ in self._completed])
        data = self._adapt.AdaptationData(
            loc=self._loc[rows],
            features=self._features[rows],
            base_offsets=self._predictor.base_offsets(),
            target=np.log1p([tokens for _, tokens in self._completed]),
        )
        self._predictor.calibrations = {"*": self._adapt.fit_calibration(data, 0)}
        self._calibrated = True
        self.adaptations += 1


def parse_predictor(spec: str) -> tuple[str, float]:
    """``fake[:TAU]``, ``calibrated[:TAU]`` or ``real`` -> (kind, tau)."""
    kind, _, value = spec.partition(":")
    if kind == "real" and not value:
        return "real", 0.0
    if kind in ("fake", "calibrated"):
        try:
            tau = float(value) if value else DEFAULT_FAKE_TAU
        except ValueError:
            raise InvalidRequest(
                f"--predictor {kind}:TAU needs a number, got {value!r}", field="predictor"
            ) from None
        if not 0.0 < tau <= 1.0:
            raise InvalidRequest(
                f"--predictor {kind} tau must be in (0, 1], got {tau}", field="predictor"
            )
        return kind, tau
    raise InvalidRequest(
        f"--predictor must be fake[:TAU], calibrated[:TAU] or real, got {spec!r}",
        field="predictor",
    )
