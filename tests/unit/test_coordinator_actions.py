"""The coordinator's shell carries out the driver's effects as frames: a preemption becomes a
CancelRun and a Dispatch of the waiter, a dispatch carries the core's reservation, a lent one
becomes a Reserve, an agent's refusal frame requeues. (What the driver decides is tested in
test_driver.py.)"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from agents.base import AchievedSpeed, kv_overflow_error
from agents.daemon import heartbeat_speed
from orchestrator.coordinator import Coordinator
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.lifecycle import RequestState
from orchestrator.protocol import (
    AgentId,
    CancelRequest,
    CancelRun,
    Dispatch,
    ErrorInfo,
    ErrorReply,
    Heartbeat,
    MeasuredSpeed,
    Register,
    RequestId,
    Reserve,
    Result,
    RunFailed,
    RunFinished,
    Submit,
    TokenChunk,
    WireModel,
    encode,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings
from tests.factories import params, profile, record


def coordinator(
    policy: str, max_seqs: int = 1, kv_budget_tokens: int = 8000
) -> tuple[Coordinator, list[WireModel]]:
    sent: list[WireModel] = []
    c = Coordinator(
        CoordinatorSettings(policy=policy, placement="predicted"),
        agent_sink=lambda identity, message: sent.append(message),
    )
    c.add_agent(
        AgentSession(
            agent_id=AgentId("a1"),
            identity=b"id-a1",
            name="a1",
            profile=profile(
                max_seqs=max_seqs, kv_budget_tokens=kv_budget_tokens, n_ctx=4096, decode_tps=20.0
            ),
            last_seen_s=0.0,
        ),
        now=0.0,
    )
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


def test_a_cancel_while_the_request_is_being_predicted_cancels_it_once_admitted() -> None:
    class HeldPredictions:
        """Predictions that return only when released (a slow predictor)."""

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def predict_or_none(
            self, request_id: str, prompt: str, model: str | None, conversation: object
        ) -> None:
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


def test_a_dispatch_carries_the_reservation_and_a_kv_overflow_counts_as_a_preemption() -> None:
    c, sent = coordinator("fcfs")
    c.table.add(record("r", params=params(max_tokens=3000), estimate=LengthEstimate.exact(100)))
    c.schedule(now=0.0)
    dispatch = sent[-1]
    reserved = c.table[RequestId("r")].kv_reservation_tokens
    assert isinstance(dispatch, Dispatch) and dispatch.kv_reservation_tokens == reserved
    assert reserved < 3000  # not the whole budget: the agent holds what the core reserved
    c.table.add_tokens(RequestId("r"), " one two", 2, now=0.5)
    overflow = kv_overflow_error(in_use_tokens=8000, step_tokens=1, budget_tokens=8000)
    failed = RunFailed(request_id="r", attempt=1, error=ErrorInfo.of(overflow))
    c.on_agent_frame(b"id-a1", encode(failed), None)
    r = c.table[RequestId("r")]
    assert (r.state, r.attempt, r.kv_preemptions, r.generated_tokens) == (
        RequestState.QUEUED,
        2,
        1,
        2,
    )
    assert c.table.kv_preemptions == 1


def test_cells_lent_to_a_neighbour_are_told_to_the_lenders_agent_and_a_raise_is_not() -> None:
    c, sent = coordinator("fcfs", max_seqs=2, kv_budget_tokens=400)
    guess = LengthEstimate.of(100.0, {0.5: 100.0, 0.9: 400.0})
    for name in ("grow", "roomy"):
        c.table.add(record(name, params=params(max_tokens=300), estimate=guess, prompt_tokens=20))
    c.schedule(now=0.0)
    for name in ("grow", "roomy"):
        c.table.add_tokens(RequestId(name), " one two", 2, now=0.5)
    c.table.reserve(RequestId("grow"), 30)
    c.table.reserve(RequestId("roomy"), 370)
    sent.clear()
    c.schedule(now=1.0)
    assert sent == [Reserve(request_id="roomy", attempt=1, kv_reservation_tokens=338)]
    assert c.table[RequestId("grow")].kv_reservation_tokens == 62


def test_live_placement_uses_each_agents_measured_speed() -> None:
    """Two agents alike but for their measured prefill rate: a long prompt goes to the one that
    prefills it 20x faster (a guessed, shared default rate would tie them, and the tie goes to
    the first by name)."""
    sent: list[tuple[bytes, WireModel]] = []
    c = Coordinator(
        CoordinatorSettings(policy="srtf", placement="predicted"),
        agent_sink=lambda identity, message: sent.append((identity, message)),
    )
    curve = ((1, 50.0), (4, 120.0))
    for name, prefill in (("a-slow", 200.0), ("b-fast", 4000.0)):
        measured = profile(decode_tps=50.0, decode_curve=curve, prefill_tps=prefill)
        c.on_agent_frame(name.encode(), encode(Register(name=name, profile=measured)), None)
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


def test_a_heartbeat_refreshes_the_agents_speed_from_what_it_achieved() -> None:
    c, _ = coordinator("fcfs")
    before = c.driver.views()[0].speed
    achieved = MeasuredSpeed(decode_curve=((1, 7.0),), prefill_tps=300.0)
    c.on_agent_frame(b"id-a1", encode(Heartbeat(kv_used_tokens=0, speed=achieved)), None)
    after = c.driver.views()[0].speed
    assert after is not None and after != before
    assert dict(after.decode_points)[1] == 7.0 and after.prefill_tps == 300.0


def test_the_heartbeat_carries_only_finite_positive_speeds() -> None:
    assert heartbeat_speed(AchievedSpeed()) is None
    measured = heartbeat_speed(AchievedSpeed(((1, 20.0), (2, math.inf), (0, 5.0)), math.nan))
    assert measured == MeasuredSpeed(decode_curve=((1, 20.0),), prefill_tps=None)


def test_an_end_that_carries_the_last_tokens_counts_them_before_it_ends() -> None:
    async def scenario() -> list[WireModel]:
        c, _ = coordinator("fcfs")
        replies: list[WireModel] = []
        client = c.connect_local(replies.append)
        c.send_local(client, Submit(request_id="r", prompt="hello", params=params()))
        c.schedule(now=0.0)
        first = TokenChunk(request_id="r", attempt=1, text="one", n_tokens=1)
        c.on_agent_frame(b"id-a1", encode(first), None)
        end = RunFinished(
            request_id="r",
            attempt=1,
            prompt_tokens=2,
            completion_tokens=3,
            finish_reason="stop",
            prefill_s=0.0,
            decode_s=0.0,
            text=" two three",
            n_tokens=2,
            token_ids=(5, 6),
        )
        c.on_agent_frame(b"id-a1", encode(end), None)
        for _ in range(5):
            await asyncio.sleep(0)
        return replies

    result = asyncio.run(scenario())[-1]
    assert isinstance(result, Result)
    assert (result.text, result.completion_tokens) == ("one two three", 3)
