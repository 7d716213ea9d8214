"""How many prompt tokens a batch step may carry, from the device's measured step costs.

A llama.cpp step that carries d decoding sequences and p prompt tokens takes about
``decode_s(d) + p * prefill_token_s`` once p is large enough; below that, mixing costs extra.
Measured on the 2-core development machine with the default model (docs/BENCHMARKS.md,
"Step costs and the prefill rule"): 4 decode rows with 64 prompt tokens took 396 ms against
64 + 256 ms apart, 8 rows with 64 tokens 593 against 101 + 256 ms, while from 256 tokens up a
mixed step costs about its parts. Small chunks keep running streams fast
but leave the prompt crawling at half the device's prefill rate; whole prompts do the opposite.
The rule: while others decode, a step carries at least ``MIN_PREFILL_CHUNK_TOKENS`` and
otherwise as many prompt tokens as keep it within ``DECODE_STALL_BOUND_S``, so each running
stream still gets a token about that often while the prompt runs near the device's prefill
throughput; with nobody decoding, a step takes as many prompt tokens as one batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final

DECODE_STALL_BOUND_S: Final = 3.0
"""Longest a step carrying prompt tokens may take while other sequences decode (beyond the
smallest chunk). An offline replay of 40 prompt-heavy requests (benchmarks/prefill_replay.py)
spent 104-125 s in steps with 1 s and 256 tokens against 132-140 s with 0.5 s and 64, and with a
KV stream per sequence 107-116 s with 3 s and 768 against 117-132 s with 1 s and 256."""
MIN_PREFILL_CHUNK_TOKENS: Final = 768
"""Smallest prompt chunk beside decode rows: below 256 a mixed step costs up to 100 ms more than
its decode rows and prompt tokens apart (see above), and the prompt runs at half the device's
prefill throughput; with a stream per sequence, chunks of 768 ran prompts at 2.4-2.6 ms a token
against 2.8-3.0 ms with 256."""
DEFAULT_PREFILL_TOKEN_S: Final = 1 / 700
"""Until the first steps are measured: the default model on 2 CPU threads."""
DEFAULT_DECODE_ROW_S: Final = 0.022
COST_SMOOTHING: Final = 0.2
"""Weight of each new measurement in the running estimates (exponential moving average)."""
MIN_MEASURED_PREFILL_TOKENS: Final = 32
"""Steps with fewer prompt tokens say too little about the per-token cost to update it."""


@dataclass(frozen=True, slots=True)
class StepCosts:
    """Seconds per prompt token, and seconds of a decode-only step at each batch size seen."""

    prefill_token_s: float = DEFAULT_PREFILL_TOKEN_S
    decode_step_s: tuple[tuple[int, float], ...] = ()
    """(decode rows, seconds) for steps without prompt tokens, ascending by rows."""
    stall_bound_s: float = DECODE_STALL_BOUND_S
    min_chunk_tokens: int = MIN_PREFILL_CHUNK_TOKENS
    prefill_measured: bool = False
    """Whether ``prefill_token_s`` comes from steps yet (else it is the default)."""

    def decode_s(self, rows: int) -> float:
        """A decode-only step's time for ``rows`` sequences: the nearest measured batch size,
        scaled linearly beyond the measured ones (a row never costs more than measured)."""
        if rows <= 0:
            return 0.0
        if not self.decode_step_s:
            return DEFAULT_DECODE_ROW_S * rows
        nearest = min(self.decode_step_s, key=lambda point: abs(point[0] - rows))
        measured_rows, seconds = nearest
        return seconds if measured_rows >= rows else seconds * rows / measured_rows

    def observe(self, decode_rows: int, prefill_tokens: int, seconds: float) -> StepCosts:
        """The estimates after one step of ``decode_rows`` and ``prefill_tokens`` took
        ``seconds``."""
        if prefill_tokens == 0 and decode_rows > 0:
            points = dict(self.decode_step_s)
            old = points.get(decode_rows)
            points[decode_rows] = seconds if old is None else _smooth(old, seconds)
            return replace(self, decode_step_s=tuple(sorted(points.items())))
        if prefill_tokens >= MIN_MEASURED_PREFILL_TOKENS:
            per_token = max(0.0, seconds - self.decode_s(decode_rows)) / prefill_tokens
            if per_token > 0:
                smoothed = _smooth(self.prefill_token_s, per_token)
                return replace(self, prefill_token_s=smoothed, prefill_measured=True)
        return self

    def prefill_chunk(self, decode_rows: int, batch_tokens: int) -> int:
        """Prompt tokens the next step may carry beside ``decode_rows`` decoding sequences."""
        room = batch_tokens - decode_rows
        if decode_rows == 0:
            return room
        spare_s = self.stall_bound_s - self.decode_s(decode_rows)
        chunk = int(spare_s / self.prefill_token_s) if spare_s > 0 else 0
        return max(0, min(room, max(self.min_chunk_tokens, chunk)))


def _smooth(old: float, new: float) -> float:
    return (1 - COST_SMOOTHING) * old + COST_SMOOTHING * new
