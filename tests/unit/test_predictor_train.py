"""The recipe's data handling (runs without the train extra: torch is only imported to embed)."""

from __future__ import annotations

import math

import pytest

from orchestrator.predictor.data import LengthRecord
from orchestrator.predictor.errors import PredictorDataError
from orchestrator.predictor.train import group_records, weighted_records


def test_target_is_the_mean_log_length_over_the_answering_models() -> None:
    records = [
        LengthRecord("Explain tides.", 9, "vicuna80", "a"),
        LengthRecord("Explain tides.", 99, "vicuna80", "b"),
        LengthRecord("Explain tides.", 40, "alpaca_en_demo", "c"),
    ]
    data = group_records(records)
    by_source = dict(zip(data.sources, data.log_tokens, strict=True))
    assert by_source["vicuna80"] == pytest.approx((math.log(10) + math.log(100)) / 2)
    assert by_source["alpaca_en_demo"] == pytest.approx(math.log(41))


def test_non_commercial_sources_train_only_measurement_models() -> None:
    records = [LengthRecord("Name a colour.", 3, "alpaca_eval", "gpt4")]
    with pytest.raises(PredictorDataError, match="CC BY-NC"):
        group_records(records)
    assert group_records(records, measurement_only=True).prompts == ["Name a colour."]


def test_zero_weight_sources_are_dropped_and_unknown_ones_kept() -> None:
    records = [
        LengthRecord("Write a loop.", 30, "gpteacher-codegen"),
        LengthRecord("Hi", 5, "my-logs"),
    ]
    assert [r.source for r in weighted_records(records)] == ["my-logs"]
