"""The agent's stream coalescing: first token at once, then one frame per window, in order."""

from __future__ import annotations

from agents.base import Completed, Emitted
from agents.daemon import StreamCoalescer, event_messages
from orchestrator.protocol import RunFinished, TokenChunk

A, B = ("a", 1), ("b", 1)


def done(key: tuple[str, int]) -> Completed:
    return Completed(key, 3, 4, "length", 0.0, 0.0)


def test_first_token_goes_at_once_then_tokens_wait_for_the_window() -> None:
    c = StreamCoalescer(0.04)
    assert c.push([Emitted(A, "x", 1)], now=0.0) == [Emitted(A, "x", 1)]
    assert c.push([Emitted(A, "y", 1)], now=0.01) == []
    assert c.push([Emitted(A, "z", 1)], now=0.02) == []
    assert c.push([Emitted(A, "w", 1)], now=0.05) == [Emitted(A, "yzw", 3)]


def test_completion_flushes_what_is_held_first() -> None:
    c = StreamCoalescer(0.04)
    c.push([Emitted(A, "x", 1), Emitted(B, "p", 1)], now=0.0)
    out = c.push([Emitted(A, "y", 1), Emitted(B, "q", 1), done(A)], now=0.01)
    assert out == [Emitted(A, "y", 1), done(A)]
    assert c.push([done(B)], now=0.02) == [Emitted(B, "q", 1), done(B)]


def test_zero_interval_sends_every_token() -> None:
    c = StreamCoalescer(0.0)
    events = [Emitted(A, "x", 1), Emitted(A, "y", 1)]
    assert c.push(events, now=0.0) == events


def test_forgotten_sequences_lose_what_was_held_and_start_afresh() -> None:
    c = StreamCoalescer(0.04)
    c.push([Emitted(A, "x", 1), Emitted(B, "p", 1)], now=0.0)
    c.push([Emitted(A, "old", 1), Emitted(B, "q", 1)], now=0.01)
    c.forget([A])
    assert c.push([Emitted(A, "new", 1)], now=0.02) == [Emitted(A, "new", 1)]
    assert c.push([done(B)], now=0.03) == [Emitted(B, "q", 1), done(B)]


def test_a_sequences_last_tokens_ride_on_its_end_and_no_other_frames_merge() -> None:
    a_done = RunFinished(
        request_id="a",
        attempt=1,
        prompt_tokens=3,
        completion_tokens=4,
        finish_reason="length",
        prefill_s=0.0,
        decode_s=0.0,
        text="xy",
        n_tokens=2,
        token_ids=(7, 8),
    )
    b_chunk = TokenChunk(request_id="b", attempt=1, text="p", n_tokens=1)
    events = [Emitted(B, "p", 1), Emitted(A, "xy", 2, (7, 8)), done(A), Emitted(B, "p", 1)]
    assert event_messages(events) == [b_chunk, a_done, b_chunk]
    assert event_messages([Emitted(B, "p", 1), done(A)]) == [
        b_chunk,
        a_done.model_copy(update={"text": "", "n_tokens": 0, "token_ids": ()}),
    ]
