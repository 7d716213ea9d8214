"""FakeEngine: deterministic text, lengths, stops, admission and its timing model."""

from __future__ import annotations

from typing import NoReturn

import pytest

from agents.backends.fake.engine import (
    FAKE_CRASH_EXIT_CODE,
    FakeEngine,
    FakeTimingModel,
    fake_completion,
)
from agents.base import Completed, Emitted, KvLoad, Rejected, SequenceSpec, kv_evictions
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


def reserved_spec(request_id: str, reservation: int | None, max_tokens: int) -> SequenceSpec:
    return SequenceSpec(
        request_id=request_id,
        attempt=1,
        prompt="a b c",
        params=params(max_tokens=max_tokens),
        kv_reservation_tokens=reservation,
    )


def test_the_claim_is_the_coordinators_reservation_within_prompt_and_whole_budget() -> None:
    assert reserved_spec("x", None, 50).kv_claim_tokens(4) == 54
    assert reserved_spec("x", 20, 50).kv_claim_tokens(4) == 20
    assert reserved_spec("x", 2, 50).kv_claim_tokens(4) == 5  # the prompt and one token
    assert reserved_spec("x", 500, 50).kv_claim_tokens(4) == 54


def test_a_lowered_claim_frees_the_lent_cells_for_admission_but_never_cells_in_use() -> None:
    engine, _ = make_engine(n_ctx=64, max_seqs=2, kv_budget_tokens=64)
    assert engine.add(reserved_spec("a", 40, 40)) == []
    (refused,) = engine.add(reserved_spec("b", 30, 40))  # 30 > 64 - 40
    assert isinstance(refused, Rejected) and isinstance(refused.error, Overloaded)
    engine.lower_claim(("a", 1), 20)
    engine.lower_claim(("unknown", 1), 1)
    assert engine.kv_reserved_tokens() == 20
    engine.lower_claim(("a", 1), 2)  # under its 4 prompt cells: it keeps those and one more
    assert engine.kv_reserved_tokens() == 5
    assert engine.add(reserved_spec("b", 30, 40)) == []


def test_evictions_take_the_newest_until_the_step_fits() -> None:
    loads = [KvLoad(("old", 1), 50, 1), KvLoad(("mid", 1), 30, 1), KvLoad(("new", 1), 10, 0)]
    assert kv_evictions(loads, 100) == []
    assert kv_evictions(loads, 91) == [("new", 1)]  # 90 + 2 > 91; without "new", 80 + 2 fits
    assert kv_evictions(loads, 60) == [("new", 1), ("mid", 1)]
    assert kv_evictions(loads, 10) == [("new", 1), ("mid", 1), ("old", 1)]


def test_reservations_admit_what_whole_budgets_would_refuse_and_overflow_preempts_the_newest() -> (
    None
):
    engine, _ = make_engine(n_ctx=64, max_seqs=3, kv_budget_tokens=64)
    assert engine.add(reserved_spec("a", 20, 40)) == []
    (refused,) = engine.add(reserved_spec("whole", None, 41))  # 4 + 41 > 64 - 20
    assert isinstance(refused, Rejected) and isinstance(refused.error, Overloaded)
    assert refused.error.details == {"needed_tokens": 45, "free_tokens": 44}
    assert engine.add(reserved_spec("b", 20, 40)) == []
    assert engine.add(reserved_spec("c", 20, 40)) == []
    ended: dict[str, Completed | Rejected] = {}
    while engine.has_work():
        ended |= {e.key[0]: e for e in engine.step() if isinstance(e, Completed | Rejected)}
        assert engine.kv_used_tokens() <= 64
    a, b, c = ended["a"], ended["b"], ended["c"]
    assert isinstance(a, Completed) and a.completion_tokens == 40  # 4 + 40 fits alone
    for preempted in (b, c):
        assert isinstance(preempted, Rejected) and preempted.error.retryable
        assert preempted.error.details["kv_overflow"] is True


def test_a_prompt_sharing_a_parked_prefix_prefills_only_the_rest() -> None:
    engine, slept = make_engine(n_ctx=256)
    history = " ".join(f"w{i}" for i in range(20))
    engine.add(spec("a", history, max_tokens=3))
    drain(engine)
    assert engine.cache_stats().parked_tokens == 21 + 3
    slept.clear()
    engine.add(spec("b", f"{history} w0 w1 w2 nine ten", max_tokens=1))
    drain(engine)
    stats = engine.cache_stats()
    assert (stats.hits, stats.reused_tokens) == (1, 24)
    assert slept[0] == pytest.approx(2 / 1000.0 + 1 / 100.0)
    assert stats.computed_tokens == 21 + 2


def test_cache_prompt_false_neither_reuses_nor_parks() -> None:
    engine, _ = make_engine(n_ctx=256)
    for request_id in ("a", "b"):
        engine.add(spec(request_id, "same " * 30, max_tokens=2, cache_prompt=False))
        drain(engine)
    stats = engine.cache_stats()
    assert (stats.hits, stats.parked_tokens, stats.computed_tokens) == (0, 0, 62)


def test_achieved_speed_reports_the_steps_it_ran() -> None:
    engine, _ = make_engine()
    assert engine.achieved_speed().decode_curve == ()
    assert engine.achieved_speed().prefill_tps is None
    engine.add(spec("a", max_tokens=4))
    engine.add(spec("b", max_tokens=4))
    drain(engine)
    achieved = engine.achieved_speed()
    assert achieved.prefill_tps == pytest.approx(1000.0)
    assert dict(achieved.decode_curve)[2] == pytest.approx(2 / engine.timing.decode_step_s(2))
