"""Evaluation of a predictor on a length file: rank agreement, error and latency.

Metrics are computed with numpy only (no scipy at runtime): Kendall's tau-b and Spearman's
rho between the predicted median and the real output tokens, the mean absolute error of the
predicted median, and per-prompt latency predicting one prompt at a time on one core.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.errors import PredictorDataError
from orchestrator.predictor.model import LengthPredictor

#: Prompts timed one at a time for the latency figures (all of them when fewer).
DEFAULT_LATENCY_SAMPLES = 1000
#: Untimed single predictions first, so lazy initialisation does not count as latency.
WARMUP_PREDICTIONS = 5


def _rankdata(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank), 1-based, like scipy.stats.rankdata."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_vals)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def spearman(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Spearman's rho with average ranks for ties; nan when either side is constant."""
    rx, ry = _rankdata(np.asarray(x, dtype=np.float64)), _rankdata(np.asarray(y, dtype=np.float64))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _count_tied_pairs(values: np.ndarray) -> int:
    _, counts = np.unique(values, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def _count_discordant(values: np.ndarray) -> int:
    """Inversions in `values` by merge sort: O(n log n)."""
    arr = values.tolist()
    buffer = arr[:]
    inversions = 0
    width = 1
    n = len(arr)
    while width < n:
        for lo in range(0, n, 2 * width):
            mid, hi = min(lo + width, n), min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if arr[i] <= arr[j]:
                    buffer[k] = arr[i]
                    i += 1
                else:
                    buffer[k] = arr[j]
                    inversions += mid - i
                    j += 1
                k += 1
            buffer[k:hi] = arr[i:mid] + arr[j:hi]
        arr, buffer = buffer, arr
        width *= 2
    return inversions


def kendall_tau_b(x: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """Kendall's tau-b (ties in either variable corrected), O(n log n) (Knight's algorithm)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xa)
    if n != len(ya):
        raise ValueError("x and y differ in length")
    if n < 2:
        return float("nan")
    order = np.lexsort((ya, xa))
    xs, ys = xa[order], ya[order]
    n0 = n * (n - 1) // 2
    tx = _count_tied_pairs(xs)
    ty = _count_tied_pairs(ys)
    joint = 0
    start = 0
    for i in range(1, n + 1):
        if i == n or xs[i] != xs[start] or ys[i] != ys[start]:
            run = i - start
            joint += run * (run - 1) // 2
            start = i
    discordant = _count_discordant(ys)
    concordant_minus_discordant = n0 - tx - ty + joint - 2 * discordant
    denominator = np.sqrt(float(n0 - tx) * float(n0 - ty))
    if denominator == 0:
        return float("nan")
    return float(concordant_minus_discordant / denominator)


@dataclass(frozen=True)
class EvalResult:
    """The figures `edgeorch predictor eval --json` prints."""

    n: int
    kendall_tau: float
    spearman: float
    mae_tokens: float
    p50_ms: float
    p99_ms: float

    def to_json(self) -> dict[str, float | int]:
        """JSON-ready dict with the field names DESIGN.md fixes."""
        return asdict(self)


def measure_latency(
    predictor: LengthPredictor, prompts: Sequence[str], model: str | None, samples: int
) -> tuple[float, float]:
    """p50 and p99 milliseconds of single predictions over up to `samples` prompts."""
    chosen = list(prompts[:samples])
    for prompt in chosen[:WARMUP_PREDICTIONS]:
        predictor.predict(prompt, model)
    timings = []
    for prompt in chosen:
        start = time.perf_counter()
        predictor.predict(prompt, model)
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(np.percentile(timings, 50)), float(np.percentile(timings, 99))


def evaluate_records(
    predictor: LengthPredictor,
    records: Sequence[LengthRecord],
    model: str | None = None,
    latency_samples: int = DEFAULT_LATENCY_SAMPLES,
) -> EvalResult:
    """Score `predictor` on `records`; `model` None uses each record's own model name."""
    if not records:
        raise PredictorDataError("no records to evaluate")
    actual = np.asarray([r.output_tokens for r in records], dtype=np.float64)
    predicted = np.empty(len(records), dtype=np.float64)
    by_model: dict[str | None, list[int]] = {}
    for i, rec in enumerate(records):
        key = model if model is not None else (rec.model or None)
        by_model.setdefault(key, []).append(i)
    for key, idx in by_model.items():
        preds = predictor.predict_batch([records[i].prompt for i in idx], key)
        predicted[idx] = [p.quantiles[0.5] for p in preds]
    p50, p99 = (
        measure_latency(predictor, [r.prompt for r in records], model, latency_samples)
        if latency_samples > 0
        else (float("nan"), float("nan"))
    )
    return EvalResult(
        n=len(records),
        kendall_tau=kendall_tau_b(predicted, actual),
        spearman=spearman(predicted, actual),
        mae_tokens=float(np.mean(np.abs(predicted - actual))),
        p50_ms=p50,
        p99_ms=p99,
    )


def evaluate_file(
    predictor: LengthPredictor,
    path: Path,
    model: str | None = None,
    latency_samples: int = DEFAULT_LATENCY_SAMPLES,
) -> EvalResult:
    """`evaluate_records` over a length file."""
    return evaluate_records(predictor, load_records(path), model, latency_samples)
