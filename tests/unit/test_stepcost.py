"""Prompt chunk sizes from measured step costs."""

from __future__ import annotations

import pytest

from agents.backends.llama.stepcost import (
    DECODE_STALL_BOUND_S,
    MIN_PREFILL_CHUNK_TOKENS,
    StepCosts,
)


def test_with_nobody_decoding_a_step_takes_a_whole_batch_of_prompt() -> None:
    assert StepCosts().prefill_chunk(0, 2048) == 2048


def test_while_others_decode_a_step_stays_within_the_stall_bound() -> None:
    costs = StepCosts(prefill_token_s=0.003, decode_step_s=((4, 0.03),))
    chunk = costs.prefill_chunk(4, 2048)
    assert chunk == int((DECODE_STALL_BOUND_S - 0.03) / 0.003)
    assert costs.decode_s(4) + chunk * costs.prefill_token_s <= DECODE_STALL_BOUND_S


def test_a_fast_device_fills_the_batch_and_a_slow_one_still_makes_progress() -> None:
    assert StepCosts(prefill_token_s=1e-5).prefill_chunk(8, 2048) == 2040
    slow = StepCosts(prefill_token_s=0.05, decode_step_s=((16, 0.6),))
    assert slow.prefill_chunk(16, 2048) == MIN_PREFILL_CHUNK_TOKENS


def test_measurements_move_the_estimates() -> None:
    costs = StepCosts(prefill_token_s=0.001)
    costs = costs.observe(4, 0, 0.04)
    assert costs.decode_s(4) == pytest.approx(0.04)
    assert costs.decode_s(8) == pytest.approx(0.08)
    assert costs.decode_s(2) == pytest.approx(0.04)
    for _ in range(50):
        costs = costs.observe(4, 200, 0.04 + 200 * 0.002)
    assert costs.prefill_token_s == pytest.approx(0.002, rel=1e-3)
    assert costs.observe(4, 8, 5.0) == costs  # too few prompt tokens to say anything


def test_a_chosen_bound_and_smallest_chunk_survive_measurements() -> None:
    costs = StepCosts(prefill_token_s=0.003, stall_bound_s=2.0, min_chunk_tokens=32)
    costs = costs.observe(3, 0, 0.06).observe(3, 300, 0.96)
    assert (costs.stall_bound_s, costs.min_chunk_tokens) == (2.0, 32)
    assert costs.prefill_chunk(3, 2048) == int((2.0 - 0.06) / 0.003)
    assert StepCosts(prefill_token_s=0.5, min_chunk_tokens=32).prefill_chunk(3, 2048) == 32
