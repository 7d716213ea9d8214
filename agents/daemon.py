"""The agent's I/O shell: register with the coordinator, heartbeat, run what it is given.

One DEALER socket carries everything. The engine's blocking ``step`` runs in a worker thread so
the event loop keeps receiving commands and heartbeating while a step computes; commands are
applied to the engine only between steps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import zmq
import zmq.asyncio

from agents.base import Completed, Emitted, Engine, EngineEvent, Rejected, SequenceKey, SequenceSpec
from orchestrator import transport
from orchestrator.aio import drain_then_stop, run_until_stopped
from orchestrator.auth import ClientKeys, handshake_failures
from orchestrator.errors import InternalError, Overloaded, ProtocolError
from orchestrator.protocol import (
    AGENT_COMMANDS,
    CancelRun,
    DeviceProfile,
    Dispatch,
    ErrorInfo,
    Goodbye,
    Heartbeat,
    Register,
    Reregister,
    RunFailed,
    RunFinished,
    TokenChunk,
    Welcome,
    WireModel,
    decode,
    encode,
)
from orchestrator.settings import DRAIN_TIMEOUT_S

log = logging.getLogger("edgeorch.agent")

REGISTER_RETRY_S: Final = 1.0
REGISTER_LOG_EVERY: Final = 30
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
    ) -> None:
        self.engine = engine
        self.curve = curve
        self.profile = profile
        self.endpoint = endpoint
        self.name = name
        self.heartbeat_interval_s = heartbeat_interval_s
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self.agent_id: str | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._commands: deque[Dispatch | CancelRun] = deque()
        self._work = asyncio.Event()
        self._welcomed = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._coalescer = StreamCoalescer(STREAM_FLUSH_INTERVAL_S)
        self._kv_used_tokens = 0
        self._running: tuple[str, ...] = ()

    async def run(self, stop: asyncio.Event, drain: asyncio.Event | None = None) -> None:
        """Serve until ``stop``; after ``drain``, take no new work, finish the running
        sequences (bounded by ``drain_timeout_s``), say goodbye and stop."""
        context = zmq.asyncio.Context()
        linger_ms = 0
        try:
            self._socket = transport.dealer(context, self.endpoint, curve=self.curve)
            workers = [self._receive(), self._heartbeat(), self._run_engine(), self._watch()]
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
            kv_used_tokens=self._kv_used_tokens, running=self._running, draining=self._draining
        )

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            message = decode(frame, AGENT_COMMANDS)
            if isinstance(message, ProtocolError):
                log.warning("dropped coordinator frame: %s", message.message)
            elif isinstance(message, Welcome):
                self.agent_id = message.agent_id
                self.heartbeat_interval_s = message.heartbeat_interval_s
                self._welcomed.set()
                log.info("registered as %s", message.agent_id)
            elif isinstance(message, Reregister):
                if self._welcomed.is_set():
                    log.warning("the coordinator does not know this agent: registering again")
                    self._commands.extend(
                        CancelRun(request_id=rid, attempt=attempt)
                        for rid, attempt in self.engine.active_keys()
                    )
                    self._work.set()
                self._welcomed.clear()
            else:
                self._commands.append(message)
                self._work.set()

    async def _watch(self) -> None:
        """Say why the coordinator refuses this agent's handshakes (ZeroMQ keeps retrying, so
        an operator can fix the allow list without restarting the agent)."""
        assert self._socket is not None
        last_logged = -REFUSED_LOG_INTERVAL_S
        async for error in handshake_failures(self._socket, self.endpoint, self.curve, "agents"):
            now = time.monotonic()
            if now - last_logged >= REFUSED_LOG_INTERVAL_S:
                last_logged = now
                log.error("%s (retrying)", error.message)

    async def _heartbeat(self) -> None:
        """Register until welcomed, then heartbeat; any frame also counts as a heartbeat."""
        attempts = 0
        while True:
            if not self._welcomed.is_set():
                self._send(Register(name=self.name, profile=self.profile))
                try:
                    await asyncio.wait_for(self._welcomed.wait(), REGISTER_RETRY_S)
                except TimeoutError:
                    attempts += 1
                    if attempts == 1 or attempts % REGISTER_LOG_EVERY == 0:
                        log.info(
                            "waiting for the coordinator at %s to welcome %r%s",
                            self.endpoint,
                            self.name,
                            " (with CURVE, only the name its allow list gives this key)"
                            if self.curve is not None
                            else "",
                        )
                continue
            attempts = 0
            await asyncio.sleep(self.heartbeat_interval_s)
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

    def _apply(self, command: Dispatch | CancelRun) -> list[EngineEvent]:
        if isinstance(command, CancelRun):
            return self.engine.cancel((command.request_id, command.attempt))
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
        )
        try:
            return self.engine.add(spec)
        except Exception as exc:
            log.exception("engine failed to admit %s", command.request_id)
            return [Rejected(spec.key, InternalError(f"engine error: {type(exc).__name__}: {exc}"))]

    def _publish(self, events: list[EngineEvent]) -> None:
        """Send what the engine reported and note its state for heartbeats (read here, on the
        loop's thread, never while a step runs)."""
        for event in self._coalescer.push(events, time.monotonic()):
            self._send(_event_message(event))
        self._kv_used_tokens = self.engine.kv_used_tokens()
        self._running = tuple(request_id for request_id, _ in self.engine.active_keys())

    def _send(self, message: WireModel) -> None:
        assert self._socket is not None
        self._socket.send(encode(message))


def _event_message(event: EngineEvent) -> WireModel:
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
        )
    return RunFailed(request_id=request_id, attempt=attempt, error=ErrorInfo.of(event.error))


__all__ = ["AgentDaemon", "SequenceKey"]
