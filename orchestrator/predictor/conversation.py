"""What a chat's earlier answers say about the length of its next one.

Why: in a conversation the assistant's earlier answers predict the next answer's length far
better than the new user message does (a coding chat stays long, a small-talk chat short).
On later turns of real chats, Kendall tau of the shipped model on the user message alone is
0.27 (ShareGPT) and 0.20 (WildChat); the earlier answers' lengths alone reach 0.46 and 0.47,
both together 0.48 and 0.47 (docs/PREDICTOR_RESULTS.md, "Real chat traffic").

The prediction's log-length distribution is shifted towards the recency-weighted mean log
length of the earlier answers, by a weight that grows with how many there are:
``n_eff / (n_eff + PRIOR_ANSWERS)``. The prediction stays a distribution of the same shape,
so the scheduler's quantiles and `remaining()` work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np

#: How many earlier answers the prompt's own prediction is worth. Chosen on permissive data
#: (answer lengths estimated from words): MT-bench's second turns, 32 models (prompt-only tau
#: 0.29; 0.25: 0.535, 0.5: 0.531, 1: 0.502, 2: 0.453) and Open-Assistant conversations (flat
#: within 0.01).
PRIOR_ANSWERS: Final = 0.5
#: Weight of an answer relative to the one after it. 0.5 ranked later turns of ShareGPT and
#: WildChat chats best (0.462 / 0.489 against 0.439 / 0.441 for a plain mean, lengths from
#: words); those are measurement sets, so this one choice was not blind.
RECENCY_DECAY: Final = 0.5
#: Earlier answers read; older ones weigh under 0.5**8 of the last and change nothing.
ANSWERS_READ: Final = 8


def earlier_answers_level(earlier_answer_tokens: Sequence[int]) -> tuple[float, float]:
    """The recency-weighted mean log1p length of the last ANSWERS_READ answers, and how many
    equally weighted answers that weighting is worth (Kish's effective sample size)."""
    answers = list(earlier_answer_tokens)[-ANSWERS_READ:]
    if not answers:
        return 0.0, 0.0
    logs = np.log1p(np.asarray(answers, dtype=np.float64))
    weights = RECENCY_DECAY ** np.arange(len(logs))[::-1]
    level = float(np.dot(weights, logs) / weights.sum())
    return level, float(weights.sum() ** 2 / np.square(weights).sum())


def conversation_shift(log_median: float, earlier_answer_tokens: Sequence[int]) -> float:
    """How far to move a prediction's log1p-token grid given the chat's earlier answers
    (oldest first, in the served model's tokens); 0 without any."""
    level, effective = earlier_answers_level(earlier_answer_tokens)
    if effective == 0.0:
        return 0.0
    return effective / (effective + PRIOR_ANSWERS) * (level - log_median)
