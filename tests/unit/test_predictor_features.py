"""Feature extraction: deterministic, bounded, and reading the cues it claims to read."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.predictor.features import (
    CLS_ID,
    FEATURE_NAMES,
    MAX_ENCODER_TOKENS,
    N_CUE_FEATURES,
    SEP_ID,
    PromptTokenizer,
    cue_feature_matrix,
    cue_features,
)
from orchestrator.predictor.model import TOKENIZER_FILE, shipped_model_dir


def feature(prompt: str, name: str) -> float:
    return float(cue_features(prompt)[FEATURE_NAMES.index(name)])


@pytest.fixture(scope="module")
def tokenizer() -> PromptTokenizer:
    return PromptTokenizer(shipped_model_dir() / TOKENIZER_FILE)


def test_cue_vector_shape_and_determinism() -> None:
    prompt = "Write a 500-word essay about the ocean."
    first = cue_features(prompt)
    assert first.shape == (N_CUE_FEATURES,)
    assert first.dtype == np.float32
    assert np.array_equal(first, cue_features(prompt))
    assert np.isfinite(first).all()


def test_requested_counts_are_read() -> None:
    assert feature(
        "Write a 500-word essay about dogs.", "requested_word_count_log"
    ) == pytest.approx(np.log1p(500), rel=1e-6)
    assert feature("List 10 ideas for a party.", "has_requested_count") == 1.0
    assert feature("Write three paragraphs on rain.", "requested_log_tokens") > feature(
        "Write three sentences on rain.", "requested_log_tokens"
    )
    assert feature("Tell me about rain.", "has_requested_count") == 0.0


@pytest.mark.parametrize(
    ("prompt", "cue"),
    [
        ("Answer yes or no: is water wet?", "cue_yes_no"),
        ("Describe Paris in one word.", "cue_one_word"),
        ("Translate this into French: hello", "cue_translate"),
        ("Write a python function that sorts a list.", "cue_code"),
        ("Explain in detail how vaccines work.", "cue_detail"),
        ("Hi there", "cue_chitchat"),
    ],
)
def test_task_cues(prompt: str, cue: str) -> None:
    assert feature(prompt, cue) == 1.0


def test_matrix_matches_rows_and_handles_empty() -> None:
    prompts = ["a", "List 3 fruits.", "x" * 50_000]
    matrix = cue_feature_matrix(prompts)
    assert matrix.shape == (3, N_CUE_FEATURES)
    for row, prompt in zip(matrix, prompts, strict=True):
        assert np.array_equal(row, cue_features(prompt))
    assert cue_feature_matrix([]).shape == (0, N_CUE_FEATURES)


def test_tokenizer_head_tail_truncation(tokenizer: PromptTokenizer) -> None:
    short = tokenizer.ids("hello world")
    assert short[0] == CLS_ID and short[-1] == SEP_ID and len(short) == 4
    long_prompt = "start " + "filler " * 2000 + "please summarize the above"
    ids = tokenizer.ids(long_prompt)
    assert len(ids) == MAX_ENCODER_TOKENS
    assert ids == tokenizer.ids(long_prompt)
    assert ids[-2] == tokenizer.ids("above")[1], "the prompt's tail must survive truncation"


def test_tokenizer_batch_padding(tokenizer: PromptTokenizer) -> None:
    batch = tokenizer.batch(["hi", "a much longer prompt with several words"])
    assert batch.input_ids.shape == batch.attention_mask.shape
    assert batch.input_ids.dtype == np.int64
    assert batch.attention_mask[0].sum() == 3
    assert batch.attention_mask[1].all()
