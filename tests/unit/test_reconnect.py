"""Parts of reconnecting without sockets: the agent's backoff, the SDK's stream
de-duplication, the coordinator's pings."""

from __future__ import annotations

import asyncio
import random

import pytest

from agents import daemon
from agents.backends.fake.engine import FakeEngine, FakeTimingModel
from agents.daemon import RECONNECT_INITIAL_S, RECONNECT_MAX_S, AgentDaemon, Backoff
from orchestrator.client import AsyncClient, Stream
from orchestrator.coordinator import Coordinator
from orchestrator.protocol import (
    Accepted,
    AgentId,
    ClientReply,
    Ping,
    Result,
    StreamChunk,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings
from tests.factories import profile


def test_backoff_doubles_from_the_initial_delay_to_the_cap_with_bounded_jitter() -> None:
    backoff = Backoff(random.Random(7))
    delays = [backoff.next() for _ in range(10)]
    ceilings = [min(RECONNECT_MAX_S, RECONNECT_INITIAL_S * 2**k) for k in range(10)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    growing = delays[:6]  # ceilings 0.1 .. 3.2 s: [c/2, c] intervals of doubling c
    assert growing == sorted(growing)
    assert len({round(d, 9) for d in delays[-4:]}) == 4  # jittered, not lockstep
    backoff.reset()
    assert backoff.next() <= RECONNECT_INITIAL_S


def test_backoff_is_reproducible_from_its_seed() -> None:
    first = Backoff(random.Random(3))
    second = Backoff(random.Random(3))
    assert [first.next() for _ in range(6)] == [second.next() for _ in range(6)]


def test_unanswered_registrations_move_to_a_fresh_routing_id(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator whose ROUTER drops the agent's routing id (libzmq #2892) hears it again
    under a new one after ``REGISTER_FRESH_ID_AFTER`` attempts; until then the id is kept, so a
    plain reconnect still takes its session back."""
    engine = FakeEngine(
        FakeTimingModel(decode_tps=100.0, prefill_tps=1000.0), n_ctx=512, max_seqs=2
    )
    agent = AgentDaemon(
        engine, profile(), endpoint="tcp://127.0.0.1:1", name="a1", heartbeat_interval_s=1.0
    )
    dropped = agent._identity
    sent: list[bytes] = []

    def send(_message: object) -> None:
        sent.append(agent._identity)
        if agent._identity != dropped:
            agent._welcomed.set()

    monkeypatch.setattr(agent, "_open", lambda: None)
    monkeypatch.setattr(agent, "_send", send)
    monkeypatch.setattr(daemon, "REGISTER_TIMEOUT_S", 0.001)
    monkeypatch.setattr(daemon, "Backoff", lambda rng: Backoff(rng, initial_s=0.001, max_s=0.001))
    asyncio.run(agent._register())
    after = daemon.REGISTER_FRESH_ID_AFTER
    assert sent[:after] == [dropped] * after
    assert len(sent) == after + 1 and sent[-1] != dropped and sent[-1].startswith(b"a1:")


def chunk(offset: int, text: str, index: int = 0) -> StreamChunk:
    return StreamChunk(request_id="r", index=index, text=text, offset=offset)


def result(text: str) -> Result:
    return Result(
        request_id="r",
        text=text,
        prompt_tokens=1,
        completion_tokens=len(text.split()),
        finish_reason="length",
        queue_s=0.0,
        ttft_s=0.0,
        total_s=0.0,
        agent="a",
        attempts=2,
    )


def collect(*replies: ClientReply) -> tuple[list[str], Stream]:
    async def run() -> tuple[list[str], Stream]:
        client = AsyncClient("tcp://127.0.0.1:1")
        inbox: asyncio.Queue[ClientReply] = asyncio.Queue()
        for reply in replies:
            inbox.put_nowait(reply)
        accepted = Accepted(request_id="r", queue_position=0, prompt_tokens=1)
        stream = Stream(client, "r", accepted, inbox, timeout_s=5.0)
        return [text async for text in stream], stream

    return asyncio.run(run())


def test_a_re_attached_stream_yields_each_character_once() -> None:
    texts, stream = collect(
        chunk(0, " one"),
        chunk(4, " two", 1),
        Accepted(request_id="r", queue_position=0, prompt_tokens=1),  # the re-send's answer
        chunk(0, " one two thr"),  # the re-attach resends the text so far
        chunk(12, "ee four"),
        chunk(4, " two", 2),  # a late duplicate
        result(" one two three four five"),
    )
    assert texts == [" one", " two", " thr", "ee four", " five"]
    assert "".join(texts) == " one two three four five"
    assert stream.result is not None and stream.result.text == "".join(texts)


def test_the_coordinator_pings_only_agents_it_has_sent_nothing_for_an_interval() -> None:
    now = [10.0]
    sent: list[tuple[bytes, object]] = []
    coordinator = Coordinator(
        CoordinatorSettings(heartbeat_interval_s=1.0),
        clock=lambda: now[0],
        agent_sink=lambda identity, message: sent.append((identity, message)),
    )
    for name, last_sent in (("quiet", 8.9), ("recent", 9.5)):
        coordinator.add_agent(
            AgentSession(
                agent_id=AgentId(name),
                identity=name.encode(),
                name=name,
                profile=profile(),
                last_seen_s=10.0,
                last_sent_s=last_sent,
            ),
            now=0.0,
        )
    coordinator.tick(now[0])
    assert [identity for identity, _ in sent] == [b"quiet"]
    quiet = next(s for s in coordinator.agent_sessions() if s.identity == b"quiet")
    assert quiet.last_sent_s == 10.0  # the ping itself counts
    now[0] = 10.6
    coordinator.tick(now[0])
    assert [identity for identity, _ in sent] == [b"quiet", b"recent"]
    assert all(isinstance(message, Ping) for _, message in sent)
