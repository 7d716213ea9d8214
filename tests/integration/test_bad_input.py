"""Bad input against a live coordinator and fake agent: absurd parameters name their field, the
context boundary is exact and its error carries the numbers, a full queue is a retryable
``overloaded`` with ``retry_after_s``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from agents.backends.fake.engine import fake_completion
from orchestrator.client import AsyncClient
from orchestrator.errors import ContextOverflow, Overloaded
from orchestrator.local import LocalCluster
from orchestrator.protocol import CLIENT_REPLIES, PROTOCOL_VERSION, ErrorReply, decode
from tests.bad_inputs import BAD_FIELDS, BAD_PARAMS

pytestmark = pytest.mark.integration

MAX_QUEUE = 2
N_CTX = 64
FAST = ("--backend", "fake", "--fake-decode-tps", "400", "--fake-prefill-tps", "20000")


@pytest.fixture
def small_queue(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path, "--predictor", "none", "--max-queue", str(MAX_QUEUE))
    try:
        yield local
    finally:
        local.stop()


def test_every_absurd_field_is_an_invalid_request_naming_it(small_queue: LocalCluster) -> None:
    cases = [({"params": p}, f) for p, f in BAD_PARAMS] + BAD_FIELDS
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(small_queue.clients_endpoint)
    try:
        for i, (fields, field) in enumerate(cases):
            submit: dict[str, Any] = {
                "v": PROTOCOL_VERSION,
                "type": "submit",
                "request_id": f"bad-{i}",
                "prompt": "hi",
                **fields,
            }
            socket.send(msgpack.packb(submit))
            assert socket.poll(10_000), f"no answer to {field}"
            reply = decode(socket.recv(), CLIENT_REPLIES)
            assert isinstance(reply, ErrorReply), (field, reply)
            error = reply.error
            assert (error.code, error.retryable, error.details["field"]) == (
                "invalid_request",
                False,
                field,
            )
            assert field in error.message
    finally:
        context.destroy(linger=0)


def test_a_full_queue_is_overloaded_with_a_retry_hint(small_queue: LocalCluster) -> None:
    async def run() -> None:
        async with AsyncClient(small_queue.clients_endpoint, timeout_s=60) as client:
            waiting = [
                asyncio.ensure_future(client.generate(f"queued {i}", max_tokens=3))
                for i in range(MAX_QUEUE)
            ]
            while len((await client.status()).queue) < MAX_QUEUE:
                await asyncio.sleep(0.05)
            with pytest.raises(Overloaded) as refused:
                await client.generate("one too many", max_tokens=3)
            assert refused.value.retryable
            assert refused.value.details["retry_after_s"] > 0
            assert (refused.value.details["queued"], refused.value.details["max_queue"]) == (
                MAX_QUEUE,
                MAX_QUEUE,
            )
            small_queue.start_agent("late", *FAST)
            assert [r.completion_tokens for r in await asyncio.gather(*waiting)] == [3] * MAX_QUEUE

    asyncio.run(run())


@pytest.mark.parametrize(("max_tokens", "fits"), [(9, True), (10, True), (11, False)])
def test_context_boundary_at_n_ctx(small_queue: LocalCluster, max_tokens: int, fits: bool) -> None:
    """53 words are 54 fake tokens; with n_ctx 64, 54 + 10 == n_ctx fits and 54 + 11 overflows
    (the coordinator only estimates the fake model's count, so the agent decides exactly)."""
    small_queue.start_agent("small", *FAST, "--n-ctx", str(N_CTX))
    small_queue.wait_for_agents(1)
    prompt = " ".join(f"w{i}" for i in range(53))
    with small_queue.client() as client:
        if fits:
            result = client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            assert result.text == fake_completion(prompt, max_tokens)
            assert (result.prompt_tokens, result.completion_tokens) == (54, max_tokens)
            return
        with pytest.raises(ContextOverflow) as overflow:
            client.generate(prompt, max_tokens=max_tokens)
    assert overflow.value.details == {"prompt_tokens": 54, "max_tokens": 11, "n_ctx": N_CTX}
    assert not overflow.value.retryable and "64" in overflow.value.message
