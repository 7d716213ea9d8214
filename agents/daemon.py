"""The agent's I/O shell: register with the coordinator, heartbeat, run what it is given.

One DEALER socket carries everything. The engine's blocking ``step`` runs in a worker thread so
the event loop keeps receiving commands and heartbeating while a step computes; commands are
applied to the engine only between steps.

Liveness goes both ways: any coordinator frame (it pings when it has nothing else to send)
proves the coordinator alive. After ``heartbeat_liveness`` silent intervals, or a
``Reregister``, the agent cancels its running sequences (the coordinator re-dispatches them as
later attempts and drops frames of these), opens a fresh socket with the same routing id and
registers again, backing off exponentially between unanswered attempts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Final

import zmq
import zmq.asyncio

from agents.base import (
    AchievedSpeed,
    Completed,
    Emitted,
    Engine,
    EngineEvent,
    Rejected,
    SequenceKey,
    SequenceSpec,
)
from agents.prefix_report import PrefixReporter
from orchestrator import transport
from orchestrator.aio import drain_then_stop, run_until_stopped
from orchestrator.auth import ClientKeys, handshake_failures
from orchestrator.core.prefix import PREFIX_BLOCK_TOKENS
from orchestrator.errors import InternalError, Overloaded, ProtocolError
from orchestrator.protocol import (
    AGENT_COMMANDS,
    CancelRun,
    DeviceProfile,
    Dispatch,
    ErrorInfo,
    Goodbye,
    Heartbeat,
    MeasuredSpeed,
    Ping,
    PromptCacheStats,
    Register,
    Reregister,
    Reserve,
    RunFailed,
    RunFinished,
    TokenChunk,
    Welcome,
    WireModel,
    decode,
    encode,
)
from orchestrator.settings import DRAIN_TIMEOUT_S, HEARTBEAT_LIVENESS

log = logging.getLogger("edgeorch.agent")

MAX_SPEED_POINTS: Final = 64
"""Decode-curve points a heartbeat carries at most (the wire model's bound)."""
REGISTER_TIMEOUT_S: Final = 1.0
"""How long one registration attempt waits for ``Welcome`` before backing off."""
REGISTER_FRESH_ID_AFTER: Final = 10
"""Unanswered registrations after which the agent connects under a new routing id. A ROUTER can
keep dropping a routing id whose earlier connection it has not finished closing (libzmq #2892);
seen once in CI: an agent that started before its coordinator sent ten registrations, none
delivered, while the coordinator was up. Ten attempts take about 25 s of backoff, past the
liveness bound of any session the old id had on a live coordinator, so a reconnect within that
time still takes its session back."""
REGISTER_LOG_FIRST: Final = 10
REGISTER_LOG_EVERY: Final = 30
"""Registration retries logged: the first ten, then every thirtieth."""
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_FACTOR: Final = 2.0
RECONNECT_MAX_S: Final = 5.0
RECONNECT_JITTER: Final = 0.5
"""Each backoff delay is drawn from [(1 - jitter) x d, d] so a fleet of agents that lost the
same coordinator does not reconnect in lockstep."""
GOODBYE_LINGER_MS: Final = 500
REFUSED_LOG_INTERVAL_S: Final = 30.0
"""A refused agent retries its handshake every 100 ms; it says why at most this often."""
STREAM_FLUSH_INTERVAL_S: Final = 0.04
"""Tokens of one sequence produced within this window travel in one frame (the first token
always goes at once), so the coordinator and client wake a few times per window, not per token:
on a two-core device every wake-up steals time from llama.cpp's threads."""


class StreamCoalescer:
    """Merges consecutive ``Emitted`` events of a sequence; pure, the clock is an argument."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._pending: dict[SequenceKey, Emitted] = {}
        self._last_flush: dict[SequenceKey, float] = {}

    def push(self, events: list[EngineEvent], now: float) -> list[EngineEvent]:
        """The events to send now, in order; the rest wait in per-sequence buffers."""
        out: list[EngineEvent] = []
        for event in events:
            key = event.key
            if not isinstance(event, Emitted):
                out.extend(self._take(key))
                self._last_flush.pop(key, None)
                out.append(event)
                continue
            held = self._pending.get(key)
            if held is not None:
                event = Emitted(
                    key,
                    held.text + event.text,
                    held.n_tokens + event.n_tokens,
                    held.token_ids + event.token_ids,
                )
            last = self._last_flush.get(key)
            if last is None or now - last >= self.interval_s:
                self._pending.pop(key, None)
                self._last_flush[key] = now
                out.append(event)
            else:
                self._pending[key] = event
        return out

    def _take(self, key: SequenceKey) -> list[EngineEvent]:
        held = self._pending.pop(key, None)
        return [held] if held is not None else []

    def forget(self, keys: list[SequenceKey]) -> None:
        """Drop what is held for these sequences: nobody wants it any more."""
        for key in keys:
            self._pending.pop(key, None)
            self._last_flush.pop(key, None)


class Backoff:
    """Capped exponential delays with jitter; the randomness is injected."""

    def __init__(
        self,
        rng: random.Random,
        *,
        initial_s: float = RECONNECT_INITIAL_S,
        factor: float = RECONNECT_FACTOR,
        max_s: float = RECONNECT_MAX_S,
        jitter: float = RECONNECT_JITTER,
    ) -> None:
        self._rng = rng
        self.initial_s = initial_s
        self.factor = factor
        self.max_s = max_s
        self.jitter = jitter
        self._next_s = initial_s

    def next(self) -> float:
        """The delay before the next attempt (grows until ``max_s``)."""
        ceiling = self._next_s
        self._next_s = min(self.max_s, self._next_s * self.factor)
        return ceiling * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        self._next_s = self.initial_s


class AgentDaemon:
    """Connects ``engine`` to the coordinator at ``endpoint``."""

    def __init__(
        self,
        engine: Engine,
        profile: DeviceProfile,
        *,
        endpoint: str,
        name: str,
        heartbeat_interval_s: float,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        curve: ClientKeys | None = None,
        heartbeat_liveness: int = HEARTBEAT_LIVENESS,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.curve = curve
        self.profile = profile
        self.endpoint = endpoint
        self.name = name
        self.heartbeat_interval_s = heartbeat_interval_s
        self.heartbeat_liveness = heartbeat_liveness
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self.agent_id: str | None = None
        self._rng = rng or random.Random()
        self._clock = clock
        self._identity = _routing_id(name)
        """The routing id of every socket, so a reconnect takes over the coordinator's session
        (ROUTER_HANDOVER) instead of leaving an orphan behind; renewed only when
        registrations go unanswered (``REGISTER_FRESH_ID_AFTER``)."""
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._pump: transport.DealerPump | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._last_heard_s = 0.0
        self._forgotten = asyncio.Event()
        self.reconnects = 0
        self._commands: deque[Dispatch | CancelRun | Reserve] = deque()
        self._work = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._coalescer = StreamCoalescer(STREAM_FLUSH_INTERVAL_S)
        self._abandoned: set[SequenceKey] = set()
        """Runs given up with the lost coordinator whose cancel is not applied yet: their
        events are dropped. A coordinator restarted without its journal numbers attempts from
        1 again, so a late event of an old run would pass for the new run of the same key."""
        self._kv_used_tokens = 0
        self._cache = PromptCacheStats()
        self._speed: MeasuredSpeed | None = None
        self._running: tuple[str, ...] = ()
        self._prefix_blocks: frozenset[int] = frozenset()
        self._prefixes = PrefixReporter(PREFIX_BLOCK_TOKENS)

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Serve until ``stop``; after ``drain``, take no new work, finish the running
        sequences (bounded by ``drain_timeout_s``), say goodbye and stop."""
        context = self._context = zmq.asyncio.Context()
        linger_ms = 0
        try:
            workers = [self._connection(), self._run_engine()]
            if drain is not None:
                workers.append(
                    drain_then_stop(
                        drain, stop, self._start_draining, self._idle, self.drain_timeout_s
                    )
                )
            await run_until_stopped(stop, *workers)
            if self._draining:
                self._send(Goodbye())
                linger_ms = GOODBYE_LINGER_MS
        finally:
            tasks = [t for t in (self._receiver, self._watcher) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._executor.shutdown(wait=True)
            self.engine.close()
            context.destroy(linger=linger_ms)

    def _start_draining(self) -> None:
        self._draining = True
        log.info("draining: finishing %d running sequences", len(self.engine.active_keys()))
        self._send(self._heartbeat_message())

    def _idle(self) -> bool:
        return not self._commands and not self.engine.has_work()

    def _heartbeat_message(self) -> Heartbeat:
        return Heartbeat(
            kv_used_tokens=self._kv_used_tokens,
            running=self._running,
            draining=self._draining,
            cache=self._cache,
            speed=self._speed,
            prefixes=self._prefixes.report(self._prefix_blocks),
        )

    def _open(self) -> None:
        """A fresh DEALER (and its reader) in place of the old one, whose queued frames (stale
        heartbeats, chunks of abandoned attempts) are dropped with it."""
        assert self._context is not None
        for task in (self._receiver, self._watcher):
            if task is not None:
                task.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
        socket, monitor = transport.monitored_dealer(
            self._context, self.endpoint, curve=self.curve, routing_id=self._identity
        )
        self._socket = socket
        self._pump = transport.DealerPump(socket, self._on_frame)
        loop = asyncio.get_running_loop()
        self._receiver = loop.create_task(self._pump.serve())
        self._watcher = loop.create_task(self._watch(socket, monitor))

    def _on_frame(self, frame: bytes) -> None:
        self._last_heard_s = self._clock()
        message = decode(frame, AGENT_COMMANDS)
        if isinstance(message, ProtocolError):
            log.warning("dropped coordinator frame: %s", message.message)
        elif isinstance(message, Welcome):
            self.agent_id = message.agent_id
            self.heartbeat_interval_s = message.heartbeat_interval_s
            self.heartbeat_liveness = message.heartbeat_liveness
            self._welcomed.set()
            self._prefixes.restart()
            log.info("registered as %s", message.agent_id)
        elif isinstance(message, Reregister):
            if self._welcomed.is_set():
                log.warning("the coordinator does not know this agent: registering again")
                self._abandon_work()
                self._forgotten.set()
        elif not isinstance(message, Ping):
            self._commands.append(message)
            self._work.set()

    async def _watch(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Say why the coordinator refuses this agent's handshakes (ZeroMQ keeps retrying, so
        an operator can fix the allow list without restarting the agent)."""
        last_logged = -REFUSED_LOG_INTERVAL_S
        failures = handshake_failures(socket, self.endpoint, self.curve, "agents", monitor=monitor)
        async for error in failures:
            now = time.monotonic()
            if now - last_logged >= REFUSED_LOG_INTERVAL_S:
                last_logged = now
                log.error("%s (retrying)", error.message)

    def _abandon_work(self) -> None:
        """Cancel everything the lost (or forgetful) coordinator gave us: it has requeued that
        work (or will, at its liveness bound) and drops frames of these attempts, so running on
        would only steal the device from the attempts that replace them."""
        self._welcomed.clear()
        self._commands.clear()
        keys = self.engine.active_keys()
        self._abandoned = set(keys)
        self._coalescer.forget(keys)
        self._commands.extend(CancelRun(request_id=rid, attempt=attempt) for rid, attempt in keys)
        self._work.set()

    async def _connection(self) -> None:
        """Register, heartbeat while registered, and start over when the coordinator forgets
        this agent or goes silent."""
        while True:
            await self._register()
            self._last_heard_s = self._clock()
            await self._heartbeat()
            self.reconnects += 1

    async def _register(self) -> None:
        """Send ``Register`` on a fresh socket until welcomed, with capped exponential backoff
        between attempts (a ``Welcome`` arriving during the backoff still counts)."""
        backoff = Backoff(self._rng)
        failures = 0
        self._welcomed.clear()
        while True:
            self._open()
            self._forgotten.clear()
            self._send(Register(name=self.name, profile=self.profile))
            if await self._welcome_within(REGISTER_TIMEOUT_S):
                return
            failures += 1
            if failures % REGISTER_FRESH_ID_AFTER == 0:
                self._identity = _routing_id(self.name)
            delay = backoff.next()
            if failures <= REGISTER_LOG_FIRST or failures % REGISTER_LOG_EVERY == 0:
                log.info(
                    "no answer from the coordinator at %s (attempt %d): retrying in %.3f s%s",
                    self.endpoint,
                    failures,
                    delay,
                    " (with CURVE it welcomes only the name its allow list gives this key)"
                    if self.curve is not None
                    else "",
                )
            if await self._welcome_within(delay):
                return

    async def _welcome_within(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._welcomed.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _heartbeat(self) -> None:
        """Heartbeat every interval until the coordinator says it forgot this agent or stays
        silent for liveness x interval (it sends pings, so silence means it is gone)."""
        while True:
            try:
                await asyncio.wait_for(self._forgotten.wait(), self.heartbeat_interval_s)
                return
            except TimeoutError:
                pass
            silent_s = self._clock() - self._last_heard_s
            if silent_s > self.heartbeat_interval_s * self.heartbeat_liveness:
                log.warning(
                    "no frame from the coordinator for %.1f s (liveness %d x %.2f s): "
                    "cancelling %d running sequences and reconnecting",
                    silent_s,
                    self.heartbeat_liveness,
                    self.heartbeat_interval_s,
                    len(self.engine.active_keys()),
                )
                self._abandon_work()
                return
            self._send(self._heartbeat_message())

    async def _run_engine(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self._commands:
                self._publish(self._apply(self._commands.popleft()))
            if self.engine.has_work():
                self._publish(await loop.run_in_executor(self._executor, self.engine.step))
            else:
                self._work.clear()
                if not self._commands:
                    await self._work.wait()

    def _apply(self, command: Dispatch | CancelRun | Reserve) -> list[EngineEvent]:
        if isinstance(command, Reserve):
            key = (command.request_id, command.attempt)
            self.engine.lower_claim(key, command.kv_reservation_tokens)
            return []
        if isinstance(command, CancelRun):
            key = (command.request_id, command.attempt)
            events = self.engine.cancel(key)
            if key in self._abandoned:
                self._abandoned.discard(key)
                return []
            return events
        self._abandoned.discard((command.request_id, command.attempt))
        if self._draining:
            refusal = Overloaded("the agent is draining and takes no new work", draining=True)
            return [Rejected((command.request_id, command.attempt), refusal)]
        spec = SequenceSpec(
            request_id=command.request_id,
            attempt=command.attempt,
            prompt=command.prompt,
            params=command.params,
            resume_text=command.resume_text,
            resume_tokens=command.resume_tokens,
            resume_token_ids=command.resume_token_ids,
            resume_model=command.resume_model,
            kv_reservation_tokens=command.kv_reservation_tokens,
        )
        try:
            return self.engine.add(spec)
        except Exception as exc:
            log.exception("engine failed to admit %s", command.request_id)
            return [Rejected(spec.key, InternalError(f"engine error: {type(exc).__name__}: {exc}"))]

    def _publish(self, events: list[EngineEvent]) -> None:
        """Send what the engine reported and note its state for heartbeats (read here, on the
        loop's thread, never while a step runs)."""
        fresh = [e for e in events if e.key not in self._abandoned]
        for message in event_messages(self._coalescer.push(fresh, time.monotonic())):
            self._send(message)
        self._kv_used_tokens = self.engine.kv_used_tokens()
        self._cache = PromptCacheStats(**asdict(self.engine.cache_stats()))
        self._speed = heartbeat_speed(self.engine.achieved_speed())
        self._prefix_blocks = self.engine.held_prefix_blocks()
        self._running = tuple(request_id for request_id, _ in self.engine.active_keys())

    def _send(self, message: WireModel) -> None:
        """Send on the current connection (nothing before the first one opens). When the
        coordinator has left ``SEND_HIGH_WATER_MARK`` frames unread, the frame cannot be
        queued: the agent gives up its work and registers again, as when it goes silent."""
        if self._pump is None:
            return
        try:
            self._pump.send(encode(message))
        except zmq.Again:
            if self._welcomed.is_set():
                log.error(
                    "%d frames wait unread by the coordinator: cancelling %d running sequences "
                    "and registering again",
                    transport.SEND_HIGH_WATER_MARK,
                    len(self.engine.active_keys()),
                )
                self._abandon_work()
                self._forgotten.set()


def event_messages(events: list[EngineEvent]) -> list[WireModel]:
    """The frames for ``events``, in order; a sequence's last tokens ride on its end."""
    messages: list[WireModel] = []
    tail: Emitted | None = None
    for event in events:
        if tail is not None and not (isinstance(event, Completed) and event.key == tail.key):
            messages.append(_event_message(tail))
            tail = None
        if isinstance(event, Emitted):
            tail = event
        elif isinstance(event, Completed):
            messages.append(_event_message(event, tail))
            tail = None
        else:
            messages.append(_event_message(event))
    if tail is not None:
        messages.append(_event_message(tail))
    return messages


def _event_message(event: EngineEvent, tail: Emitted | None = None) -> WireModel:
    request_id, attempt = event.key
    if isinstance(event, Emitted):
        return TokenChunk(
            request_id=request_id,
            attempt=attempt,
            text=event.text,
            n_tokens=event.n_tokens,
            token_ids=event.token_ids,
        )
    if isinstance(event, Completed):
        return RunFinished(
            request_id=request_id,
            attempt=attempt,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            finish_reason=event.finish_reason,
            prefill_s=event.prefill_s,
            decode_s=event.decode_s,
            text=tail.text if tail is not None else "",
            n_tokens=tail.n_tokens if tail is not None else 0,
            token_ids=tail.token_ids if tail is not None else (),
        )
    return RunFailed(request_id=request_id, attempt=attempt, error=ErrorInfo.of(event.error))


__all__ = ["AgentDaemon", "SequenceKey"]


def heartbeat_speed(achieved: AchievedSpeed) -> MeasuredSpeed | None:
    """The engine's achieved speeds for the heartbeat (None before it measured any); points
    that are not positive finite numbers are left out rather than refused on the wire."""
    curve = tuple(
        (rows, tps) for rows, tps in achieved.decode_curve if rows >= 1 and 0 < tps < math.inf
    )
    prefill = achieved.prefill_tps
    if prefill is not None and not 0 < prefill < math.inf:
        prefill = None
    if not curve and prefill is None:
        return None
    return MeasuredSpeed(decode_curve=curve[:MAX_SPEED_POINTS], prefill_tps=prefill)


def _routing_id(name: str) -> bytes:
    """The agent's name and a random suffix."""
    return f"{name}:{uuid.uuid4().hex[:12]}".encode()
