"""FakeEngine: deterministic text, lengths, stops, admission and its timing model."""

from __future__ import annotations

from typing import NoReturn

import pytest

from agents.base import Completed, Emitted, Rejected, SequenceSpec
from agents.fake import FAKE_CRASH_EXIT_CODE, FakeEngine, FakeTimingModel, fake_completion
from orchestrator.errors import ContextOverflow, Overloaded
from tests.factories import params


def make_engine(**overrides: object) -> tuple[FakeEngine, list[float]]:
    slept: list[float] = []
    fields = {"n_ctx": 64, "max_seqs": 2, "sleep": slept.append}
    fields.update(overrides)
    return FakeEngine(FakeTimingModel(decode_tps=100.0, prefill_tps=1000.0), **fields), slept  # type: ignore[arg-type]


def drain(engine: FakeEngine) -> dict[str, tuple[str, Completed]]:
    texts: dict[str, str] = {}
    done: dict[str, tuple[str, Completed]] = {}
    while engine.has_work():
        for event in engine.step():
            if isinstance(event, Emitted):
                texts[event.key[0]] = texts.get(event.key[0], "") + event.text
            elif isinstance(event, Completed):
                done[event.key[0]] = (texts.get(event.key[0], ""), event)
    return done


def spec(request_id: str, prompt: str = "a b c", **overrides: object) -> SequenceSpec:
    return SequenceSpec(request_id=request_id, attempt=1, prompt=prompt, params=params(**overrides))


def test_generates_the_documented_text_and_length() -> None:
    engine, slept = make_engine()
    engine.add(spec("x", max_tokens=5))
    ((text, completed),) = drain(engine).values()
    assert text == fake_completion("a b c", 5) == " a b c a b"
    assert (completed.completion_tokens, completed.finish_reason, completed.prompt_tokens) == (
        5,
        "length",
        4,
    )
    assert slept[0] == pytest.approx(4 / 1000.0 + 1 / 100.0)


def test_resume_continues_the_same_text() -> None:
    engine, _ = make_engine()
    engine.add(
        SequenceSpec("x", 2, "a b c", params(max_tokens=5), resume_text=" a b", resume_tokens=2)
    )
    ((text, completed),) = drain(engine).values()
    assert text == " c a b" and completed.completion_tokens == 3


def test_admission_refuses_overflow_and_full_slots() -> None:
    engine, _ = make_engine()
    (overflow,) = engine.add(spec("big", "w " * 60, max_tokens=10))
    assert isinstance(overflow, Rejected) and isinstance(overflow.error, ContextOverflow)
    assert overflow.error.details == {"prompt_tokens": 61, "max_tokens": 10, "n_ctx": 64}
    assert engine.add(spec("1")) == [] and engine.add(spec("2")) == []
    (full,) = engine.add(spec("3"))
    assert (
        isinstance(full, Rejected) and isinstance(full.error, Overloaded) and full.error.retryable
    )


def test_cancel_reports_a_cancelled_completion() -> None:
    engine, _ = make_engine()
    engine.add(spec("x", max_tokens=50))
    engine.step()
    (event,) = engine.cancel(("x", 1))
    assert isinstance(event, Completed) and event.finish_reason == "cancelled"
    assert not engine.has_work() and engine.cancel(("x", 1)) == []


def test_batched_decode_is_sublinear() -> None:
    timing = FakeTimingModel(decode_tps=88.0, prefill_tps=1000.0)
    assert timing.decode_step_s(1) == pytest.approx(1 / 88.0)
    assert 8 / timing.decode_step_s(8) == pytest.approx(88.0 * 8**0.35)


def test_crash_marker_ends_the_process_when_its_prompt_is_prefilled() -> None:
    exits: list[int] = []

    def crash(code: int) -> NoReturn:
        exits.append(code)
        raise SystemExit(code)

    engine, _ = make_engine(crash_marker="POISON", crash=crash, n_ctx=512)
    engine.add(spec("innocent", max_tokens=3))
    engine.step()
    assert exits == []
    engine.add(spec("poison", "eat the POISON pill", max_tokens=3))
    with pytest.raises(SystemExit):
        engine.step()
    assert exits == [FAKE_CRASH_EXIT_CODE]
