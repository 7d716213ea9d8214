"""Predictor errors. All are ValueError subclasses so callers can catch bad input broadly."""

from __future__ import annotations


class PredictorError(ValueError):
    """Base of every error the predictor raises for bad input or a bad model folder."""


class PredictorDataError(PredictorError):
    """A length file is empty, unreadable, or a line lacks the required fields."""


class PredictorModelError(PredictorError):
    """A predictor folder is missing, incomplete or of an unknown format version."""
