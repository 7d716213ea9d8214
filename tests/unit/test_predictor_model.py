"""Loading the shipped model, error paths, and the public prediction API."""

from __future__ import annotations

import json
import subprocess
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


def test_runtime_does_not_import_training_libraries() -> None:
    """In a fresh interpreter: other tests of this session may have imported them."""
    check = (
        "import sys\n"
        "from orchestrator.predictor import LengthPredictor\n"
        "LengthPredictor.load().predict('hello', earlier_answers=[40])\n"
        "assert 'torch' not in sys.modules and 'sklearn' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


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


def test_earlier_answers_pull_a_chat_prediction_towards_their_length(
    predictor: LengthPredictor,
) -> None:
    question = "And what about the next one?"
    alone = predictor.predict(question).quantile(0.5)
    after_long = predictor.predict(question, earlier_answers=[900, 1200]).quantile(0.5)
    after_short = predictor.predict(question, earlier_answers=[900, 3]).quantile(0.5)
    assert after_long > alone and after_short < after_long
    assert after_long < 1200  # shifted towards the answers, not replaced by them
    batch, _ = predictor.predict_with_features([question, question], None, [[], [900, 1200]])
    assert batch[0].quantiles == predictor.predict(question).quantiles
    assert batch[1].quantiles == predictor.predict(question, earlier_answers=[900, 1200]).quantiles
