"""Loading the shipped model, error paths, and the public prediction API."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.predictor import (
    LengthPredictor,
    PredictorModelError,
    shipped_model_dir,
)
from orchestrator.predictor.model import ADAPTATION_FILE, METADATA_FILE


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


def test_shipped_model_is_found_and_small() -> None:
    folder = shipped_model_dir()
    assert (folder / METADATA_FILE).is_file()
    total = sum(f.stat().st_size for f in folder.iterdir())
    assert total <= 50 * 1024 * 1024


def test_runtime_does_not_import_training_libraries(predictor: LengthPredictor) -> None:
    predictor.predict("hello")
    assert "torch" not in sys.modules and "sklearn" not in sys.modules


def test_predictions_are_deterministic_and_ordered(predictor: LengthPredictor) -> None:
    short = "What is the capital of France? Answer in one word."
    long = "Write a detailed 1500-word essay on the history of the Roman Empire."
    first, again = predictor.predict(short), predictor.predict(short)
    assert first.quantiles == again.quantiles
    assert first.quantiles[0.5] < predictor.predict(long).quantiles[0.5]
    assert first.quantiles[0.5] <= first.quantiles[0.9]
    assert first.expected_tokens > 0
    remaining = predictor.predict(long).remaining(100)
    assert remaining.quantiles[0.5] > 0


def test_bad_inputs(predictor: LengthPredictor, tmp_path: Path) -> None:
    assert predictor.predict_batch([]) == []
    with pytest.raises(TypeError):
        predictor.predict_batch("not a list")  # type: ignore[arg-type]
    with pytest.raises(PredictorModelError):
        LengthPredictor.load(tmp_path / "missing")
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(PredictorModelError, match="format_version"):
        LengthPredictor.load(tmp_path)
    bad = tmp_path / "adapted"
    bad.mkdir()
    (bad / ADAPTATION_FILE).write_text(
        json.dumps({"base": None, "calibrations": {"m": {"slope": 1}}})
    )
    with pytest.raises(PredictorModelError, match="calibration"):
        LengthPredictor.load(bad)


def test_parallel_batches_equal_sequential_ones() -> None:
    """Prompts run side by side on several threads give exactly the one-thread predictions."""
    from orchestrator.predictor import LengthPredictor

    prompts = [f"Explain topic number {i} in some detail." for i in range(12)]
    sequential = LengthPredictor.load(threads=1).predict_batch(prompts)
    parallel = LengthPredictor.load(threads=2).predict_batch(prompts)
    assert [p.quantiles for p in parallel] == [p.quantiles for p in sequential]
