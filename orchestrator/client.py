"""Client SDK: ``AsyncClient`` and its blocking twin ``Client``.

One DEALER socket per client multiplexes any number of concurrent requests by request id.
``generate`` returns a ``GenerationResult``; with ``stream=True`` it returns a ``Stream`` that
yields text chunks as they arrive and then exposes ``.result``. Every failure raises a typed
``EdgeorchError``.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
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

ACCEPT_TIMEOUT_S: Final = 10.0
"""How long to wait for the coordinator to acknowledge a request before calling it unavailable."""

T = TypeVar("T")


class GenerationOptions(TypedDict, total=False):
    """Keyword arguments of ``generate``: ``GenerationParams`` fields plus ``request_id``."""

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
    request_id: str | None


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
        self._next_index = 0

    def __aiter__(self) -> AsyncIterator[str]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[str]:
        try:
            while True:
                message = await self._client._next(self._inbox, self._timeout_s, self.request_id)
                if isinstance(message, StreamChunk):
                    if message.index >= self._next_index:
                        self._next_index = message.index + 1
                        yield message.text
                elif isinstance(message, Result):
                    self.result = GenerationResult.from_wire(message)
                    return
        finally:
            self._client._inboxes.pop(self.request_id, None)

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
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = client_keys(curve_secret_key, curve_server_key)
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._inboxes: dict[str, asyncio.Queue[ClientReply]] = {}

    async def __aenter__(self) -> AsyncClient:
        self._connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is None:
            self._context = zmq.asyncio.Context()
            self._socket = transport.dealer(self._context, self.endpoint, curve=self.curve)
            loop = asyncio.get_running_loop()
            self._receiver = loop.create_task(self._receive())
            self._watcher = loop.create_task(self._watch(self._socket))
        return self._socket

    async def close(self) -> None:
        tasks = [t for t in (self._receiver, self._watcher) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._context is not None:
            self._context.destroy(linger=0)
        self._socket = self._context = self._receiver = self._watcher = None

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
            )
        except (ValidationError, TypeError) as exc:
            raise _invalid(exc) from None
        inbox: asyncio.Queue[ClientReply] = asyncio.Queue()
        self._inboxes[submit.request_id] = inbox
        try:
            self._send(submit)
            first = await self._next(inbox, ACCEPT_TIMEOUT_S, submit.request_id, accepting=True)
            if isinstance(first, Result):
                if not stream:
                    return GenerationResult.from_wire(first)
                inbox.put_nowait(first)
                first = Accepted(
                    request_id=first.request_id, queue_position=0, prompt_tokens=first.prompt_tokens
                )
            assert isinstance(first, Accepted)
            if stream:
                return Stream(self, submit.request_id, first, inbox, self.timeout_s)
            while True:
                message = await self._next(inbox, self.timeout_s, submit.request_id)
                if isinstance(message, Result):
                    return GenerationResult.from_wire(message)
        finally:
            if not stream:
                self._inboxes.pop(submit.request_id, None)

    async def cancel(self, request_id: str) -> None:
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
    ) -> ClientReply:
        try:
            message = await asyncio.wait_for(inbox.get(), timeout_s)
        except TimeoutError:
            if accepting:
                raise Unavailable(
                    f"no answer from the coordinator at {self.endpoint} within {timeout_s:.0f} s",
                    endpoint=self.endpoint,
                    timeout_s=timeout_s,
                ) from None
            raise RequestTimeout(
                f"request {request_id} got no result within {timeout_s} s",
                request_id=request_id,
                timeout_s=timeout_s,
            ) from None
        if isinstance(message, ErrorReply):
            raise error_from_wire(message.error.code, message.error.message, message.error.details)
        return message

    async def _receive(self) -> None:
        assert self._socket is not None
        while True:
            frame = await self._socket.recv()
            message = decode(frame, CLIENT_REPLIES)
            if isinstance(message, ProtocolError):
                continue
            key = message.query_id if isinstance(message, StatusReport) else message.request_id
            inbox = self._inboxes.get(key) if key is not None else None
            if inbox is not None:
                inbox.put_nowait(message)

    async def _watch(self, socket: zmq.asyncio.Socket) -> None:
        """Fail every waiting call when the coordinator refuses the handshake: without this
        they would wait for a reply that cannot come."""
        async for error in handshake_failures(socket, self.endpoint, self.curve, "clients"):
            for key, inbox in self._inboxes.items():
                inbox.put_nowait(ErrorReply(request_id=key, error=ErrorInfo.of(error)))

    def _send(self, message: WireModel) -> None:
        self._connect().send(encode(message))


class Client:
    """Blocking client: runs an ``AsyncClient`` on a private event loop thread."""

    def __init__(
        self,
        endpoint: str = DEFAULT_CLIENTS_ENDPOINT,
        *,
        timeout_s: float | None = None,
        curve_secret_key: str | Path | None = None,
        curve_server_key: str | Path | None = None,
    ) -> None:
        self._async = AsyncClient(
            endpoint,
            timeout_s=timeout_s,
            curve_secret_key=curve_secret_key,
            curve_server_key=curve_server_key,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="edgeorch-client", daemon=True
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
