"""Client SDK: ``AsyncClient`` and its blocking twin ``Client``.

One DEALER socket per client multiplexes any number of concurrent requests by request id.
``generate`` returns a ``GenerationResult``; with ``stream=True`` it returns a ``Stream`` that
yields text chunks as they arrive and then exposes ``.result``. Every failure raises a typed
``EdgeorchError``.

Retries are transparent: the request id is the idempotency key, so the client re-sends the same
``Submit`` whenever its connection to the coordinator is re-established (a restarted
coordinator replays its journal and re-attaches the request) and whenever it has heard nothing
about a request for ``resubmit_after_s``. A request gets exactly one result; a stream yields
each character once (chunks carry their character offset, and a re-attach resends the text so
far, of which the client yields only what it did not have).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncGenerator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, TypeVar, Unpack, overload

import zmq
import zmq.asyncio
from pydantic import ValidationError

from orchestrator import transport
from orchestrator.auth import client_keys, handshake_failures
from orchestrator.errors import (
    EdgeorchError,
    InvalidRequest,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    Unavailable,
    error_from_wire,
)
from orchestrator.protocol import (
    CLIENT_REPLIES,
    Accepted,
    CancelRequest,
    ClientReply,
    ConversationHint,
    ErrorInfo,
    ErrorReply,
    GenerationParams,
    Priority,
    Result,
    StatusQuery,
    StatusReport,
    StreamChunk,
    Submit,
    WireModel,
    decode,
    encode,
)
from orchestrator.settings import DEFAULT_CLIENTS_ENDPOINT

log = logging.getLogger("edgeorch.client")

ACCEPT_TIMEOUT_S: Final = 10.0
"""How long to wait for the coordinator to acknowledge a request before calling it unavailable."""
RESUBMIT_AFTER_S: Final = 5.0
"""Silence about a request after which its ``Submit`` is sent again (a re-attach if the
coordinator has it; replies lost on the way are re-sent)."""
RECONNECT_TIMEOUT_S: Final = 60.0
"""Silence about an accepted request, despite re-sends, after which it is ``Unavailable``: the
coordinator did not come back in time."""
ZMTP_HEARTBEAT_IVL_MS: Final = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS: Final = 5000
"""ZeroMQ-level pings on the client's connection: a coordinator that vanishes without closing
TCP (a partition, a dead host) is noticed, and the reconnect triggers the re-sends."""

T = TypeVar("T")


class GenerationOptions(TypedDict, total=False):
    """Keyword arguments of ``generate``: ``GenerationParams`` fields plus ``request_id`` and,
    for a chat rendered into ``prompt``, the ``conversation`` the length predictor reads."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: Sequence[str]
    ignore_eos: bool
    priority: Priority
    model: str | None
    cache_prompt: bool
    request_id: str | None
    conversation: ConversationHint | None


@dataclass(frozen=True, slots=True)
class GenerationResult:
    request_id: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    queue_s: float
    ttft_s: float
    total_s: float
    agent: str
    attempts: int
    predicted_tokens: float | None

    @property
    def decode_tokens_per_s(self) -> float:
        """Output tokens per second after the first token arrived."""
        span = self.total_s - self.ttft_s
        return (
            (self.completion_tokens - 1) / span if span > 0 and self.completion_tokens > 1 else 0.0
        )

    @classmethod
    def from_wire(cls, message: Result) -> GenerationResult:
        return cls(
            request_id=message.request_id,
            text=message.text,
            prompt_tokens=message.prompt_tokens,
            completion_tokens=message.completion_tokens,
            finish_reason=message.finish_reason,
            queue_s=message.queue_s,
            ttft_s=message.ttft_s,
            total_s=message.total_s,
            agent=message.agent,
            attempts=message.attempts,
            predicted_tokens=message.predicted_tokens,
        )


class Stream:
    """Async iterator over streamed text; ``result`` is set once the iteration ends."""

    def __init__(
        self,
        client: AsyncClient,
        request_id: str,
        accepted: Accepted,
        inbox: asyncio.Queue[ClientReply],
        timeout_s: float | None,
    ) -> None:
        self.request_id = request_id
        self.accepted = accepted
        self.result: GenerationResult | None = None
        self._client = client
        self._inbox = inbox
        self._timeout_s = timeout_s
        self._chars = 0
        """Characters of the output yielded so far."""
        self.tokens = 0
        """Output tokens generated so far, as of the last chunk received."""
        self.attempts = 1
        """Dispatch attempts so far, as of the last chunk received."""

    def __aiter__(self) -> AsyncGenerator[str, None]:
        return self._chunks()

    async def _chunks(self) -> AsyncGenerator[str, None]:
        client = self._client
        try:
            deadline = client._deadline(self._timeout_s)
            while True:
                message = await client._next(
                    self._inbox, self._timeout_s, self.request_id, deadline=deadline
                )
                if isinstance(message, StreamChunk):
                    if message.offset > self._chars:
                        # A chunk went missing: re-attach, which resends the text so far.
                        client._resubmit(self.request_id)
                        continue
                    new = message.text[self._chars - message.offset :]
                    self.tokens = max(self.tokens, message.tokens)
                    self.attempts = max(self.attempts, message.attempt)
                    if new:
                        self._chars += len(new)
                        deadline = client._deadline(self._timeout_s)
                        yield new
                elif isinstance(message, Result):
                    self.result = GenerationResult.from_wire(message)
                    self.tokens = message.completion_tokens
                    self.attempts = message.attempts
                    rest = message.text[self._chars :]
                    if rest:
                        self._chars += len(rest)
                        yield rest
                    return
        finally:
            client._forget(self.request_id)

    async def cancel(self) -> None:
        await self._client.cancel(self.request_id)


class AsyncClient:
    """Talks to a coordinator's clients endpoint; use as an async context manager.

    ``curve_secret_key`` (this client's ``NAME.key_secret``) and ``curve_server_key`` (the
    coordinator's ``server.key``) authenticate with CURVE; a refused handshake fails the waiting
    calls at once with ``Unauthorized`` saying why.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_CLIENTS_ENDPOINT,
        *,
        timeout_s: float | None = None,
        curve_secret_key: str | Path | None = None,
        curve_server_key: str | Path | None = None,
        resubmit_after_s: float = RESUBMIT_AFTER_S,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = client_keys(curve_secret_key, curve_server_key)
        self.resubmit_after_s = resubmit_after_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self.resubmits = 0
        self._connections = 0
        self._context: zmq.asyncio.Context | None = None
        self._pump: transport.DealerPump | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._inboxes: dict[str, asyncio.Queue[ClientReply]] = {}
        self._submits: dict[str, Submit] = {}
        """Requests awaiting their result: what to re-send after a reconnect."""

    async def __aenter__(self) -> AsyncClient:
        self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> transport.DealerPump:
        if self._pump is None:
            self._context = zmq.asyncio.Context()
            socket, monitor = transport.monitored_dealer(
                self._context,
                self.endpoint,
                curve=self.curve,
                zmtp_heartbeat_ms=(ZMTP_HEARTBEAT_IVL_MS, ZMTP_HEARTBEAT_TIMEOUT_MS),
            )
            self._pump = transport.DealerPump(socket, self._on_frame)
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._pump.serve()),
                loop.create_task(self._watch(socket, monitor)),
            ]
        return self._pump

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._context is not None:
            self._context.destroy(linger=0)
        self._context = self._pump = None
        self._tasks = []

    async def _watch(self, socket: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Fail every waiting call when the coordinator refuses the handshake (they would wait
        for a reply that cannot come), and re-send pending submits on every reconnect."""
        failures = handshake_failures(
            socket,
            self.endpoint,
            self.curve,
            "clients",
            monitor=monitor,
            on_success=self._connected,
        )
        async for error in failures:
            for key, inbox in self._inboxes.items():
                inbox.put_nowait(ErrorReply(request_id=key, error=ErrorInfo.of(error)))

    def _connected(self) -> None:
        """Every connection after the first is a reconnect (the coordinator restarted, or the
        link dropped): re-send each pending ``Submit`` so the coordinator re-attaches it."""
        self._connections += 1
        if self._connections > 1 and self._submits:
            log.info(
                "reconnected to %s: re-sending %d pending requests",
                self.endpoint,
                len(self._submits),
            )
            for request_id in list(self._submits):
                self._resubmit(request_id)

    def _resubmit(self, request_id: str) -> None:
        submit = self._submits.get(request_id)
        if submit is not None:
            self.resubmits += 1
            self._send(submit)

    def _forget(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)
        self._submits.pop(request_id, None)

    def _deadline(self, timeout_s: float | None) -> float | None:
        return None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    @overload
    async def generate(
        self, prompt: str, *, stream: Literal[False] = False, **options: Unpack[GenerationOptions]
    ) -> GenerationResult: ...

    @overload
    async def generate(
        self, prompt: str, *, stream: Literal[True], **options: Unpack[GenerationOptions]
    ) -> Stream: ...

    async def generate(
        self, prompt: str, *, stream: bool = False, **options: Unpack[GenerationOptions]
    ) -> GenerationResult | Stream:
        """Submit one request (parameters and defaults as in ``GenerationParams``).

        ``request_id`` is the idempotency key: re-sending the same id after a lost connection
        re-attaches to the same request instead of running it twice.
        """
        fields: dict[str, Any] = dict(options)
        request_id = fields.pop("request_id", None) or uuid.uuid4().hex
        conversation = fields.pop("conversation", None)
        if "stop" in fields:
            fields["stop"] = tuple(fields["stop"])
        for name in ("temperature", "top_p", "min_p"):
            if isinstance(fields.get(name), int):
                fields[name] = float(fields[name])
        try:
            submit = Submit(
                request_id=request_id,
                prompt=prompt,
                params=GenerationParams(**fields),
                stream=stream,
                conversation=conversation,
            )
        except (ValidationError, TypeError) as exc:
            raise _invalid(exc) from None
        inbox: asyncio.Queue[ClientReply] = asyncio.Queue()
        self._inboxes[submit.request_id] = inbox
        self._submits[submit.request_id] = submit
        try:
            self._send(submit)
            first = await self._next(inbox, ACCEPT_TIMEOUT_S, submit.request_id, accepting=True)
            while not isinstance(first, Accepted | Result):
                # Nothing else precedes the acknowledgement; a stream re-fetches what it skips.
                first = await self._next(inbox, ACCEPT_TIMEOUT_S, submit.request_id, accepting=True)
            if isinstance(first, Result):
                if not stream:
                    return GenerationResult.from_wire(first)
                inbox.put_nowait(first)
                first = Accepted(
                    request_id=first.request_id, queue_position=0, prompt_tokens=first.prompt_tokens
                )
            if stream:
                return Stream(self, submit.request_id, first, inbox, self.timeout_s)
            deadline = self._deadline(self.timeout_s)
            while True:
                message = await self._next(
                    inbox, self.timeout_s, submit.request_id, deadline=deadline
                )
                if isinstance(message, Result):
                    return GenerationResult.from_wire(message)
        except BaseException:
            self._forget(submit.request_id)
            raise
        finally:
            if not stream:
                self._forget(submit.request_id)

    async def cancel(self, request_id: str) -> None:
        self._submits.pop(request_id, None)
        self._send(CancelRequest(request_id=request_id))

    async def status(
        self, request_id: str | None = None, *, timeout_s: float = ACCEPT_TIMEOUT_S
    ) -> StatusReport:
        """The cluster's agents, queue and running requests with estimated start and finish
        times; with ``request_id``, only that request (cheap enough to poll while waiting)."""
        query_id = uuid.uuid4().hex
        inbox: asyncio.Queue[ClientReply] = asyncio.Queue()
        self._inboxes[query_id] = inbox
        try:
            self._send(StatusQuery(query_id=query_id, request_id=request_id))
            message = await self._next(inbox, timeout_s, query_id, accepting=True)
            assert isinstance(message, StatusReport)
            return message
        finally:
            self._inboxes.pop(query_id, None)

    async def _next(
        self,
        inbox: asyncio.Queue[ClientReply],
        timeout_s: float | None,
        request_id: str,
        *,
        accepting: bool = False,
        deadline: float | None = None,
    ) -> ClientReply:
        """The next reply about ``request_id`` before ``deadline`` (default: ``timeout_s`` from
        now). While the coordinator is silent about a pending request its ``Submit`` is re-sent
        every ``resubmit_after_s``; once accepted, silence beyond ``reconnect_timeout_s`` is
        ``Unavailable`` (before, the acceptance deadline alone applies)."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = self._deadline(timeout_s)
        heard = loop.time()
        while True:
            now = loop.time()
            wait = self.resubmit_after_s
            if deadline is not None:
                if now >= deadline:
                    raise self._timed_out(request_id, timeout_s, accepting=accepting)
                wait = min(wait, deadline - now)
            try:
                async with asyncio.timeout(wait):
                    message = await inbox.get()
            except TimeoutError:
                now = loop.time()
                if request_id not in self._submits or (deadline is not None and now >= deadline):
                    continue
                if not accepting and now - heard >= self.reconnect_timeout_s:
                    raise Unavailable(
                        f"no answer from the coordinator at {self.endpoint} about request "
                        f"{request_id} for {now - heard:.0f} s despite re-sending it",
                        endpoint=self.endpoint,
                        request_id=request_id,
                        silent_s=round(now - heard, 1),
                    ) from None
                self._resubmit(request_id)
                continue
            if isinstance(message, ErrorReply):
                raise error_from_wire(
                    message.error.code, message.error.message, message.error.details
                )
            return message

    def _timed_out(
        self, request_id: str, timeout_s: float | None, *, accepting: bool
    ) -> EdgeorchError:
        if accepting:
            return Unavailable(
                f"no answer from the coordinator at {self.endpoint} within {timeout_s:.0f} s",
                endpoint=self.endpoint,
                timeout_s=timeout_s,
            )
        return RequestTimeout(
            f"request {request_id} got no result within {timeout_s} s",
            request_id=request_id,
            timeout_s=timeout_s,
        )

    def _on_frame(self, frame: bytes) -> None:
        message = decode(frame, CLIENT_REPLIES)
        if isinstance(message, ProtocolError):
            return
        key = message.query_id if isinstance(message, StatusReport) else message.request_id
        inbox = self._inboxes.get(key) if key is not None else None
        if inbox is not None:
            inbox.put_nowait(message)

    def _send(self, message: WireModel) -> None:
        try:
            self._connect().send(encode(message))
        except zmq.Again:
            raise Overloaded(
                f"{transport.SEND_HIGH_WATER_MARK} frames already wait to reach {self.endpoint}",
                endpoint=self.endpoint,
                queued_frames=transport.SEND_HIGH_WATER_MARK,
            ) from None


class Client:
    """Blocking client: runs an ``AsyncClient`` on a private event loop thread."""

    def __init__(
        self,
        endpoint: str = DEFAULT_CLIENTS_ENDPOINT,
        *,
        timeout_s: float | None = None,
        curve_secret_key: str | Path | None = None,
        curve_server_key: str | Path | None = None,
        resubmit_after_s: float = RESUBMIT_AFTER_S,
        reconnect_timeout_s: float = RECONNECT_TIMEOUT_S,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="edgeorch-client", daemon=True
        )
        self._async = AsyncClient(
            endpoint,
            timeout_s=timeout_s,
            curve_secret_key=curve_secret_key,
            curve_server_key=curve_server_key,
            resubmit_after_s=resubmit_after_s,
            reconnect_timeout_s=reconnect_timeout_s,
        )
        self._thread.start()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def generate(self, prompt: str, **options: Unpack[GenerationOptions]) -> GenerationResult:
        """As ``AsyncClient.generate``."""
        return self._call(self._async.generate(prompt, **options))

    def stream(self, prompt: str, **options: Unpack[GenerationOptions]) -> SyncStream:
        """As ``AsyncClient.generate(stream=True)``: iterate text chunks, then read ``.result``."""
        return SyncStream(self, self._call(self._async.generate(prompt, stream=True, **options)))

    def status(
        self, request_id: str | None = None, *, timeout_s: float = ACCEPT_TIMEOUT_S
    ) -> StatusReport:
        """As ``AsyncClient.status``."""
        return self._call(self._async.status(request_id, timeout_s=timeout_s))

    def cancel(self, request_id: str) -> None:
        self._call(self._async.cancel(request_id))

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()


class SyncStream:
    def __init__(self, client: Client, stream: Stream) -> None:
        self._client = client
        self._stream = stream
        self.request_id = stream.request_id
        self.accepted = stream.accepted

    @property
    def result(self) -> GenerationResult | None:
        return self._stream.result

    @property
    def tokens(self) -> int:
        """Output tokens generated so far, as of the last chunk received."""
        return self._stream.tokens

    @property
    def attempts(self) -> int:
        """Dispatch attempts so far, as of the last chunk received."""
        return self._stream.attempts

    def __iter__(self) -> Iterator[str]:
        chunks = aiter(self._stream)

        async def next_chunk() -> str:
            return await anext(chunks)

        while True:
            try:
                yield self._client._call(next_chunk())
            except StopAsyncIteration:
                return


def _invalid(exc: ValidationError | TypeError) -> EdgeorchError:
    if isinstance(exc, TypeError):
        return InvalidRequest(f"invalid generation option: {exc}", field="options")
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first["loc"] if p not in ("params",)) or "request"
    return InvalidRequest(
        f"invalid {field}: {first['msg']}", field=field, value=repr(first.get("input"))[:200]
    )
