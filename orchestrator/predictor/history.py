"""A small SQLite record of completed requests, the input of online adaptation.

The coordinator calls `record` after every completed request. Each row keeps the prompt's
fingerprint (or its feature vector, which lets adaptation refit a head without the prompt
text), the served model, the predicted median and the actual output tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at REAL NOT NULL,
    model TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    features BLOB,
    predicted_tokens REAL NOT NULL,
    actual_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_model ON completions (model, id);
"""
#: Rows kept per model; older rows are dropped so the file stays small (about 2 kB a row
#: with features).
DEFAULT_MAX_ROWS_PER_MODEL = 20_000


def prompt_fingerprint(prompt: str) -> str:
    """A stable, non-reversible key for a prompt (SHA-256 of its UTF-8 text, 32 hex chars)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class HistoryRecord:
    """One completed request as stored."""

    id: int
    recorded_at: float
    model: str
    fingerprint: str
    features: np.ndarray | None
    predicted_tokens: float
    actual_tokens: int


class CompletionHistory:
    """SQLite store of (prompt key, model, predicted, actual) rows. No threads, no timers."""

    def __init__(
        self, path: Path | str, max_rows_per_model: int = DEFAULT_MAX_ROWS_PER_MODEL
    ) -> None:
        if max_rows_per_model < 1:
            raise ValueError(f"max_rows_per_model must be >= 1, got {max_rows_per_model}")
        self.path = Path(path)
        self.max_rows_per_model = max_rows_per_model
        self._db = sqlite3.connect(str(self.path))
        self._db.executescript(_SCHEMA)
        self._db.commit()
        self._batch_models: set[str] | None = None
        """Models recorded in the open `batch`, trimmed when it ends; None outside one."""

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> CompletionHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Record many rows as one transaction: one commit (each is a sync to disk, about a
        millisecond on the development VM's disk) and one trim per model, instead of one of
        each per row. The coordinator's predictor worker records a batch's completions so,
        between two predictions."""
        if self._batch_models is not None:
            yield
            return
        self._batch_models = set()
        try:
            yield
        finally:
            models, self._batch_models = self._batch_models, None
            for model in models:
                self._trim(model)
            self._db.commit()

    def record(
        self,
        prompt_fingerprint_or_features: str | np.ndarray,
        model: str | None,
        predicted_tokens: float,
        actual_tokens: int,
        recorded_at: float | None = None,
    ) -> int:
        """Store one completion; returns its row id.

        Pass a fingerprint string (see `prompt_fingerprint`) or the feature vector from
        `LengthPredictor.features`; features let adaptation refit more than a calibration.
        """
        if (
            isinstance(actual_tokens, bool)
            or int(actual_tokens) != actual_tokens
            or actual_tokens < 0
        ):
            raise ValueError(f"actual_tokens must be a non-negative integer, got {actual_tokens!r}")
        if not np.isfinite(predicted_tokens) or predicted_tokens < 0:
            raise ValueError(f"predicted_tokens must be finite and >= 0, got {predicted_tokens!r}")
        if isinstance(prompt_fingerprint_or_features, str):
            fingerprint = prompt_fingerprint_or_features
            blob = None
        else:
            vector = np.ascontiguousarray(prompt_fingerprint_or_features, dtype=np.float32)
            if vector.ndim != 1 or vector.size == 0:
                raise ValueError("features must be a non-empty 1-D vector")
            blob = vector.tobytes()
            fingerprint = hashlib.sha256(blob).hexdigest()[:32]
        key = model or ""
        cursor = self._db.execute(
            "INSERT INTO completions (recorded_at, model, fingerprint, features, "
            "predicted_tokens, actual_tokens) VALUES (?, ?, ?, ?, ?, ?)",
            (
                time.time() if recorded_at is None else recorded_at,
                key,
                fingerprint,
                blob,
                float(predicted_tokens),
                int(actual_tokens),
            ),
        )
        row_id = cursor.lastrowid
        assert row_id is not None
        if self._batch_models is not None:
            self._batch_models.add(key)
        else:
            self._trim(key)
            self._db.commit()
        return row_id

    def _trim(self, key: str) -> None:
        """Drop the model's rows beyond the newest ``max_rows_per_model``."""
        self._db.execute(
            "DELETE FROM completions WHERE model = ? AND id <= ("
            "SELECT id FROM completions WHERE model = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (key, key, self.max_rows_per_model),
        )

    def count(self, model: str | None = None) -> int:
        """Rows stored for `model` (None: all models)."""
        if model is None:
            (n,) = self._db.execute("SELECT COUNT(*) FROM completions").fetchone()
        else:
            (n,) = self._db.execute(
                "SELECT COUNT(*) FROM completions WHERE model = ?", (model,)
            ).fetchone()
        return int(n)

    def last_id(self) -> int:
        """The newest row's id (0 when empty): ids only grow, so this counts rows ever recorded,
        where `count` stops growing once trimming holds it at the cap."""
        (last,) = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM completions").fetchone()
        return int(last)

    def models(self) -> list[str]:
        """Models with at least one row, sorted."""
        return [
            r[0] for r in self._db.execute("SELECT DISTINCT model FROM completions ORDER BY model")
        ]

    def records(self, model: str | None = None) -> list[HistoryRecord]:
        """Rows for `model` (None: all), oldest first."""
        return list(self.iter_records(model))

    def iter_records(self, model: str | None = None) -> Iterator[HistoryRecord]:
        """Like `records`, streaming."""
        query = (
            "SELECT id, recorded_at, model, fingerprint, features, predicted_tokens, actual_tokens "
            "FROM completions"
        )
        args: tuple[str, ...] = ()
        if model is not None:
            query += " WHERE model = ?"
            args = (model,)
        for row in self._db.execute(query + " ORDER BY id", args):
            blob = row[4]
            yield HistoryRecord(
                id=int(row[0]),
                recorded_at=float(row[1]),
                model=str(row[2]),
                fingerprint=str(row[3]),
                features=None if blob is None else np.frombuffer(blob, dtype=np.float32).copy(),
                predicted_tokens=float(row[5]),
                actual_tokens=int(row[6]),
            )
