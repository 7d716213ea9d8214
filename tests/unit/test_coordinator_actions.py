"""The coordinator carries out the core's new actions: a preemption becomes cancel + requeue
(the next attempt resumes after the streamed tokens), a raise updates the reservation."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.base import kv_overflow_error
from orchestrator.coordinator import (
    AGENT_REFUSAL_BACKOFF_S,
    MAX_CHUNK_CHARS_PER_TOKEN,
    AgentSession,
    Coordinator,
)
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.lifecycle import RequestState
from orchestrator.errors import Overloaded
from orchestrator.protocol import (
    AgentId,
    CancelRequest,
    CancelRun,
    Dispatch,
    ErrorInfo,
    ErrorReply,
    Register,
    RequestId,
    RunFailed,
    Submit,
    TokenChunk,
    WireModel,
)
from orchestrator.settings import CoordinatorSettings
from tests.factories import params, profile, record


def coordinator(policy: str) -> tuple[Coordinator, list[WireModel]]:
    sent: list[WireModel] = []
    c = Coordinator(CoordinatorSettings(policy=policy, placement="predicted"))
    c._agents[b"id-a1"] = AgentSession(
        agent_id=AgentId("a1"),
        identity=b"id-a1",
        name="a1",
        profile=profile(max_seqs=1, kv_budget_tokens=8000, n_ctx=4096, decode_tps=20.0),
        last_seen_s=0.0,
    )

    def send(identity: bytes, message: WireModel) -> None:
        sent.append(message)

    c._send_agent = send  # type: ignore[method-assign]
    return c, sent


def _long_running(c: Coordinator, **overrides: Any) -> None:
    fields: dict[str, Any] = {
        "params": params(max_tokens=2000),
        "estimate": LengthEstimate.exact(2000),
        "prompt_tokens": 20,
        **overrides,
    }
    long = record("long", **fields)
    c.table.add(long)
    c.table.dispatch(RequestId("long"), AgentId("a1"), 2100, now=0.0)
    c.table.add_tokens(RequestId("long"), " one two", 2, now=0.5)


def test_preemption_cancels_requeues_and_dispatches_the_waiter() -> None:
    c, sent = coordinator("srtf")
    _long_running(c)
    c.table.add(
        record(
            "short",
            params=params(max_tokens=2000),
            estimate=LengthEstimate.exact(5),
            arrival_s=1.0,
        )
    )
    c.schedule(now=1.0)
    assert isinstance(sent[0], CancelRun) and (sent[0].request_id, sent[0].attempt) == ("long", 1)
    assert isinstance(sent[1], Dispatch) and sent[1].request_id == "short"
    long = c.table[RequestId("long")]
    assert (long.state, long.attempt, long.preemptions) == (RequestState.QUEUED, 2, 1)
    assert long.text == " one two" and long.generated_tokens == 2  # resumed after these
    assert c.table.preemptions == 1


def test_fcfs_never_preempts() -> None:
    c, sent = coordinator("fcfs")
    _long_running(c)
    c.table.add(record("short", params=params(max_tokens=2000), arrival_s=1.0))
    c.schedule(now=1.0)
    assert sent == []


def test_raise_updates_the_reservation() -> None:
    c, sent = coordinator("sjf")
    _long_running(c, estimate=LengthEstimate.of(100.0, {0.5: 100.0, 0.9: 400.0}))
    c.table.reserve(RequestId("long"), 30)  # 20 prompt + 2 generated: within the trigger
    c.schedule(now=1.0)
    assert sent == []
    assert c.table[RequestId("long")].kv_reservation_tokens > 30


def test_an_agent_death_is_charged_only_to_attempts_that_made_no_progress() -> None:
    c = Coordinator(CoordinatorSettings(max_attempts=1))
    for rid in ("streaming", "silent"):
        c.table.add(record(rid))
        c.table.dispatch(RequestId(rid), AgentId("a1"), 40, now=0.0)
    c.table.add_tokens(RequestId("streaming"), " one", 1, now=0.5)
    c._requeue_agent_work(AgentId("a1"), now=1.0, reason="agent died")
    streaming, silent = c.table[RequestId("streaming")], c.table[RequestId("silent")]
    assert (streaming.state, streaming.attempt, streaming.agent_failures) == (
        RequestState.QUEUED,
        2,
        0,
    )
    assert silent.state is RequestState.FAILED
    assert silent.error is not None and silent.error.code == "agent_failure"


def test_chunks_beyond_the_token_budget_or_text_bound_are_dropped() -> None:
    c, _ = coordinator("fcfs")
    session = c._agents[b"id-a1"]
    c.table.add(record("r1", params=params(max_tokens=3)))
    c.table.dispatch(RequestId("r1"), AgentId("a1"), 40, now=0.0)

    def chunk(text: str, n_tokens: int) -> None:
        c._on_chunk(
            session,
            TokenChunk(request_id="r1", attempt=1, text=text, n_tokens=n_tokens),
            now=1.0,
        )

    chunk(" a b", 2)
    chunk(" c d", 2)  # 4 tokens of a 3-token budget
    chunk("y" * (2 * MAX_CHUNK_CHARS_PER_TOKEN + 1), 1)  # no token is that long
    chunk(" c", 1)
    r1 = c.table[RequestId("r1")]
    assert (r1.text, r1.generated_tokens) == (" a b c", 3)


def test_a_cancel_while_the_request_is_being_predicted_cancels_it_once_admitted() -> None:
    class HeldPredictions:
        """Predictions that return only when released (a slow predictor)."""

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def predict(self, prompt: str, model: str | None) -> None:
            await self.release.wait()

    async def scenario() -> tuple[Coordinator, list[WireModel]]:
        predictions = HeldPredictions()
        c = Coordinator(CoordinatorSettings(), predictions=predictions)  # type: ignore[arg-type]
        replies: list[WireModel] = []
        client = c.connect_local(replies.append)
        c.send_local(client, Submit(request_id="r1", prompt="hello", params=params()))
        await asyncio.sleep(0)
        c.send_local(client, CancelRequest(request_id="r1"))
        predictions.release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        return c, replies

    c, replies = asyncio.run(scenario())
    assert c.table[RequestId("r1")].state is RequestState.CANCELLED
    assert [type(r).__name__ for r in replies] == ["Accepted", "ErrorReply"]
    assert isinstance(replies[1], ErrorReply) and replies[1].error.code == "cancelled"


def test_an_agent_that_refuses_a_dispatch_is_not_offered_work_again_at_once() -> None:
    c, sent = coordinator("fcfs")
    session = c._agents[b"id-a1"]
    c.table.add(record("r", params=params(max_tokens=3000), estimate=LengthEstimate.exact(100)))
    c.schedule(now=0.0)
    assert isinstance(sent[-1], Dispatch) and sent[-1].request_id == "r"
    refusal = Overloaded("needs 3020 KV cells, 1000 free", needed_tokens=3020, free_tokens=1000)
    c._on_failed(session, RunFailed(request_id="r", attempt=1, error=ErrorInfo.of(refusal)), 0.1)
    assert c.table[RequestId("r")].state is RequestState.QUEUED
    c.schedule(now=0.2)
    assert len([m for m in sent if isinstance(m, Dispatch)]) == 1
    c.schedule(now=0.1 + AGENT_REFUSAL_BACKOFF_S)
    assert [m.request_id for m in sent if isinstance(m, Dispatch)] == ["r", "r"]


def test_a_dispatch_carries_the_reservation_and_a_kv_overflow_counts_as_a_preemption() -> None:
    c, sent = coordinator("fcfs")
    session = c._agents[b"id-a1"]
    c.table.add(record("r", params=params(max_tokens=3000), estimate=LengthEstimate.exact(100)))
    c.schedule(now=0.0)
    dispatch = sent[-1]
    reserved = c.table[RequestId("r")].kv_reservation_tokens
    assert isinstance(dispatch, Dispatch) and dispatch.kv_reservation_tokens == reserved
    assert reserved < 3000  # not the whole budget: the agent holds what the core reserved
    c.table.add_tokens(RequestId("r"), " one two", 2, now=0.5)
    overflow = kv_overflow_error(in_use_tokens=8000, step_tokens=1, budget_tokens=8000)
    c._on_failed(session, RunFailed(request_id="r", attempt=1, error=ErrorInfo.of(overflow)), 0.6)
    r = c.table[RequestId("r")]
    assert (r.state, r.attempt, r.kv_preemptions, r.generated_tokens) == (
        RequestState.QUEUED,
        2,
        1,
        2,
    )
    assert c.table.kv_preemptions == 1


def test_live_placement_uses_each_agents_measured_speed() -> None:
    """Two agents alike but for their measured prefill rate: a long prompt goes to the one that
    prefills it 20x faster (a guessed, shared default rate would tie them, and the tie goes to
    the first by name)."""
    c = Coordinator(CoordinatorSettings(policy="srtf", placement="predicted"))
    sent: list[tuple[bytes, WireModel]] = []
    c._send_agent = lambda identity, message: sent.append((identity, message))  # type: ignore[method-assign]
    curve = ((1, 50.0), (4, 120.0))
    for name, prefill in (("a-slow", 200.0), ("b-fast", 4000.0)):
        measured = profile(decode_tps=50.0, decode_curve=curve, prefill_tps=prefill)
        c._on_register(name.encode(), Register(name=name, profile=measured), now=0.0)
    c.table.add(
        record(
            "doc",
            prompt_tokens=3000,
            params=params(max_tokens=20),
            estimate=LengthEstimate.exact(10),
        )
    )
    c.schedule(now=1.0)
    dispatched = [(identity, m) for identity, m in sent if isinstance(m, Dispatch)]
    assert [identity for identity, _ in dispatched] == [b"b-fast"]
