"""Chaos runs against a ``LocalCluster``: requests sent through a client that keeps every reply
frame it receives (where the SDK would silently drop a repeated chunk), while a seeded killer
SIGKILLs and restarts agents at a fixed interval.

The reliability tests assert exactly-once answers on these records; ``benchmarks/chaos.py``
reports the same run's throughput with and without kills.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import zmq
import zmq.asyncio

from orchestrator import transport
from orchestrator.local import LocalCluster
from orchestrator.protocol import (
    CLIENT_REPLIES,
    Accepted,
    ErrorInfo,
    ErrorReply,
    GenerationParams,
    Result,
    StreamChunk,
    Submit,
    decode,
    encode,
)

POLL_S: Final = 0.01
DUPLICATE_GRACE_S: Final = 1.0
"""After the last answer, how long the client keeps listening for a second one."""


@dataclass(frozen=True, slots=True)
class ChaosRequest:
    request_id: str
    prompt: str
    max_tokens: int


@dataclass(slots=True)
class Observed:
    """Every reply frame one request got, in arrival order (times from ``time.monotonic``)."""

    request: ChaosRequest
    submitted_s: float
    accepted: int = 0
    chunks: list[tuple[int, str, float]] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    errors: list[ErrorInfo] = field(default_factory=list)
    done_s: float | None = None

    @property
    def streamed_text(self) -> str:
        return "".join(text for _, text, _ in self.chunks)

    def problems(self, expected_text: str) -> list[str]:
        """What breaks "one complete answer, exactly once" (empty when the request is sound)."""
        rid = self.request.request_id
        found: list[str] = []
        if self.accepted != 1:
            found.append(f"{rid}: accepted {self.accepted} times")
        if self.errors:
            found.append(f"{rid}: errors {[(e.code, e.message) for e in self.errors]}")
        if len(self.results) != 1:
            found.append(f"{rid}: {len(self.results)} results")
        indexes = [index for index, _, _ in self.chunks]
        if indexes != list(range(len(indexes))):
            found.append(f"{rid}: chunk indexes {indexes} (repeat, gap or reorder)")
        if self.streamed_text != expected_text:
            found.append(f"{rid}: streamed {self.streamed_text!r}, expected {expected_text!r}")
        for result in self.results:
            if result.text != expected_text:
                found.append(f"{rid}: result text {result.text!r}, expected {expected_text!r}")
            if result.completion_tokens != self.request.max_tokens:
                found.append(
                    f"{rid}: {result.completion_tokens} tokens, expected {self.request.max_tokens}"
                )
        return found


class RecordingClient:
    """A raw DEALER on the clients endpoint that submits streaming requests and records every
    reply; use as an async context manager."""

    def __init__(self, endpoint: str, params: Callable[[ChaosRequest], GenerationParams]) -> None:
        self.endpoint = endpoint
        self.observed: dict[str, Observed] = {}
        self._params = params
        self._context = zmq.asyncio.Context()
        self._socket = transport.dealer(self._context, endpoint)
        self._receiver: asyncio.Task[None] | None = None
        self.stray_frames = 0

    async def __aenter__(self) -> RecordingClient:
        self._receiver = asyncio.get_running_loop().create_task(self._receive())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        self._context.destroy(linger=0)

    def submit(self, request: ChaosRequest) -> Observed:
        observed = Observed(request, time.monotonic())
        self.observed[request.request_id] = observed
        submit = Submit(
            request_id=request.request_id,
            prompt=request.prompt,
            params=self._params(request),
            stream=True,
        )
        self._socket.send(encode(submit))
        return observed

    def pending(self) -> int:
        return sum(1 for o in self.observed.values() if o.done_s is None)

    async def wait_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Poll ``condition`` until it holds (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def _receive(self) -> None:
        while True:
            frame = await self._socket.recv()
            now = time.monotonic()
            message = decode(frame, CLIENT_REPLIES)
            request_id = getattr(message, "request_id", None)
            observed = self.observed.get(request_id) if isinstance(request_id, str) else None
            if observed is None:
                self.stray_frames += 1
            elif isinstance(message, Accepted):
                observed.accepted += 1
            elif isinstance(message, StreamChunk):
                observed.chunks.append((message.index, message.text, now))
            elif isinstance(message, Result):
                observed.results.append(message)
                observed.done_s = observed.done_s or now
            elif isinstance(message, ErrorReply):
                observed.errors.append(message.error)
                observed.done_s = observed.done_s or now


@dataclass(frozen=True, slots=True)
class ChaosReport:
    observed: dict[str, Observed]
    kills: list[tuple[float, str]]
    wall_s: float
    finished: bool

    @property
    def requests_per_s(self) -> float:
        return len(self.observed) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        tokens = sum(r.completion_tokens for o in self.observed.values() for r in o.results[:1])
        return tokens / self.wall_s


async def _killer(
    cluster: LocalCluster,
    agents: Sequence[str],
    restart: Callable[[str], object],
    rng: random.Random,
    interval_s: float,
    stop: asyncio.Event,
    kills: list[tuple[float, str]],
) -> None:
    """Every ``interval_s``: SIGKILL one agent picked by ``rng`` and start it again at once."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
            return
        except TimeoutError:
            pass
        name = rng.choice(list(agents))
        cluster.kill(name)
        kills.append((time.monotonic(), name))
        restart(name)


async def run_chaos(
    cluster: LocalCluster,
    requests: Sequence[ChaosRequest],
    *,
    params: Callable[[ChaosRequest], GenerationParams],
    rate_per_s: float,
    timeout_s: float,
    agents: Sequence[str] = (),
    restart: Callable[[str], object] = lambda name: None,
    kill_interval_s: float | None = None,
    seed: int = 0,
) -> ChaosReport:
    """Submit ``requests`` at ``rate_per_s`` and wait for every answer (at most ``timeout_s``),
    killing one of ``agents`` every ``kill_interval_s`` (None: no kills) until the last answer;
    then listen ``DUPLICATE_GRACE_S`` longer for answers that should not come."""
    kills: list[tuple[float, str]] = []
    stop = asyncio.Event()
    async with RecordingClient(cluster.clients_endpoint, params) as client:
        killer = None
        if kill_interval_s is not None:
            killer = asyncio.get_running_loop().create_task(
                _killer(cluster, agents, restart, random.Random(seed), kill_interval_s, stop, kills)
            )
        started = time.monotonic()
        try:
            for i, request in enumerate(requests):
                await asyncio.sleep(max(0.0, started + i / rate_per_s - time.monotonic()))
                client.submit(request)
            finished = await client.wait_until(
                lambda: client.pending() == 0, timeout_s - (time.monotonic() - started)
            )
        finally:
            stop.set()
            if killer is not None:
                await killer
        done = [o.done_s for o in client.observed.values() if o.done_s is not None]
        wall_s = (max(done) if done else time.monotonic()) - started
        await asyncio.sleep(DUPLICATE_GRACE_S)
        return ChaosReport(dict(client.observed), kills, wall_s, finished)
