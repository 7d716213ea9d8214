"""A real coordinator and real fake-backend agents as processes, over loopback ZeroMQ."""

from __future__ import annotations

import asyncio
import time

import pytest

from agents.backends.fake.engine import fake_completion
from orchestrator.client import AsyncClient
from orchestrator.errors import ContextOverflow, InvalidRequest, Unavailable
from orchestrator.local import LocalCluster

pytestmark = pytest.mark.integration

FAST_FAKE = ("--backend", "fake", "--fake-decode-tps", "400", "--fake-prefill-tps", "20000")
DRAIN_NOTICE_S = 5.0
"""How soon after SIGTERM a loaded coordinator must refuse new work."""


def test_fifty_concurrent_requests_complete_once_with_the_right_text(cluster: LocalCluster) -> None:
    cluster.start_agent("fake-1", *FAST_FAKE, "--max-seqs", "8")
    cluster.start_agent("fake-2", *FAST_FAKE, "--max-seqs", "8")
    cluster.wait_for_agents(2)
    prompts = [f"request number {i} says hello" for i in range(50)]

    async def run_all() -> list:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            return await asyncio.gather(
                *(
                    client.generate(p, max_tokens=10 + i % 7, temperature=0.0)
                    for i, p in enumerate(prompts)
                )
            )

    results = asyncio.run(run_all())
    assert len({r.request_id for r in results}) == 50
    for i, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
        assert result.text == fake_completion(prompt, 10 + i % 7)
        assert result.completion_tokens == 10 + i % 7
        assert result.finish_reason == "length"
    assert {r.agent for r in results} == {"fake-1", "fake-2"}
    assert all(r.predicted_tokens is not None and r.predicted_tokens > 0 for r in results)
    with cluster.client() as client:
        status = client.status()
    assert status.completed == 50 and status.failed == 0
    assert not status.queue and not status.running


def test_agent_started_after_requests_were_queued_picks_them_up(cluster: LocalCluster) -> None:
    async def run() -> list:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            pending = [
                asyncio.ensure_future(client.generate(f"late start {i}", max_tokens=5))
                for i in range(6)
            ]
            status = await client.status()
            while len(status.queue) < 6:
                await asyncio.sleep(0.1)
                status = await client.status()
            assert not status.agents and not status.running
            assert all(q.predicted_tokens and q.predicted_tokens > 0 for q in status.queue)
            cluster.start_agent("late", *FAST_FAKE)
            return await asyncio.gather(*pending)

    results = asyncio.run(run())
    assert all(r.agent == "late" and r.completion_tokens == 5 for r in results)


def test_streaming_yields_chunks_in_order(cluster: LocalCluster) -> None:
    cluster.start_agent("fake-1", *FAST_FAKE)
    cluster.wait_for_agents(1)
    with cluster.client() as client:
        stream = client.stream("alpha beta gamma", max_tokens=12)
        chunks = []
        counts = []
        for text in stream:
            chunks.append(text)
            counts.append(stream.tokens)
    assert chunks[0] == " alpha"  # the first token is never held back
    assert "".join(chunks) == fake_completion("alpha beta gamma", 12)
    assert stream.result is not None and stream.result.text == "".join(chunks)
    assert counts[0] == 1 and counts == sorted(counts) and stream.tokens == 12
    assert stream.attempts == 1


def test_stop_strings_end_generation(cluster: LocalCluster) -> None:
    cluster.start_agent("fake-1", *FAST_FAKE)
    cluster.wait_for_agents(1)
    with cluster.client() as client:
        result = client.generate("one two three four", max_tokens=20, stop=["four"])
    assert result.text == " one two three "
    assert result.finish_reason == "stop"


def test_bad_input_gets_typed_errors_naming_the_numbers(cluster: LocalCluster) -> None:
    cluster.start_agent("small", *FAST_FAKE, "--n-ctx", "64")
    cluster.wait_for_agents(1)
    with cluster.client() as client:
        with pytest.raises(InvalidRequest) as empty:
            client.generate("")
        assert empty.value.details["field"] == "prompt"
        with pytest.raises(InvalidRequest) as zero:
            client.generate("hi", max_tokens=0)
        assert zero.value.details["field"] == "max_tokens"
        with pytest.raises(ContextOverflow) as overflow:
            client.generate("word " * 60, max_tokens=10)
        assert overflow.value.details == {"prompt_tokens": 61, "max_tokens": 10, "n_ctx": 64}
        assert not overflow.value.retryable
        # the agent is still serving after the refusals
        assert client.generate("still alive", max_tokens=3).completion_tokens == 3


def test_no_capable_agent_is_a_retryable_unavailable_error(tmp_path) -> None:
    cluster = LocalCluster(tmp_path, "--unavailable-timeout-s", "1.5")
    try:
        cluster.start_agent("fake-1", *FAST_FAKE)
        cluster.wait_for_agents(1)
        started = time.monotonic()
        with cluster.client() as client, pytest.raises(Unavailable) as error:
            client.generate("hi", model="no-such-model")
        assert error.value.retryable
        assert 1.4 <= time.monotonic() - started < 10
    finally:
        cluster.stop()


def test_cancel_stops_a_running_request(cluster: LocalCluster) -> None:
    cluster.start_agent("slow", "--backend", "fake", "--fake-decode-tps", "20")
    cluster.wait_for_agents(1)

    async def run() -> None:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=30) as client:
            stream = await client.generate("cancel me please", max_tokens=1000, stream=True)
            received = []
            async for text in stream:
                received.append(text)
                if len(received) == 3:
                    await stream.cancel()
                    break
            status = await client.status()
            assert not status.running
            assert (await client.generate("next", max_tokens=2)).completion_tokens == 2

    asyncio.run(run())


def test_raw_frames_get_typed_replies_and_garbage_does_not_hurt(cluster: LocalCluster) -> None:
    import msgpack
    import zmq

    from orchestrator.protocol import CLIENT_REPLIES, PROTOCOL_VERSION, ErrorReply, decode

    cluster.start_agent("fake-1", *FAST_FAKE)
    cluster.wait_for_agents(1)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(cluster.clients_endpoint)
    try:
        unknown_field = {
            "v": PROTOCOL_VERSION,
            "type": "submit",
            "request_id": "raw-1",
            "prompt": "hi",
            "colour": "blue",
        }
        socket.send(msgpack.packb(unknown_field))
        reply = decode(socket.recv(), CLIENT_REPLIES)
        assert isinstance(reply, ErrorReply) and reply.request_id == "raw-1"
        assert (reply.error.code, reply.error.details["field"]) == ("invalid_request", "colour")
        wrong_type = {**unknown_field, "request_id": "raw-2", "colour": None}
        del wrong_type["colour"]
        wrong_type["params"] = {"max_tokens": "ten"}
        socket.send(msgpack.packb(wrong_type))
        reply = decode(socket.recv(), CLIENT_REPLIES)
        assert isinstance(reply, ErrorReply)
        assert reply.error.details["field"] == "params.max_tokens" and not reply.error.retryable
        for garbage in (b"", b"\xff\xfe", msgpack.packb([1, 2]), msgpack.packb({"v": 99})):
            socket.send(garbage)
            reply = decode(socket.recv(), CLIENT_REPLIES)
            assert isinstance(reply, ErrorReply) and reply.error.code == "protocol_error"
    finally:
        context.destroy(linger=0)
    with cluster.client() as client:
        assert client.generate("still serving", max_tokens=4).completion_tokens == 4


def test_agents_register_again_after_a_coordinator_restart(cluster: LocalCluster) -> None:
    cluster.start_agent("fake-1", *FAST_FAKE)
    cluster.wait_for_agents(1)
    cluster.kill("coordinator")
    cluster.start_coordinator()
    cluster.wait_for_agents(1, timeout_s=30)
    with cluster.client() as client:
        assert client.generate("after restart", max_tokens=3).completion_tokens == 3


def test_sigterm_drains_an_agent_and_the_coordinator(cluster: LocalCluster) -> None:
    """SIGTERM: in-flight work finishes, new work is refused or goes elsewhere, clean exit."""
    import signal

    slow = ("--backend", "fake", "--fake-decode-tps", "20")
    agent = cluster.start_agent("leaving", *slow)
    cluster.wait_for_agents(1)

    async def run() -> None:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=30) as client:
            running = asyncio.ensure_future(client.generate("finish me", max_tokens=30))
            while not (await client.status()).running:
                await asyncio.sleep(0.05)
            agent.send_signal(signal.SIGTERM)
            while not any(a.draining for a in (await client.status()).agents):
                await asyncio.sleep(0.05)
            cluster.start_agent("staying", *FAST_FAKE)
            later = await client.generate("go elsewhere", max_tokens=3)
            assert later.agent == "staying"
            result = await running
            assert (result.agent, result.completion_tokens, result.attempts) == ("leaving", 30, 1)

    asyncio.run(run())
    assert agent.wait(timeout=10) == 0

    async def drain_coordinator() -> None:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=30) as client:
            running = asyncio.ensure_future(client.generate("last one", max_tokens=200))
            while not (await client.status()).running:
                await asyncio.sleep(0.05)
            cluster.processes["coordinator"].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + DRAIN_NOTICE_S
            while True:  # what reached it before the signal did is still served
                try:
                    await client.generate("too late", max_tokens=3)
                except Unavailable as refused:
                    assert refused.details.get("draining")
                    break
                assert time.monotonic() < deadline, "still accepting work after SIGTERM"
            assert (await running).completion_tokens == 200

    asyncio.run(drain_coordinator())
    assert cluster.processes["coordinator"].wait(timeout=10) == 0


def test_sjf_serves_the_queue_in_predicted_order(tmp_path) -> None:
    cluster = LocalCluster(tmp_path, "--policy", "sjf")
    try:
        cluster.start_agent(
            "serial", "--backend", "fake", "--fake-decode-tps", "100", "--max-seqs", "1"
        )
        cluster.wait_for_agents(1)
        prompts = [
            "Explain how a car engine works.",
            "Answer with yes or no: is water wet?",
            "Write a detailed essay about the history of Rome.",
            "What is 2 + 2?",
        ]

        async def run() -> list:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
                blocker = asyncio.ensure_future(client.generate("blocker", max_tokens=60))
                while not (await client.status()).running:
                    await asyncio.sleep(0.05)
                queued = [asyncio.ensure_future(client.generate(p, max_tokens=5)) for p in prompts]
                await blocker
                return await asyncio.gather(*queued)

        results = asyncio.run(run())
    finally:
        cluster.stop()
    by_start = sorted(results, key=lambda r: r.queue_s)
    predicted = [r.predicted_tokens for r in by_start]
    assert predicted == sorted(predicted), [(r.queue_s, r.predicted_tokens) for r in by_start]


def test_live_replay_hides_each_length_and_stops_the_request_at_it(cluster: LocalCluster) -> None:
    from orchestrator.live_bench import replay

    cluster.start_agent("serial", "--backend", "fake", "--fake-decode-tps", "40", "--max-seqs", "1")
    cluster.wait_for_agents(1)
    lengths = [6, 9, 4]
    seen_max_tokens: set[int] = set()

    async def run() -> list:
        task = asyncio.ensure_future(
            replay(cluster.clients_endpoint, ["a b", "c d", "e f"], [0.0, 0.0, 0.0], lengths, 2000)
        )
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            while not task.done():
                status = await client.status()
                seen_max_tokens.update(r.max_tokens for r in (*status.queue, *status.running))
                await asyncio.sleep(0.005)
        return await task

    outcomes = asyncio.run(run())
    assert seen_max_tokens == {2000}
    assert [o.output_tokens for o in outcomes] == lengths
    # One slot at 40 tokens/s: had a request run to its 2,000-token budget, the ones queued
    # behind it would have waited 50 s.
    assert max(o.finished_s - o.arrival_s for o in outcomes) < 3.0
    with cluster.client() as client:
        status = client.status()
    assert not status.queue and not status.running


def test_live_bench_replays_a_trace_on_real_processes(tmp_path) -> None:
    import json
    import subprocess
    import sys

    trace = tmp_path / "trace.jsonl"
    trace.write_text(
        "".join(
            json.dumps(
                {
                    "arrival_s": i * 0.05,
                    "prompt": f"question {i} about things",
                    "output_tokens": 4 + i % 5,
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    out = tmp_path / "live.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "bench",
            "--trace",
            str(trace),
            "--live",
            "--agents",
            "1",
            "--backend",
            "fake",
            "--policies",
            "fcfs,sjf",
            "--rate",
            "20",
            "--json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "live" and out.with_suffix(".png").is_file()
    for stats in result["policies"].values():
        assert stats["completed"] == 12 and stats["failed"] == 0
        assert 0 < stats["mean_ttft_s"] <= stats["mean_jct_s"]


def test_kill_9_mid_stream_resumes_on_another_agent_without_a_seam(cluster: LocalCluster) -> None:
    victim = cluster.start_agent("victim", "--backend", "fake", "--fake-decode-tps", "40")
    cluster.wait_for_agents(1)
    prompt = "alpha beta gamma delta epsilon"

    async def run() -> tuple[list[str], object]:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            stream = await client.generate(prompt, max_tokens=60, stream=True)
            chunks: list[str] = []
            async for text in stream:
                chunks.append(text)
                if len(chunks) == 5:
                    cluster.start_agent("survivor", *FAST_FAKE)
                    cluster.wait_for_agents(2)
                    cluster.kill("victim")
            return chunks, stream.result

    chunks, result = asyncio.run(run())
    assert victim.returncode is not None
    assert "".join(chunks) == fake_completion(prompt, 60)
    assert result.completion_tokens == 60 and result.attempts == 2 and result.agent == "survivor"


def test_a_kv_bound_agent_runs_what_the_reservations_fit_and_loses_nothing(
    cluster: LocalCluster,
) -> None:
    """300 KV cells, requests of up to 205 (prompt + max_tokens): holding whole budgets, the
    agent would run one at a time. It holds the coordinator's reservations instead, so several
    run; as they grow, the coordinator raises them, lends one's unused cells to another, or
    preempts them (or the agent drops its newest), and every request still ends with exactly
    its text."""
    cluster.start_agent(
        "small-kv", *FAST_FAKE, "--max-seqs", "4", "--n-ctx", "256", "--kv-budget-tokens", "300"
    )
    cluster.wait_for_agents(1)
    prompts = [f"tight cache request {i}" for i in range(8)]
    kv_used_seen: list[int] = []

    async def run() -> list:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            jobs = asyncio.gather(
                *(client.generate(p, max_tokens=200, temperature=0.0) for p in prompts)
            )
            task = asyncio.ensure_future(jobs)
            while not task.done():
                status = await client.status()
                kv_used_seen.extend(a.kv_used_tokens for a in status.agents)
                await asyncio.sleep(0.01)
            return await task

    results = asyncio.run(run())
    for prompt, result in zip(prompts, results, strict=True):
        assert result.text == fake_completion(prompt, 200) and result.completion_tokens == 200
    # Several ran at once: at least two had their first token before any had finished (one
    # at a time, each would wait for the previous 200 tokens). Heartbeats sample KV use too
    # sparsely on a loaded machine to show the overlap, but never beyond the pool.
    first_finish_s = min(r.total_s for r in results)
    assert sum(r.ttft_s < first_finish_s for r in results) >= 2
    assert max(kv_used_seen) <= 300
    with cluster.client() as client:
        status = client.status()
    assert status.completed == 8 and status.failed == 0
    # Reservations lent between the requests reach the agent as frames it understands.
    assert "dropped coordinator frame" not in (cluster.log_dir / "small-kv.log").read_text()
