"""Crashes of the coordinator on real processes over loopback: the journal brings accepted work
back, the SDK re-attaches, agents notice a silent coordinator and reconnect with backoff."""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from agents.backends.fake.engine import fake_completion
from orchestrator.client import AsyncClient, GenerationResult
from orchestrator.errors import Unavailable
from orchestrator.journal import JOURNAL_FILE
from orchestrator.local import LocalCluster

pytestmark = pytest.mark.integration

SLOW_FAKE = ("--backend", "fake", "--fake-decode-tps", "20", "--max-seqs", "2")
REQUESTS = 30
LOG_WAIT_S = 30.0


def max_tokens(i: int) -> int:
    return 8 + i % 5


async def wait_for_log(
    cluster: LocalCluster, name: str, pattern: str, count: int, after: str = ""
) -> list[str]:
    """The first ``count`` matches of ``pattern`` in a process's log after the first line
    containing ``after``, polling until they exist."""
    deadline = asyncio.get_running_loop().time() + LOG_WAIT_S
    while True:
        text = (cluster.log_dir / f"{name}.log").read_text(errors="replace")
        found = re.findall(pattern, text[text.find(after) :]) if after in text else []
        if len(found) >= count:
            return found[:count]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{count} x {pattern!r} not in {name}'s log:\n{cluster.all_logs()}")
        await asyncio.sleep(0.05)


def test_kill_9_of_the_coordinator_loses_no_accepted_request_and_answers_each_once(
    cluster: LocalCluster,
) -> None:
    cluster.start_agent("slow-1", *SLOW_FAKE)
    cluster.start_agent("slow-2", *SLOW_FAKE)
    cluster.wait_for_agents(2)
    prompts = [f"durable request {i} of thirty" for i in range(REQUESTS)]

    async def run() -> tuple[list[tuple[str, GenerationResult]], int, int, int]:
        # Re-sends on silence only after 60 s: recovery must come from the reconnect itself.
        async with AsyncClient(
            cluster.clients_endpoint, timeout_s=120, resubmit_after_s=60.0
        ) as client:

            async def one(i: int) -> tuple[str, GenerationResult]:
                options = {"max_tokens": max_tokens(i), "temperature": 0.0}
                if i % 3 == 0:
                    stream = await client.generate(prompts[i], stream=True, **options)
                    streamed = "".join([text async for text in stream])
                    assert stream.result is not None
                    return streamed, stream.result
                result = await client.generate(prompts[i], **options)
                return result.text, result

            tasks = [asyncio.ensure_future(one(i)) for i in range(REQUESTS)]
            status = await client.status()
            while not (status.completed >= 2 and status.running and len(status.queue) >= 5):
                await asyncio.sleep(0.05)
                status = await client.status()
            cluster.kill("coordinator")
            answered_before = sum(task.done() for task in tasks)
            cluster.start_coordinator()
            results = await asyncio.gather(*tasks)
            completed = (await client.status()).completed
            return results, completed, answered_before, client.resubmits

    results, completed_after_restart, answered_before, resubmits = asyncio.run(run())
    assert answered_before < REQUESTS
    assert len({result.request_id for _, result in results}) == REQUESTS
    for i, (text, result) in enumerate(results):
        expected = fake_completion(prompts[i], max_tokens(i))
        assert (text, result.text, result.completion_tokens) == (expected, expected, max_tokens(i))
    assert any(result.attempts >= 2 for _, result in results)  # some were running at the kill
    replayed = re.findall(
        r"(\d+) unfinished requests requeued, (\d+) ended", cluster.logs("coordinator")
    )
    requeued, ended = (int(n) for n in replayed[-1])
    assert requeued + ended == REQUESTS and requeued >= 5 and ended >= 2
    # No result leaves before its journal write, so the client held no answer to a requeued
    # request and re-sent each on reconnect (``answered_before`` may miss results that were
    # still in the client's socket at the kill, so it gives no exact bound).
    assert resubmits >= requeued
    # each requeued request ran to its end once after the restart, and no ended one ran again
    assert completed_after_restart == requeued
    journal = sqlite3.connect(Path(cluster.log_dir) / "state" / JOURNAL_FILE)
    assert dict(journal.execute("SELECT state, count(*) FROM requests GROUP BY state")) == {
        "finished": REQUESTS
    }


def test_an_agent_reconnects_with_backoff_when_the_coordinator_goes_silent(
    cluster: LocalCluster,
) -> None:
    """SIGSTOP keeps the coordinator's TCP connections open, so only the two-way heartbeat can
    tell the agent that it is gone."""
    cluster.start_agent("fake-1", "--backend", "fake", "--fake-decode-tps", "20")
    cluster.wait_for_agents(1)
    coordinator = cluster.processes["coordinator"]
    retry = r"attempt (\d+)\): retrying in ([0-9.]+) s"

    async def run() -> tuple[GenerationResult, list[tuple[str, str]]]:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
            pending = asyncio.ensure_future(
                client.generate("keep going please", max_tokens=100, temperature=0.0)
            )
            while not (await client.status()).running:
                await asyncio.sleep(0.05)
            # Longer than liveness x interval (1.5 s) with nothing for the agent to receive but
            # the coordinator's pings: a live coordinator is never taken for a lost one.
            await asyncio.sleep(2.0)
            assert "no frame from the coordinator" not in cluster.logs("fake-1")
            coordinator.send_signal(signal.SIGSTOP)
            try:
                lost = "no frame from the coordinator"
                await wait_for_log(cluster, "fake-1", lost, 1)
                retries = await wait_for_log(cluster, "fake-1", retry, 3, after=lost)
            finally:
                coordinator.send_signal(signal.SIGCONT)
            return await pending, retries

    result, retries = asyncio.run(run())
    delays = [float(delay) for _, delay in retries]
    assert [int(n) for n, _ in retries] == [1, 2, 3]
    for k, delay in enumerate(delays):  # 0.1 s doubling, jittered down by at most half
        assert 0.1 * 2**k * 0.5 <= delay <= 0.1 * 2**k + 0.001
    assert result.text == fake_completion("keep going please", 100)
    assert (result.agent, result.completion_tokens) == ("fake-1", 100) and result.attempts >= 2
    with cluster.client() as client:
        status = client.status()
        assert [a.agent_id for a in status.agents] == ["fake-1"]  # took its session back
        assert client.generate("after the stall", max_tokens=3).completion_tokens == 3


def test_without_a_journal_the_sdk_resubmits_and_requests_run_again(tmp_path: Path) -> None:
    """``--journal off``: the restarted coordinator knows nothing, but a client that is still
    waiting re-sends its requests on reconnect, so they run again from the start."""
    cluster = LocalCluster(tmp_path, "--journal", "off")
    try:
        cluster.start_agent("slow-1", *SLOW_FAKE)
        cluster.wait_for_agents(1)

        async def run() -> list[GenerationResult]:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=60) as client:
                tasks = [
                    asyncio.ensure_future(client.generate(f"no journal {i}", max_tokens=20))
                    for i in range(4)
                ]
                while not (await client.status()).running:
                    await asyncio.sleep(0.05)
                cluster.kill("coordinator")
                cluster.start_coordinator()
                return await asyncio.gather(*tasks)

        results = asyncio.run(run())
    finally:
        cluster.stop()
    assert [r.text for r in results] == [fake_completion(f"no journal {i}", 20) for i in range(4)]
    assert all(r.attempts == 1 for r in results)  # new requests to the new coordinator
    assert not (tmp_path / "state" / JOURNAL_FILE).exists()


def test_the_sdk_gives_up_when_the_coordinator_does_not_come_back(cluster: LocalCluster) -> None:
    async def run() -> None:
        async with AsyncClient(
            cluster.clients_endpoint, resubmit_after_s=0.2, reconnect_timeout_s=1.5
        ) as client:
            pending = asyncio.ensure_future(client.generate("nobody serves this", max_tokens=5))
            while not (await client.status()).queue:  # accepted, no agent yet
                await asyncio.sleep(0.05)
            cluster.kill("coordinator")
            started = asyncio.get_running_loop().time()
            with pytest.raises(Unavailable) as error:
                await pending
            assert 1.4 <= asyncio.get_running_loop().time() - started < 10, error.value
            assert error.value.retryable and error.value.details["silent_s"] >= 1.5

    asyncio.run(run())
