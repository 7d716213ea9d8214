"""The coordinator's OpenAI-compatible HTTP gateway, Prometheus metrics and health checks.

``edgeorch coordinator --http HOST:PORT`` serves, from the coordinator's own event loop:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as server-sent
  events, ``data: {chunk}`` then ``data: [DONE]``; ``usage`` with the real token counts),
- ``GET /v1/models`` (the models live agents serve),
- ``GET /metrics`` (Prometheus text), ``GET /health`` (200 while an agent takes work, else 503)
  and ``GET /live`` (200 while the process serves).

How it submits: the gateway is an in-process client of the coordinator
(``Coordinator.connect_local``/``send_local``). Its ``Submit`` and ``CancelRequest`` messages are
handled by the very code that handles a ZeroMQ client's (admission, queue limit, draining,
idempotent request ids), and replies to its identity land in the request's asyncio queue. That
costs no socket hop or msgpack round trip per token, needs no client keys when the clients
endpoint requires CURVE, and works whatever address the clients endpoint is bound to.

Request mapping (``orchestrator.openai_requests``): OpenAI fields map onto
``GenerationParams``; unknown fields are ignored, features edgeorch lacks are refused by name
with 400. A named ``model`` must be one a live agent serves (404 otherwise) unless no agent is
live yet, in which case the request waits for one like any other.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, mapped by type
(``orchestrator.openai_responses.HTTP_ERRORS``); 503s carry ``Retry-After``. Every response
has ``X-Request-Id`` (the client's when it sent a valid one; it is also the coordinator's
request id, so it doubles as the idempotency key exactly as in the SDK), and every gateway log
line starts with it. When the HTTP client goes away before the result, the request is
cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from orchestrator.errors import (
    EdgeorchError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    Unauthorized,
    Unavailable,
    error_from_wire,
)
from orchestrator.metrics import METRICS_CONTENT_TYPE, CoordinatorMetrics
from orchestrator.openai_requests import Call, ModelView, parse_chat, parse_completion
from orchestrator.openai_responses import (
    UNAVAILABLE_RETRY_AFTER_S,
    chunk_body,
    envelope,
    error_body,
    error_response,
    final_body,
    sse,
    usage_of,
)
from orchestrator.protocol import (
    MAX_ID_CHARS,
    Accepted,
    CancelRequest,
    ErrorReply,
    Result,
    StreamChunk,
    Submit,
    WireModel,
)
from orchestrator.sessions import CoordinatorView
from orchestrator.settings import CoordinatorSettings
from orchestrator.textio import read_lines
from orchestrator.tokens import GgufTokenCounter

log = logging.getLogger("edgeorch.gateway")

MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""Largest request body read; a prompt is at most 1 MiB of text (``MAX_PROMPT_CHARS``)."""
GRACEFUL_SHUTDOWN_S: Final = 3
"""On stop, seconds uvicorn lets open connections finish before closing them."""
REQUEST_ID_PATTERN: Final = re.compile(rf"[!-~]{{1,{MAX_ID_CHARS}}}")
"""Client-given ``X-Request-Id``: visible ASCII, at most a wire id's length."""
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
QUIET_PATHS: Final = frozenset({"/metrics", "/health", "/live"})
"""Probes and scrapes are logged at DEBUG, not INFO."""

# --- settings -------------------------------------------------------------------------------


def parse_http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6, ``:8000`` for every interface) -> (host, port)."""
    host, sep, port_text = text.strip().removeprefix("http://").rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise InvalidRequest(
            f"http must be HOST:PORT, e.g. 127.0.0.1:8000; got {text!r}", field="http"
        )
    return host.strip("[]") or "0.0.0.0", int(port_text)


def load_api_keys(settings: CoordinatorSettings) -> tuple[str, ...]:
    """The bearer keys from ``http_api_keys`` and ``http_api_keys_file``; empty: no auth."""
    keys = [k.strip() for k in (settings.http_api_keys or "").split(",") if k.strip()]
    if settings.http_api_keys_file:
        path = Path(settings.http_api_keys_file)
        try:
            lines = read_lines(path)
        except OSError as exc:
            raise InvalidRequest(
                f"cannot read HTTP keys file {path}: {exc.strerror}", field="http_api_keys_file"
            ) from None
        from_file = [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]
        if not from_file:
            raise InvalidRequest(f"HTTP keys file {path} holds no keys", field="http_api_keys_file")
        keys += from_file
    return tuple(keys)


class _Disconnected:
    """Put into a request's inbox when its HTTP client went away."""


DISCONNECTED: Final = _Disconnected()
Reply = Accepted | StreamChunk | Result | ErrorReply | EdgeorchError | _Disconnected


class _ClientGone(Exception):
    pass


@dataclass(slots=True)
class _Flight:
    """A submitted request while its HTTP exchange lasts."""

    request_id: str
    inbox: asyncio.Queue[Reply]
    watcher: asyncio.Task[None]
    ended: bool = False
    """The coordinator is done with it (result or error): nothing to cancel."""
    accepted: bool = False
    """The coordinator admitted it (a cancel before that would find no request)."""


class _EventStream(StreamingResponse):
    """Server-sent events that always run ``cleanup`` when the exchange ends, however it
    ends (finished, client gone, server stopping)."""

    def __init__(self, events: AsyncIterator[bytes], cleanup: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the coordinator's loop owns SIGINT (stop) and
    SIGTERM (drain)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# --- the gateway ----------------------------------------------------------------------------


class Gateway:
    """The HTTP server of one coordinator (an ASGI app; ``serve`` runs it)."""

    def __init__(self, coordinator: CoordinatorView, metrics: CoordinatorMetrics) -> None:
        settings = coordinator.settings
        assert settings.http is not None
        self._coordinator = coordinator
        self._metrics = metrics
        self._keys = tuple(k.encode() for k in load_api_keys(settings))
        self._identity = coordinator.connect_local(self._deliver)
        self._flights: dict[str, _Flight] = {}
        self._cancel_when_accepted: set[str] = set()
        self._started = int(time.time())
        host, port = parse_http_address(settings.http)
        self._socket = _listen(host, port)
        self.host, self.port = host, int(self._socket.getsockname()[1])
        self._app = Starlette(
            routes=[
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/metrics", self._metrics_page, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/live", self._live, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception},
        )
        self._routes = frozenset(
            r.path for r in self._app.routes if isinstance(r, Route) and "{" not in r.path
        )
        config = uvicorn.Config(
            self,
            lifespan="off",
            ws="none",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self._server = _EmbeddedServer(config)

    async def serve(self) -> None:
        """Serve until cancelled; then end open requests and shut down gracefully."""
        log.info("HTTP gateway listening on http://%s:%d", self.host, self.port)
        task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            for flight in list(self._flights.values()):
                flight.inbox.put_nowait(Unavailable("the coordinator is stopping"))
            self._server.should_exit = True
            await task
            raise
        finally:
            self._socket.close()

    def close(self) -> None:
        """Release the listening socket of a gateway that will not serve (``serve`` releases
        it when it ends)."""
        self._socket.close()

    # --- ASGI: request ids, access log, keys ----------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        scope["edgeorch.request_id"] = request_id
        path: str = scope["path"]
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [
                        *message.get("headers", []),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
            await send(message)

        try:
            if given and given != request_id:
                log.warning("%s replaces the invalid X-Request-Id %r", request_id, given[:200])
            if path.startswith("/v1/") and self._keys and not self._authorized(headers):
                self._metrics.refused(Unauthorized.code)
                error = Unauthorized("a valid API key is required: Authorization: Bearer KEY")
                await error_response(error)(scope, receive, send_with_id)
            else:
                await self._app(scope, receive, send_with_id)
        finally:
            route = path if path in self._routes else "other"
            self._metrics.http_requests.inc(route, str(status))
            log.log(
                logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                "%s %s %s -> %d in %.3f s",
                request_id,
                scope["method"],
                path,
                status,
                time.perf_counter() - started,
            )

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = key.strip().encode()
        # Compare with every key so the time taken does not tell which one nearly matched.
        return sum(hmac.compare_digest(given, k) for k in self._keys) > 0

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = InvalidRequest(f"{request.method} {request.url.path}: {exc.detail}")
        body = error_body(error, "invalid_request_error")
        body["error"]["code"] = "not_found" if exc.status_code == 404 else "method_not_allowed"
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    # --- routes -----------------------------------------------------------------------------

    async def _completions(self, request: Request) -> Response:
        return await self._guarded(request, parse_completion)

    async def _chat(self, request: Request) -> Response:
        return await self._guarded(request, parse_chat)

    async def _guarded(
        self, request: Request, parse: Callable[[Mapping[str, Any], ModelView], Call]
    ) -> Response:
        """``_generate``, with a bug answered as an OpenAI-shaped 500 rather than plain text."""
        try:
            return await self._generate(request, parse)
        except Exception:
            log.exception("%s failed with an internal error", request.scope["edgeorch.request_id"])
            return error_response(
                InternalError("internal error in the HTTP gateway; see the coordinator's log")
            )

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._model_cards()})

    async def _model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        card = next((c for c in self._model_cards() if c["id"] == wanted), None)
        if card is None:
            served = ", ".join(c["id"] for c in self._model_cards())
            error = ModelNotFound(f"model {wanted!r} is not served (served: {served})")
            return error_response(error)
        return JSONResponse(card)

    def _model_cards(self) -> list[dict[str, Any]]:
        agents: dict[str, list[int]] = {}
        for session in self._coordinator.agent_sessions():
            agents.setdefault(session.profile.model_name, []).append(session.profile.n_ctx)
        return [
            {
                "id": name,
                "object": "model",
                "created": self._started,
                "owned_by": "edgeorch",
                "max_model_len": max(contexts),
                "agents": len(contexts),
            }
            for name, contexts in sorted(agents.items())
        ]

    async def _metrics_page(self, request: Request) -> Response:
        return Response(self._metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    async def _health(self, request: Request) -> Response:
        serving = sum(not s.draining for s in self._coordinator.agent_sessions())
        draining = self._coordinator.draining
        healthy = serving > 0 and not draining
        return JSONResponse(
            {"status": "ok" if healthy else "unavailable", "agents": serving, "draining": draining},
            status_code=200 if healthy else 503,
            headers=None if healthy else {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    async def _live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    # --- generation -------------------------------------------------------------------------

    def _model_view(self) -> ModelView:
        served: dict[str, int] = {}
        for session in self._coordinator.agent_sessions():
            name, n_ctx = session.profile.model_name, session.profile.n_ctx
            served[name] = min(n_ctx, served.get(name, n_ctx))
        counter = self._coordinator.token_counter
        template = counter.chat_template if isinstance(counter, GgufTokenCounter) else None
        return ModelView(
            served=served,
            template=template,
            count_tokens=lambda text, model, chat: counter.count(text, model, chat=chat)[0],
        )

    async def _generate(
        self, request: Request, parse: Callable[[Mapping[str, Any], ModelView], Call]
    ) -> Response:
        request_id: str = request.scope["edgeorch.request_id"]
        try:
            call = parse(await _json_body(request), self._model_view())
            submit = _submit(request_id, call)
            if request_id in self._flights or request_id in self._cancel_when_accepted:
                raise InvalidRequest(
                    f"request {request_id} is already in flight", field="X-Request-Id"
                )
        except EdgeorchError as exc:
            self._metrics.refused(exc.code)
            log.info("%s refused: %s: %s", request_id, exc.code, exc.message)
            return error_response(exc)
        inbox: asyncio.Queue[Reply] = asyncio.Queue()
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, inbox))
        flight = _Flight(request_id, inbox, watcher)
        self._flights[request_id] = flight
        self._coordinator.send_local(self._identity, submit)
        handed_over = False
        try:
            first = await self._first_reply(flight, call.stream)
            if not call.stream:
                assert isinstance(first, Result)
                return JSONResponse(
                    final_body(call, request_id, first, call.model or self._served_by(first.agent))
                )
            handed_over = True
            return _EventStream(
                self._events(call, flight, first), functools.partial(self._end, flight)
            )
        except _ClientGone:
            return Response(status_code=499)
        except EdgeorchError as exc:
            log.info("%s failed: %s: %s", request_id, exc.code, exc.message)
            return error_response(exc)
        finally:
            if not handed_over:
                self._end(flight)

    async def _first_reply(self, flight: _Flight, stream: bool) -> StreamChunk | Result:
        """Wait past acceptance to the first text (streaming) or the result, so that refusals
        still get their HTTP status before any event is sent."""
        while True:
            reply = await self._next(flight)
            if isinstance(reply, Result) or (stream and isinstance(reply, StreamChunk)):
                return reply

    async def _next(self, flight: _Flight) -> Accepted | StreamChunk | Result:
        reply = await flight.inbox.get()
        if isinstance(reply, _Disconnected):
            raise _ClientGone
        if isinstance(reply, ErrorReply):
            flight.ended = True
            raise error_from_wire(reply.error.code, reply.error.message, reply.error.details)
        if isinstance(reply, EdgeorchError):
            raise reply
        if isinstance(reply, Result):
            flight.ended = True
        return reply

    async def _events(
        self, call: Call, flight: _Flight, first: StreamChunk | Result
    ) -> AsyncIterator[bytes]:
        request_id = flight.request_id
        streamed: list[str] = []
        strip = call.strip_leading
        reply: Accepted | StreamChunk | Result = first
        if call.kind == "chat":
            yield sse(chunk_body(call, request_id, {"role": "assistant", "content": ""}))
        try:
            while not isinstance(reply, Result):
                if isinstance(reply, StreamChunk):
                    streamed.append(reply.text)
                    text = reply.text.lstrip() if strip else reply.text
                    strip = strip and not text
                    if text:
                        yield sse(chunk_body(call, request_id, text))
                reply = await self._next(flight)
        except _ClientGone:
            return
        except EdgeorchError as exc:
            log.info("%s failed while streaming: %s: %s", request_id, exc.code, exc.message)
            yield sse(error_body(exc))
            yield sse("[DONE]")
            return
        sent = "".join(streamed)
        if reply.text.startswith(sent) and len(reply.text) > len(sent):
            # A re-attached request, or text the coordinator never streamed: send the rest.
            rest = reply.text[len(sent) :]
            rest = rest.lstrip() if strip else rest
            if rest:
                yield sse(chunk_body(call, request_id, rest))
        yield sse(chunk_body(call, request_id, None, reply.finish_reason))
        if call.include_usage:
            yield sse(
                {
                    **envelope(call, request_id, chunk=True),
                    "choices": [],
                    "usage": usage_of(reply),
                }
            )
        yield sse("[DONE]")

    def _served_by(self, agent_id: str) -> str:
        sessions = self._coordinator.agent_sessions()
        return next((s.profile.model_name for s in sessions if s.agent_id == agent_id), "")

    def _deliver(self, message: WireModel) -> None:
        """A reply from the coordinator to the gateway's identity."""
        if not isinstance(message, Accepted | StreamChunk | Result | ErrorReply):
            return
        request_id = message.request_id
        if request_id is None:
            return
        if request_id in self._cancel_when_accepted and not isinstance(message, StreamChunk):
            self._cancel_when_accepted.discard(request_id)
            if isinstance(message, Accepted):
                # Admitted after its client left (it was still being predicted): cancel it now,
                # from the loop rather than from inside the coordinator's admission.
                cancel = CancelRequest(request_id=request_id)
                asyncio.get_running_loop().call_soon(
                    self._coordinator.send_local, self._identity, cancel
                )
            return
        flight = self._flights.get(request_id)
        if flight is not None:
            flight.accepted = flight.accepted or isinstance(message, Accepted)
            flight.inbox.put_nowait(message)

    def _end(self, flight: _Flight) -> None:
        """The HTTP exchange is over: cancel the request if the coordinator still runs it."""
        flight.watcher.cancel()
        if self._flights.get(flight.request_id) is flight:
            del self._flights[flight.request_id]
        if not flight.ended:
            flight.ended = True
            log.info("%s: the client went away before the result; cancelling", flight.request_id)
            if not flight.accepted:
                self._cancel_when_accepted.add(flight.request_id)
            self._coordinator.send_local(
                self._identity, CancelRequest(request_id=flight.request_id)
            )


async def _watch_disconnect(receive: Receive, inbox: asyncio.Queue[Reply]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    inbox.put_nowait(DISCONNECTED)


async def _json_body(request: Request) -> Mapping[str, Any]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise InvalidRequest(
            f"body of {declared} bytes exceeds the limit of {MAX_BODY_BYTES}", field="body"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise InvalidRequest(f"body exceeds the limit of {MAX_BODY_BYTES} bytes", field="body")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}", field="body") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", field="body")
    return body


def _submit(request_id: str, call: Call) -> Submit:
    try:
        return Submit(
            request_id=request_id,
            prompt=call.prompt,
            params=call.params,
            stream=call.stream,
            conversation=call.conversation,
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else "request"
        raise InvalidRequest(f"invalid {name}: {first['msg']}", field=name) from None


def _listen(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn, so a bad address fails at startup with a clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InvalidRequest(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}", field="http"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InvalidRequest(
            f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc}", field="http"
        ) from None
    return sock
