"""The reliability promises under failure, on real processes over loopback ZeroMQ: a stalled
(SIGSTOP) agent, a busy one that must not be declared dead, random kill -9 while 300 requests
run, a request that crashes every agent it touches, and 10,000 hostile frames at both sockets.
Answers are checked frame by frame against the fake engine's deterministic text."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from agents.backends.fake.engine import FAKE_CRASH_EXIT_CODE, fake_completion
from orchestrator.chaos import ChaosRequest, Observed, RecordingClient, run_chaos
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster
from orchestrator.protocol import (
    AGENT_COMMANDS,
    Dispatch,
    GenerationParams,
    Heartbeat,
    Register,
    Reregister,
    StatusQuery,
    decode,
    encode,
)
from tests.factories import profile
from tests.mutations import agent_frames, client_frames, encoded, mutate

pytestmark = pytest.mark.integration

HEARTBEAT_INTERVAL_S = 0.5
"""What ``LocalCluster`` runs the coordinator and agents with."""
HEARTBEAT_LIVENESS = 3
LIVENESS_BOUND_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_LIVENESS
SLACK_S = 1.0
"""Scheduling delay allowed on top of the liveness bound on a loaded two-core machine."""
RSS_GROWTH_BOUND_MIB = 32
"""Coordinator RSS growth allowed over 10,000 hostile frames, measured once all the work they
made valid has ended: allocator slack; a leak of 3.4 KB a frame would exceed it."""
SYNC_EVERY = 100
HOSTILE_BURST = 10
MIN_HOSTILE_DISPATCHES = 4
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()  # noqa: SIM905
FAST = ("--backend", "fake", "--fake-decode-tps", "100", "--fake-prefill-tps", "20000")


def greedy(request: ChaosRequest) -> GenerationParams:
    return GenerationParams(max_tokens=request.max_tokens, temperature=0.0)


def expected(observed: Observed) -> str:
    return fake_completion(observed.request.prompt, observed.request.max_tokens)


def seeded_requests(count: int, seed: int, prefix: str) -> list[ChaosRequest]:
    rng = random.Random(seed)
    return [
        ChaosRequest(
            f"{prefix}-{i}",
            f"{prefix} {i} " + " ".join(rng.choices(WORDS, k=rng.randint(2, 8))),
            rng.randint(8, 48),
        )
        for i in range(count)
    ]


@pytest.fixture
def quiet_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A coordinator without the length predictor (less CPU, steadier memory); no agents."""
    local = LocalCluster(tmp_path, "--predictor", "none")
    try:
        yield local
    finally:
        local.stop()


async def _agent_ids(endpoint: str) -> set[str]:
    async with AsyncClient(endpoint, timeout_s=10) as client:
        return {a.agent_id for a in (await client.status()).agents}


def test_sigstopped_agent_is_declared_dead_its_request_moves_and_it_rejoins(
    quiet_cluster: LocalCluster,
) -> None:
    cluster = quiet_cluster
    slow = ("--backend", "fake", "--fake-decode-tps", "40")
    frozen = cluster.start_agent("frozen", *slow)
    cluster.wait_for_agents(1)
    request = ChaosRequest("stalled", "alpha beta gamma delta epsilon", 150)

    async def run() -> tuple[Observed, float, int]:
        async with RecordingClient(cluster.clients_endpoint, greedy) as client:
            observed = client.submit(request)
            assert await client.wait_until(lambda: len(observed.chunks) >= 5, 30)
            cluster.start_agent("healthy", *slow)
            await asyncio.to_thread(cluster.wait_for_agents, 2)
            frozen.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            while "frozen" in await _agent_ids(cluster.clients_endpoint):
                assert time.monotonic() - stopped_at < 30, "the frozen agent was never dropped"
                await asyncio.sleep(0.02)
            declared_dead_s = time.monotonic() - stopped_at
            # The new attempt streams on the healthy agent; then the frozen one wakes up in the
            # middle of it with its own attempt's tokens still coming.
            before = len(observed.chunks)
            assert await client.wait_until(lambda: len(observed.chunks) >= before + 5, 30)
            frozen.send_signal(signal.SIGCONT)
            chunks_at_wake = len(observed.chunks)
            assert await client.wait_until(lambda: observed.done_s is not None, 60)
            woke_at = time.monotonic()
            while "frozen" not in await _agent_ids(cluster.clients_endpoint):
                assert time.monotonic() - woke_at < 30, "the woken agent never registered again"
                await asyncio.sleep(0.05)
            return observed, declared_dead_s, chunks_at_wake

    observed, declared_dead_s, chunks_at_wake = asyncio.run(run())
    assert LIVENESS_BOUND_S - 0.25 <= declared_dead_s <= LIVENESS_BOUND_S + SLACK_S
    assert observed.problems(expected(observed)) == []
    (result,) = observed.results
    assert (result.agent, result.attempts) == ("healthy", 2)
    assert chunks_at_wake < len(observed.chunks)  # the wake-up overlapped the new attempt
    # It rejoins by whichever comes first: the coordinator's Reregister for its late frames, or
    # its own liveness rule (it heard nothing from the coordinator while frozen).
    assert cluster.logs("frozen").count("registered as frozen") >= 2
    # Back in service: with the healthy agent drained away, the woken agent runs new work.
    healthy = cluster.processes["healthy"]
    healthy.send_signal(signal.SIGTERM)
    assert healthy.wait(timeout=15) == 0
    with cluster.client() as client:
        again = client.generate("alpha after the stall", max_tokens=6, temperature=0.0)
    assert (again.agent, again.text) == ("frozen", fake_completion("alpha after the stall", 6))


def test_a_busy_agent_in_a_step_longer_than_the_liveness_bound_is_not_declared_dead(
    quiet_cluster: LocalCluster,
) -> None:
    """The engine's step runs in a worker thread, so heartbeats keep flowing through it."""
    cluster = quiet_cluster
    # 150 prompt tokens at 50 tokens/s: one 3 s prefill step, twice the 1.5 s bound.
    cluster.start_agent("busy", "--backend", "fake", "--fake-prefill-tps", "50")
    cluster.wait_for_agents(1)
    prompt = " ".join(f"w{i}" for i in range(149))
    with cluster.client() as client:
        result = client.generate(prompt, max_tokens=3, temperature=0.0)
    assert (result.agent, result.attempts, result.text) == ("busy", 1, fake_completion(prompt, 3))
    assert result.ttft_s >= 150 / 50
    log = (cluster.log_dir / "coordinator.log").read_text(errors="replace")
    assert "declared dead" not in log


def test_300_requests_survive_agents_killed_every_2_s(tmp_path: Path) -> None:
    # Random kills are not the requests' fault, so the poison guard (attempt limit) is lifted
    # here; test_poison_request_* covers it.
    cluster = LocalCluster(tmp_path, "--predictor", "none", "--max-attempts", "1000")
    agent_args = (*FAST, "--max-seqs", "4")
    names = [f"chaos-{i}" for i in range(4)]
    try:
        for name in names:
            cluster.start_agent(name, *agent_args)
        cluster.wait_for_agents(len(names))
        report = asyncio.run(
            run_chaos(
                cluster,
                seeded_requests(300, seed=6, prefix="chaos"),
                params=greedy,
                rate_per_s=10.0,
                timeout_s=180.0,
                agents=names,
                restart=lambda name: cluster.start_agent(name, *agent_args),
                kill_interval_s=2.0,
                seed=6,
            )
        )
    finally:
        cluster.stop()
    problems = [p for o in report.observed.values() for p in o.problems(expected(o))]
    assert report.finished and problems == [], problems[:20]
    assert len(report.observed) == 300
    assert len(report.kills) >= 10
    log = (tmp_path / "coordinator.log").read_text(errors="replace")
    moved = log.count(": agent died")
    assert moved >= 5  # the kills hit live work, which moved to other agents


def test_poison_request_fails_with_agent_failure_after_the_attempt_limit(
    quiet_cluster: LocalCluster,
) -> None:
    cluster = quiet_cluster
    marker = "POISON-PILL"
    # Slow decoding keeps innocent requests running beside the poison when it kills a host.
    agent_args = ("--backend", "fake", "--fake-decode-tps", "25", "--max-seqs", "8")
    agent_args += ("--fake-crash-marker", marker)
    names = ["host-1", "host-2", "host-3"]
    for name in names:
        cluster.start_agent(name, *agent_args)
    cluster.wait_for_agents(len(names))
    crashes: list[tuple[str, int | None]] = []

    async def supervise(stop: asyncio.Event) -> None:
        while not stop.is_set():
            for name in names:
                code = cluster.processes[name].poll()
                if code is not None:
                    crashes.append((name, code))
                    cluster.start_agent(name, *agent_args)
            await asyncio.sleep(0.05)

    async def run() -> tuple[Observed, list[Observed]]:
        stop = asyncio.Event()
        supervisor = asyncio.get_running_loop().create_task(supervise(stop))
        try:
            async with RecordingClient(cluster.clients_endpoint, greedy) as client:
                poison = client.submit(ChaosRequest("poison", f"please eat the {marker}", 10))
                innocents = []
                for request in seeded_requests(30, seed=3, prefix="innocent"):
                    innocents.append(client.submit(request))
                    await asyncio.sleep(0.15)
                assert await client.wait_until(lambda: client.pending() == 0, 90)
                return poison, innocents
        finally:
            stop.set()
            await supervisor

    poison, innocents = asyncio.run(run())
    assert not poison.results and not poison.chunks
    (error,) = poison.errors
    assert error.code == "agent_failure" and not error.retryable
    assert (error.details["attempts"], error.details["limit"]) == (3, 3)
    assert crashes and all(code == FAKE_CRASH_EXIT_CODE for _, code in crashes)
    assert len(crashes) == 3  # one death per attempt, then no more looping
    problems = [p for o in innocents for p in o.problems(expected(o))]
    assert problems == []
    with cluster.client() as client:
        status = client.status()
    assert (status.failed, status.completed) == (1, 30)


def _drain_replies(socket: zmq.Socket[bytes]) -> int:
    received = 0
    while True:
        try:
            socket.recv_multipart(zmq.NOBLOCK)
            received += 1
        except zmq.Again:
            return received


def _fuzz_socket(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, routing_id: bytes | None = None
) -> zmq.Socket[bytes]:
    """``routing_id``: set for a socket that registers (the coordinator ignores a Register on a
    routing id ZeroMQ assigned)."""
    socket = context.socket(zmq.DEALER)
    if routing_id is not None:
        socket.setsockopt(zmq.ROUTING_ID, routing_id)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.connect(endpoint)
    return socket


def _spray(
    socket: zmq.Socket[bytes],
    seeds: list[bytes],
    rng: random.Random,
    count: int,
    sync: zmq.Socket[bytes],
) -> None:
    """Send ``count`` mutated frames; every ``SYNC_EVERY`` frames wait for a status round trip
    on ``sync``, so the coordinator's backlog (and so its peak memory) stays bounded and what
    is measured is what it keeps, not what is still queued."""
    for i in range(count):
        socket.send_multipart(mutate(rng.choice(seeds), rng, allow_oversized=i % 1000 == 999))
        if i % SYNC_EVERY == SYNC_EVERY - 1:
            sync.send(encode(StatusQuery(query_id=f"sync-{i}")))
            assert sync.poll(30_000), "the coordinator stopped answering"
            sync.recv()
            _drain_replies(socket)


def _hostile_agent(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, rng: random.Random, count: int
) -> int:
    """Register as an agent, then answer every Dispatch with mutated chunks, finishes and
    failures about that very attempt (the frames that reach the request table). Returns the
    number of dispatches it got."""
    seeds = encoded(agent_frames()[1:5])  # no goodbye: it wants to stay registered
    register = encode(Register(name="hostile", profile=profile(max_seqs=8, decode_tps=1e4)))
    heartbeat = encode(Heartbeat(kv_used_tokens=0))
    socket = _fuzz_socket(context, endpoint, routing_id=b"hostile:1")
    socket.send(register)
    dispatches = 0
    sent = 0
    deadline = time.monotonic() + 60
    while (sent < count or dispatches < MIN_HOSTILE_DISPATCHES) and time.monotonic() < deadline:
        if socket.poll(5):
            message = decode(socket.recv(), AGENT_COMMANDS)
            if isinstance(message, Reregister):
                socket.send(register)
            elif isinstance(message, Dispatch):
                dispatches += 1
                frames = encoded(agent_frames(message.request_id, message.attempt)[1:5])
                for _ in range(20):
                    socket.send_multipart(mutate(rng.choice(frames), rng, allow_oversized=False))
                socket.send(frames[3])  # a valid RunFailed whose details carry a "message"
                sent += 21
        else:
            for _ in range(HOSTILE_BURST):
                # Oversized frames would cut its connection (the sprays above send those).
                socket.send_multipart(mutate(rng.choice(seeds), rng, allow_oversized=False))
            # A mutation may have been a valid draining heartbeat: undo it to keep getting work.
            socket.send(heartbeat)
            sent += HOSTILE_BURST + 1
    socket.close()
    return dispatches


def _wait_until_only_honest_and_idle(cluster: LocalCluster, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with cluster.client() as client:
        while True:
            status = client.status()
            agents = {a.agent_id for a in status.agents}
            if agents == {"honest"} and not status.queue and not status.running:
                return
            assert time.monotonic() < deadline, status
            time.sleep(0.2)


def test_10000_hostile_frames_at_both_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Results are forgotten at once, so whatever the fuzz made valid (prompts of up to 1 MB)
    # is not retained and memory growth measures leaks, not result_retention_s. A fixed glibc
    # mmap threshold returns freed large buffers to the system, so RSS shows live memory rather
    # than the allocator's high-water mark from the megabyte frames.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    cluster = LocalCluster(tmp_path, "--predictor", "none", "--result-retention-s", "0")
    try:
        _fuzz(cluster)
    finally:
        cluster.stop()


def _fuzz(cluster: LocalCluster) -> None:
    cluster.start_agent("honest", *FAST, "--max-seqs", "8")
    cluster.wait_for_agents(1)
    coordinator = psutil.Process(cluster.processes["coordinator"].pid)
    rng = random.Random(10_000)
    client_seeds = encoded([m for i in range(4) for m in client_frames(f"fuzz-{i}")])
    agent_seeds = encoded(agent_frames())
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def serve_valid(tag: str) -> None:
        with cluster.client() as client:
            for i in range(5):
                prompt = f"{tag} request {i} still served"
                result = client.generate(prompt, max_tokens=5 + i, temperature=0.0)
                assert result.text == fake_completion(prompt, 5 + i)

    try:
        # Warm up every path once so the baseline includes imports and caches.
        serve_valid("warm-up")
        sync = _fuzz_socket(context, cluster.clients_endpoint)
        for endpoint, seeds in (
            (cluster.clients_endpoint, client_seeds),
            (cluster.agents_endpoint, agent_seeds),
        ):
            warm = _fuzz_socket(context, endpoint)
            _spray(warm, seeds, rng, 1000, sync)
            warm.close()
        _wait_until_only_honest_and_idle(cluster)
        rss_before = coordinator.memory_info().rss

        clients = _fuzz_socket(context, cluster.clients_endpoint)
        _spray(clients, client_seeds, rng, 5000, sync)
        agents = _fuzz_socket(context, cluster.agents_endpoint)
        _spray(agents, agent_seeds, rng, 3000, sync)
        agents.close()

        async def with_traffic() -> int:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=120) as client:
                traffic = [
                    asyncio.ensure_future(client.generate(f"during {i}", max_tokens=20))
                    for i in range(32)
                ]
                dispatches = await asyncio.to_thread(
                    _hostile_agent, context, cluster.agents_endpoint, rng, 2000
                )
                await asyncio.gather(*traffic, return_exceptions=True)
                return dispatches

        dispatches = asyncio.run(with_traffic())
        replies = _drain_replies(clients)
        clients.close()
        assert cluster.processes["coordinator"].poll() is None, cluster.logs("coordinator")
        # The hostile agent's frames reached real requests' current attempts.
        assert dispatches >= MIN_HOSTILE_DISPATCHES
        assert replies > 0
        # Every phantom agent the fuzz registered expires and every request the fuzz made
        # valid ends (nothing stuck); then the honest agent serves as before.
        _wait_until_only_honest_and_idle(cluster)
        serve_valid("after")
        rss_after = coordinator.memory_info().rss
    finally:
        context.destroy(linger=0)
    growth_mib = (rss_after - rss_before) / 2**20
    print(f"coordinator RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert growth_mib < RSS_GROWTH_BOUND_MIB, f"coordinator RSS grew {growth_mib:.1f} MiB"


def test_a_killed_predictor_worker_costs_only_predictions_and_a_fresh_one_takes_over(
    tmp_path: Path,
) -> None:
    cluster = LocalCluster(tmp_path, "--predictor", "shipped")
    try:
        cluster.start_agent("fast", "--backend", "fake", "--fake-decode-tps", "2000")
        cluster.wait_for_agents(1)
        coordinator = psutil.Process(cluster.processes["coordinator"].pid)

        def predictor_worker() -> psutil.Process:
            (found,) = [
                p
                for p in coordinator.children()
                if p.is_running() and "resource_tracker" not in " ".join(p.cmdline())
            ]
            return found

        worker = predictor_worker()

        async def run() -> tuple[list[float | None], list[float | None]]:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:

                async def predicted(n: int) -> list[float | None]:
                    results = await asyncio.gather(
                        *(client.generate(f"Say hi {i}.", max_tokens=4) for i in range(n))
                    )
                    assert all(r.completion_tokens == 4 for r in results)
                    return [r.predicted_tokens for r in results]

                await predicted(4)
                worker.kill()
                during = await predicted(40)
                after = await predicted(8)
                return during, after

        during, after = asyncio.run(run())
        fresh = predictor_worker()
    finally:
        cluster.stop()
    assert None in during  # the batch the dead worker held ran without predictions
    assert all(p is not None and p > 0 for p in after)  # and a fresh worker predicts again
    assert fresh.pid != worker.pid
