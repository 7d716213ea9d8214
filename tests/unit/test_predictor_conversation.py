"""The shift a chat's earlier answers put on its length prediction."""

from __future__ import annotations

import math

import pytest

from orchestrator.predictor.conversation import (
    ANSWERS_READ,
    PRIOR_ANSWERS,
    conversation_shift,
)


def test_no_earlier_answers_leave_the_prediction_alone() -> None:
    assert conversation_shift(5.0, []) == 0.0


def test_one_answer_moves_the_median_by_its_share() -> None:
    level = math.log1p(400)
    share = 1 / (1 + PRIOR_ANSWERS)
    assert conversation_shift(3.0, [400]) == pytest.approx(share * (level - 3.0))


def test_the_latest_answers_weigh_most_and_old_ones_are_not_read() -> None:
    same_answers_in_two_orders = (
        conversation_shift(4.0, [10, 10, 800]),
        conversation_shift(4.0, [800, 10, 10]),
    )
    assert same_answers_in_two_orders[0] > same_answers_in_two_orders[1]
    old = [5] * 50
    assert conversation_shift(4.0, old + [300] * ANSWERS_READ) == conversation_shift(
        4.0, [300] * ANSWERS_READ
    )


def test_more_answers_weigh_more_but_never_replace_the_prompt() -> None:
    target = math.log1p(1000)
    one, many = conversation_shift(2.0, [1000]), conversation_shift(2.0, [1000] * 8)
    assert 0 < one < many < target - 2.0
