"""Adapting the predictor to a served model from its completed requests.

Why: answer lengths differ up to 10x between models (and the shipped model learned from
large chat models), so a deployment recalibrates to the model it serves. Adaptation never
retrains the encoder; it fits, per served model and in log1p-token space:

1. a linear map of the base median (intercept and slope; the slope is shrunk toward 1 so a
   few dozen records only move the level), fitted for absolute error (IRLS), because the
   figure that matters is the error of the predicted median;
2. with enough records that carry features, a ridge correction over [embedding, cues],
   kept only when grouped cross-validation says it lowers the error;
3. the quantile offsets around the median, from the records' residuals, shrunk toward the
   base offsets;
4. with features, a neighbour memory of the newest records' embeddings and their residuals
   after 1-2, so a prompt like ones already served moves towards how their answers turned
   out (`orchestrator/predictor/memory.py`).

The result is an `adaptation.json` folder that `LengthPredictor.load(DIR)` reads.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.distribution import GRID_LEVELS
from orchestrator.predictor.errors import PredictorDataError
from orchestrator.predictor.features import N_CUE_FEATURES
from orchestrator.predictor.head import ridge_path, weighted_quantile, weighted_ridge
from orchestrator.predictor.history import CompletionHistory
from orchestrator.predictor.memory import NeighbourMemory
from orchestrator.predictor.model import (
    ADAPTATION_FILE,
    Calibration,
    LengthPredictor,
    RawOutputs,
    shipped_model_dir,
)

#: Fewest records for a model's own calibration (fewer: only the catch-all '*' applies).
MIN_RECORDS = 20
#: Pseudo-records pulling the slope toward 1 (the base model's ranking is kept until the
#: data clearly says otherwise).
SLOPE_PRIOR_RECORDS = 50.0
#: Pseudo-records pulling the quantile offsets toward the base model's offsets.
OFFSET_PRIOR_RECORDS = 50.0
#: Fewest feature-carrying records before a ridge correction head is tried.
HEAD_MIN_RECORDS = 150
HEAD_ALPHAS: tuple[float, ...] = (300.0, 1000.0, 3000.0, 10000.0)
HEAD_FOLDS = 5
#: A correction head is kept only if it lowers cross-validated log error by this fraction.
HEAD_MIN_GAIN = 0.02
#: Newest records a calibration's neighbour memory keeps: each costs a 384-wide dot product
#: per prediction (5,000: 0.2 ms for one prompt, 0.1 ms a prompt in batches of 64, 7.7 MB).
MEMORY_MAX_RECORDS = 5_000
MEMORY_FILE_PREFIX = "memory-"
IRLS_ITERATIONS = 20
IRLS_EPSILON = 0.05
CATCH_ALL = "*"
ADAPTATION_FORMAT = 1
_MEDIAN = len(GRID_LEVELS) // 2


@dataclass(frozen=True)
class AdaptationData:
    """What adaptation fits on: base log-median, optional features, actual log1p tokens."""

    loc: np.ndarray  # (n,) base log1p median
    features: np.ndarray | None  # (n, d) [embedding, cues] or None, oldest record first
    base_offsets: np.ndarray  # (grid,) base offsets around the median (mean over rows)
    target: np.ndarray  # (n,) log1p(actual tokens)


def _fit_linear_l1(loc: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Intercept and slope minimising absolute error, slope shrunk toward 1 (IRLS)."""
    a, b = float(np.median(y - loc)), 1.0
    for _ in range(IRLS_ITERATIONS):
        w = 1.0 / np.maximum(np.abs(y - a - b * loc), IRLS_EPSILON)
        w = w / w.mean()
        # Normal equations with a prior of SLOPE_PRIOR_RECORDS pseudo-rows at slope 1.
        xm = np.average(loc, weights=w)
        ym = np.average(y, weights=w)
        sxx = float(np.sum(w * (loc - xm) ** 2))
        sxy = float(np.sum(w * (loc - xm) * (y - ym)))
        prior = SLOPE_PRIOR_RECORDS * max(float(np.var(loc)), 1e-3)
        b = (sxy + prior * 1.0) / (sxx + prior)
        a = ym - b * xm
    return a, b


def _fit_head(
    base: np.ndarray, features: np.ndarray, y: np.ndarray, seed: int
) -> tuple[np.ndarray, float] | None:
    """Ridge correction of the residual y - base over features, or None when CV says no."""
    rng = np.random.default_rng(seed)
    folds = rng.permutation(len(y)) % HEAD_FOLDS
    residual = y - base
    no_head = float(np.mean(np.abs(residual)))
    best: tuple[float, float] | None = None
    ones = np.ones(len(y))
    errors = np.zeros((len(HEAD_ALPHAS), len(y)))
    for k in range(HEAD_FOLDS):
        tr, te = folds != k, folds == k
        fits = ridge_path(features[tr], residual[tr], ones[tr], HEAD_ALPHAS)
        for row, (coef, bias) in enumerate(fits):
            errors[row, te] = residual[te] - (features[te] @ coef + bias)
    for alpha, alpha_errors in zip(HEAD_ALPHAS, errors, strict=True):
        mae = float(np.mean(np.abs(alpha_errors)))
        if best is None or mae < best[0]:
            best = (mae, alpha)
    assert best is not None
    if best[0] > no_head * (1.0 - HEAD_MIN_GAIN):
        return None
    return weighted_ridge(features, residual, ones, best[1])


def fit_calibration(data: AdaptationData, seed: int = 0) -> Calibration:
    """One model's calibration from its records (see the module docstring)."""
    n = len(data.target)
    if n == 0:
        raise PredictorDataError("no records to adapt on")
    a, b = _fit_linear_l1(data.loc, data.target)
    fitted = a + b * data.loc
    head: tuple[float, ...] | None = None
    head_bias = 0.0
    if data.features is not None and n >= HEAD_MIN_RECORDS:
        found = _fit_head(fitted, data.features, data.target, seed)
        if found is not None:
            coef, bias = found
            head, head_bias = tuple(float(c) for c in coef), float(bias)
            fitted = fitted + data.features @ coef + bias
    residuals = data.target - fitted
    memory = None
    if data.features is not None:
        newest = slice(max(0, n - MEMORY_MAX_RECORDS), n)
        embeddings = data.features[newest, : data.features.shape[1] - N_CUE_FEATURES]
        memory = NeighbourMemory.of(embeddings, residuals[newest])
    levels = np.asarray(GRID_LEVELS)
    empirical = weighted_quantile(residuals, np.ones(n), levels)
    empirical = empirical - np.interp(0.5, levels, empirical)
    share = n / (n + OFFSET_PRIOR_RECORDS)
    offsets = share * empirical + (1.0 - share) * data.base_offsets
    return Calibration(
        intercept=float(a),
        slope=float(b),
        offsets=tuple(float(o) for o in offsets),
        head=head,
        head_bias=head_bias,
        n_records=n,
        memory=memory,
    )


def _adaptation_data(
    raw: RawOutputs, idx: Sequence[int], tokens: np.ndarray, base_offsets: np.ndarray
) -> AdaptationData:
    rows = list(idx)
    loc = raw.log_grid[rows, _MEDIAN].astype(np.float64)
    feats = np.hstack([raw.embeddings[rows], raw.cues[rows]]).astype(np.float64)
    return AdaptationData(
        loc=loc,
        features=feats,
        base_offsets=base_offsets,
        target=np.log1p(tokens[list(idx)].astype(np.float64)),
    )


def _groups(models: Sequence[str], only: str | None) -> dict[str, list[int]]:
    """Row indices per calibration key: each model with enough rows, and the catch-all."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        if only is None or m == only:
            groups.setdefault(m, []).append(i)
    if only is not None and only not in groups:
        raise PredictorDataError(f"no records for model {only!r}")
    keyed = {m: idx for m, idx in groups.items() if m and len(idx) >= MIN_RECORDS}
    keyed[CATCH_ALL] = [i for idx in groups.values() for i in idx]
    return keyed


def _fit_groups(
    groups: dict[str, list[int]], fit: Callable[[list[int]], Calibration]
) -> dict[str, Calibration]:
    """``fit`` each group's rows once: with one served model the catch-all holds the same rows
    as that model, and fitting them twice would double the cost of an adaptation."""
    fitted: dict[tuple[int, ...], Calibration] = {}
    calibrations = {}
    for key, idx in groups.items():
        rows = tuple(idx)
        if rows not in fitted:
            fitted[rows] = fit(idx)
        calibrations[key] = fitted[rows]
    return calibrations


def write_adaptation(
    out_dir: Path, base: LengthPredictor, calibrations: dict[str, Calibration]
) -> dict[str, Any]:
    """Write adaptation.json into out_dir (created), naming the base model folder.

    Calibrations `base` already carried for other models are kept, so adapting an adapted
    predictor to a second served model does not forget the first; keys in `calibrations`
    (including the catch-all) replace the old ones. Neighbour memories are saved beside it
    under names no earlier write used, and those it no longer names are then removed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = {**base.calibrations, **calibrations}
    try:
        is_shipped = base.model_dir.resolve() == shipped_model_dir().resolve()
    except ValueError:
        is_shipped = False
    stamp = time.time_ns()
    memory_files: dict[int, str] = {}
    for calibration in merged.values():
        memory = calibration.memory
        if memory is not None and id(memory) not in memory_files:
            name = f"{MEMORY_FILE_PREFIX}{stamp}-{len(memory_files)}.npy"
            memory.save(out_dir / name)
            memory_files[id(memory)] = name
    doc: dict[str, Any] = {
        "format_version": ADAPTATION_FORMAT,
        "base": None if is_shipped else str(base.model_dir.resolve()),
        "created_at": time.time(),
        "calibrations": {
            k: c.to_json(memory_files.get(id(c.memory))) for k, c in sorted(merged.items())
        },
    }
    tmp = out_dir / (ADAPTATION_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(doc, handle)
        handle.write("\n")
    tmp.replace(out_dir / ADAPTATION_FILE)
    for stale in out_dir.glob(f"{MEMORY_FILE_PREFIX}*.npy"):
        if stale.name not in memory_files.values():
            stale.unlink(missing_ok=True)
    return doc


def _summary(calibrations: dict[str, Calibration]) -> dict[str, Any]:
    return {
        "calibrations": {
            k: {
                "n_records": c.n_records,
                "intercept": round(c.intercept, 4),
                "slope": round(c.slope, 4),
                "head": c.head is not None,
                "memory_records": 0 if c.memory is None else len(c.memory.keys),
            }
            for k, c in sorted(calibrations.items())
        }
    }


def adapt_records(
    records: Sequence[LengthRecord],
    out_dir: Path,
    base: LengthPredictor | None = None,
    model: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Adapt `base` (default: shipped) to records; write out_dir; return a summary."""
    if not records:
        raise PredictorDataError("no records to adapt on")
    predictor = base or LengthPredictor.load()
    raw = predictor.raw_outputs([r.prompt for r in records])
    tokens = np.asarray([r.output_tokens for r in records])
    calibrations = _fit_groups(
        _groups([r.model for r in records], model),
        lambda idx: fit_calibration(
            _adaptation_data(raw, idx, tokens, predictor.base_offsets()), seed
        ),
    )
    write_adaptation(out_dir, predictor, calibrations)
    return _summary(calibrations)


def adapt_from_file(
    data: Path, out_dir: Path, base: Path | None = None, model: str | None = None
) -> dict[str, Any]:
    """`edgeorch predictor adapt --data F --out DIR [--predictor BASE] [--model M]`."""
    predictor = LengthPredictor.load(base)
    return adapt_records(load_records(data), out_dir, predictor, model)


def adapt_from_history(
    history: CompletionHistory,
    out_dir: Path,
    base: LengthPredictor | None = None,
    model: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Adapt from the SQLite completion history.

    Rows recorded with `LengthPredictor.history_features` vectors ([base log-median,
    embedding, cues]) allow the correction head; rows with only a fingerprint use the
    stored predicted tokens as the base median (record the base prediction then).
    """
    predictor = base or LengthPredictor.load()
    rows = history.records(model)
    if not rows:
        raise PredictorDataError(
            "the completion history has no records" + (f" for {model!r}" if model else "")
        )
    models = [r.model for r in rows]
    tokens = np.asarray([r.actual_tokens for r in rows], dtype=np.float64)
    width = predictor.history_feature_width
    all_features = all(r.features is not None and r.features.size == width for r in rows)
    base_grid = predictor.base_offsets()

    def fit(idx: list[int]) -> Calibration:
        if all_features:
            feats = np.stack([rows[i].features for i in idx]).astype(np.float64)  # type: ignore[misc]
            loc, extra = feats[:, 0], feats[:, 1:]
        else:
            loc = np.log1p(np.asarray([rows[i].predicted_tokens for i in idx], dtype=np.float64))
            extra = None
        data = AdaptationData(
            loc=loc, features=extra, base_offsets=base_grid, target=np.log1p(tokens[idx])
        )
        return fit_calibration(data, seed)

    calibrations = _fit_groups(_groups(models, model), fit)
    write_adaptation(out_dir, predictor, calibrations)
    return _summary(calibrations)


#: Most of the predictor worker's time adaptation may take: after a refit that took d
#: seconds the next waits at least d / ADAPT_TIME_SHARE - d, however fast completions come
#: (a refit over a full history takes seconds, and predictions wait while it runs).
ADAPT_TIME_SHARE = 0.1


class AutoAdapter:
    """Re-adapts every `every_n` new history rows, but spends at most `time_share` of the time
    adapting. Call `maybe_adapt()` after `record`, or `due()` there and `refit()` on another
    thread (it reads the history through a connection of its own).

    No threads or timers of its own (``clock`` is read, never waited on). A refit returns the
    freshly loaded predictor, for the caller to swap in.
    """

    def __init__(
        self,
        history: CompletionHistory,
        out_dir: Path,
        every_n: int = 200,
        base: LengthPredictor | None = None,
        time_share: float = ADAPT_TIME_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if every_n < 1:
            raise ValueError(f"every_n must be >= 1, got {every_n}")
        if not 0.0 < time_share <= 1.0:
            raise ValueError(f"time_share must be in (0, 1], got {time_share}")
        self.history = history
        self.out_dir = Path(out_dir)
        self.every_n = every_n
        self.base = base
        self.time_share = time_share
        self._clock = clock
        self._id_at_last = history.last_id()
        self._not_before = -math.inf

    def due(self) -> bool:
        """Enough new rows since the last refit, and its time share allows another."""
        return (
            self.history.last_id() - self._id_at_last >= self.every_n
            and self._clock() >= self._not_before
        )

    def refit(self) -> LengthPredictor:
        """Adapt the base predictor to the whole history and load the result."""
        started = self._clock()
        with CompletionHistory(self.history.path, self.history.max_rows_per_model) as history:
            self._id_at_last = history.last_id()
            base = self.base or LengthPredictor.load()
            adapt_from_history(history, self.out_dir, base)
        adapted = LengthPredictor.load(self.out_dir, threads=base.threads)
        took = self._clock() - started
        self._not_before = started + took / self.time_share
        return adapted

    def maybe_adapt(self) -> LengthPredictor | None:
        """`refit` when `due`, on this thread."""
        return self.refit() if self.due() else None
