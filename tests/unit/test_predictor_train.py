"""The recipe's data handling (runs without the train extra: torch is only imported to embed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.predictor.data import LengthRecord
from orchestrator.predictor.errors import PredictorDataError
from orchestrator.predictor.finetune import standardise_columns
from orchestrator.predictor.train import fit_head, group_records, weighted_records


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


def test_each_answering_model_gets_its_own_auxiliary_column() -> None:
    records = [
        LengthRecord("Explain tides.", 9, "vicuna80", "a"),
        LengthRecord("Explain tides.", 99, "vicuna80", "b"),
        LengthRecord("Name a colour.", 2, "vicuna80", "b"),
    ]
    data = group_records(records)
    assert data.answerers == ["vicuna80/a", "vicuna80/b"]
    tides = data.prompts.index("Explain tides.")
    colour = data.prompts.index("Name a colour.")
    assert data.answer_log_tokens[tides] == pytest.approx([math.log(10), math.log(100)])
    assert math.isnan(data.answer_log_tokens[colour, 0])
    assert data.answer_log_tokens[colour, 1] == pytest.approx(math.log(3))


def test_the_fine_tuning_target_is_standardised_within_each_source() -> None:
    records = [
        LengthRecord("Short one.", 3, "vicuna80", "a"),
        LengthRecord("Long one.", 300, "vicuna80", "a"),
        LengthRecord("Short two.", 30, "alpaca_en_demo", "c"),
        LengthRecord("Long two.", 3000, "alpaca_en_demo", "c"),
    ]
    data = group_records(records)
    target = dict(zip(data.prompts, data.standardised_target(), strict=True))
    assert target["Short one."] == pytest.approx(target["Short two."]) == pytest.approx(-1.0)
    assert target["Long one."] == pytest.approx(target["Long two."]) == pytest.approx(1.0)


def test_standardise_columns_ignores_and_keeps_missing_answers() -> None:
    values = np.array([[1.0, np.nan], [3.0, 5.0], [5.0, 7.0]])
    out = standardise_columns(values)
    assert np.isnan(out[0, 1])
    assert np.nanmean(out, axis=0) == pytest.approx([0.0, 0.0])
    assert np.nanstd(out, axis=0) == pytest.approx([1.0, 1.0])


def test_the_head_takes_its_penalty_and_spread_from_the_frozen_embeddings() -> None:
    rng = np.random.default_rng(0)
    prompts = [f"Prompt number {i}." for i in range(60)]
    records = [LengthRecord(p, int(rng.integers(1, 500)), "vicuna80", "a") for p in prompts]
    data = group_records(records)
    frozen = rng.normal(size=(60, 8))
    cues = np.zeros((60, 2))
    plain, plain_stats = fit_head(frozen, cues, data, seed=0, verbose=False)
    memorised = frozen.copy()
    memorised[:, 0] = data.log_tokens  # a fine-tuned encoder that has seen every target
    tuned, tuned_stats = fit_head(
        frozen, cues, data, seed=0, verbose=False, final_embeddings=memorised
    )
    assert tuned_stats == plain_stats
    assert np.array_equal(tuned.offsets, plain.offsets)
    assert not np.allclose(tuned.w_emb, plain.w_emb)
