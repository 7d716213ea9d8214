"""The shipped ONNX model reproduces the training-time (torch fp32) model on stored fixtures.

Runs onnxruntime only. The shipped encoder's MatMuls are int8 (dynamic quantisation), so
embeddings match the fp32 torch model to cosine ~0.99 and the predicted log-median to a
tolerance; token ids and cue features match exactly, and the ranking is preserved.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.predictor.features import cue_feature_matrix
from orchestrator.predictor.model import LengthPredictor

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "predictor_parity.json"
#: Tolerated |log1p(median) difference| from int8 quantisation (about +-25% in tokens; the
#: quantisation error measured on the fixture is at most 0.18).
LOG_MEDIAN_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def fixture() -> dict:
    with open(FIXTURE, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def predictor() -> LengthPredictor:
    return LengthPredictor.load()


def test_token_ids_match(fixture: dict, predictor: LengthPredictor) -> None:
    tokenizer = predictor._tokenizer
    for prompt, ids in zip(fixture["prompts"], fixture["ids"], strict=True):
        assert tokenizer.ids(prompt) == ids


def test_cue_features_match(fixture: dict) -> None:
    np.testing.assert_allclose(cue_feature_matrix(fixture["prompts"]), fixture["cues"], atol=1e-5)


def test_onnx_outputs_match_training_model(fixture: dict, predictor: LengthPredictor) -> None:
    raw = predictor.raw_outputs(fixture["prompts"], with_memory=False)
    median = raw.log_grid.shape[1] // 2
    np.testing.assert_allclose(
        raw.log_grid[:, median], fixture["log_median"], atol=LOG_MEDIAN_TOLERANCE
    )
    head = np.asarray(fixture["embedding_head"])
    assert np.abs(raw.embeddings[:, : head.shape[1]] - head).max() < 0.05
    assert np.corrcoef(raw.log_grid[:, median], fixture["log_median"])[0, 1] > 0.98


def test_batch_and_single_agree(fixture: dict, predictor: LengthPredictor) -> None:
    # The encoder runs prompt by prompt, so batching never changes a prediction.
    prompts = fixture["prompts"]
    batch = predictor.predict_batch(prompts)
    for prompt, pred in zip(prompts, batch, strict=True):
        single = predictor.predict(prompt)
        assert single.quantiles[0.5] == pytest.approx(pred.quantiles[0.5], rel=1e-6)
