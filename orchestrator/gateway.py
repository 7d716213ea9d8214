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

Request mapping: OpenAI fields map onto ``GenerationParams`` (``max_tokens`` or
``max_completion_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``,
``ignore_eos``, and the extension ``priority``: ``interactive`` | ``batch``); fields left out
take the SDK's defaults (llama.cpp's sampling defaults), except ``max_tokens``: 16 for
completions (OpenAI's default) and, for chat, the rest of the smallest context among the agents
serving the model. Unknown fields are ignored; features edgeorch lacks are refused by name with
400 (``n``/``best_of`` > 1, ``tools``, ``logprobs``, ``echo``, ``suffix``, penalties,
``logit_bias``, non-text ``response_format``, batched or token-id prompts, non-text content).
A named ``model`` must be one a live agent serves (404 otherwise) unless no agent is live yet,
in which case the request waits for one like any other.

Chat prompts: with the GGUF's ``tokenizer.chat_template`` when the coordinator loaded that
model's vocabulary (``--tokenizer-model``), else the plain format documented at
``render_chat`` (the embedded default model, a base model, has no template).

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``, mapped by type
(``HTTP_ERRORS``); 503s carry ``Retry-After``. Every response has ``X-Request-Id`` (the client's
when it sent a valid one; it is also the coordinator's request id, so it doubles as the
idempotency key exactly as in the SDK), and every gateway log line starts with it. When the
HTTP client goes away before the result, the request is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import math
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from orchestrator.errors import (
    AgentFailure,
    ContextOverflow,
    EdgeorchError,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    Unsupported,
    error_from_wire,
)
from orchestrator.metrics import METRICS_CONTENT_TYPE
from orchestrator.protocol import (
    MAX_ID_CHARS,
    MAX_STOP_STRINGS,
    Accepted,
    CancelRequest,
    ErrorReply,
    GenerationParams,
    Result,
    StreamChunk,
    Submit,
    WireModel,
)
from orchestrator.settings import CoordinatorSettings
from orchestrator.textio import read_lines
from orchestrator.tokens import ChatTemplate, GgufTokenCounter

if TYPE_CHECKING:
    from orchestrator.coordinator import Coordinator

log = logging.getLogger("edgeorch.gateway")

DEFAULT_COMPLETION_MAX_TOKENS: Final = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""
MAX_BODY_BYTES: Final = 8 * 1024 * 1024
"""Largest request body read; a prompt is at most 1 MiB of text (``MAX_PROMPT_CHARS``)."""
UNAVAILABLE_RETRY_AFTER_S: Final = 5
"""``Retry-After`` when no agent can take a request: an agent starts or rejoins in seconds."""
GRACEFUL_SHUTDOWN_S: Final = 3
"""On stop, seconds uvicorn lets open connections finish before closing them."""
PLAIN_CHAT_LABELS: Final = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
}
PLAIN_CHAT_STOPS: Final = ("\nUser:", "\nSystem:")
"""Stop strings added to plain-format chats so a base model does not write the next turn."""
REQUEST_ID_PATTERN: Final = re.compile(rf"[!-~]{{1,{MAX_ID_CHARS}}}")
"""Client-given ``X-Request-Id``: visible ASCII, at most a wire id's length."""
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
QUIET_PATHS: Final = frozenset({"/metrics", "/health", "/live"})
"""Probes and scrapes are logged at DEBUG, not INFO."""

HTTP_ERRORS: Final[tuple[tuple[type[EdgeorchError], int, str], ...]] = (
    (Unauthorized, 401, "authentication_error"),
    (ModelNotFound, 404, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),  # ContextOverflow and Unsupported too
    (ProtocolError, 400, "invalid_request_error"),
    (Overloaded, 503, "server_error"),
    (Unavailable, 503, "server_error"),
    (RequestTimeout, 504, "server_error"),
    (AgentFailure, 502, "server_error"),
    (EdgeorchError, 500, "server_error"),  # Cancelled (by another client) and InternalError
)
"""Status code and OpenAI error type of each error class; the first match wins."""


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


# --- request parsing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the gateway knows of the served models when it parses a request."""

    served: Mapping[str, int]
    """Model name -> the smallest n_ctx among live agents serving it."""
    template: ChatTemplate | None
    count_tokens: Callable[[str, str | None], int]


@dataclass(slots=True)
class Call:
    """One parsed OpenAI request, ready to submit."""

    kind: Literal["completion", "chat"]
    prompt: str
    params: GenerationParams
    stream: bool
    include_usage: bool
    model: str
    strip_leading: bool = False
    """Plain-format chat: drop the whitespace the model writes after ``Assistant:``."""
    created: int = field(default_factory=lambda: int(time.time()))

    def response_id(self, request_id: str) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{request_id}"


def parse_completion(body: Mapping[str, Any], models: ModelView) -> Call:
    _refuse_unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(p, str) for p in prompt):
            raise Unsupported(
                f"batched prompts ({len(prompt)} in one request); send one request per prompt",
                field="prompt",
            )
        else:
            raise Unsupported("token-id prompts; send the prompt as text", field="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", field="prompt")
    model = _model(body, models)
    max_tokens = _int(body, "max_tokens")
    return Call(
        kind="completion",
        prompt=prompt,
        params=_params(
            body, model, max_tokens if max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        ),
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        model=model or _only_model(models) or "",
    )


def parse_chat(body: Mapping[str, Any], models: ModelView) -> Call:
    _refuse_unsupported(body, chat=True)
    messages = _messages(body)
    model = _model(body, models)
    target = model or _only_model(models)
    template = models.template
    if template is not None and template.model_name != target:
        template = None
    prompt, stops = render_chat(messages, template)
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _rest_of_context(prompt, target, models)
    return Call(
        kind="chat",
        prompt=prompt,
        params=_params(body, model, max_tokens, extra_stops=stops),
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        model=target or "",
        strip_leading=template is None,
    )


def render_chat(
    messages: Sequence[tuple[str, str]], template: ChatTemplate | None
) -> tuple[str, tuple[str, ...]]:
    """The prompt for ``messages`` ((role, text) pairs) and the stop strings it needs.

    With a template: the template rendered with ``add_generation_prompt`` (without a leading
    BOS text, which the agent adds itself). Without one, the plain format::

        System: <system or developer text>
        User: <text>
        Assistant: <text>
        User: <text>
        Assistant:

    one line per message, labels as in ``PLAIN_CHAT_LABELS``, with ``PLAIN_CHAT_STOPS`` as extra
    stop strings so the model's reply ends before it writes the next turn.
    """
    if template is None:
        lines = [f"{PLAIN_CHAT_LABELS[role]}: {text}" for role, text in messages]
        return "\n".join([*lines, "Assistant:"]), PLAIN_CHAT_STOPS
    import jinja2

    try:
        text = _compiled(template.source).render(
            messages=[
                {"role": "system" if role == "developer" else role, "content": content}
                for role, content in messages
            ],
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
            raise_exception=_template_refusal,
        )
    except jinja2.TemplateError as exc:
        raise InternalError(f"the chat template of {template.model_name} failed: {exc}") from None
    if template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token) :]
    return text, ()


@functools.lru_cache(maxsize=4)
def _compiled(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    return environment.from_string(source)


def _template_refusal(message: str) -> None:
    raise InvalidRequest(f"the model's chat template refused the messages: {message}")


def _refuse_unsupported(body: Mapping[str, Any], *, chat: bool) -> None:
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise Unsupported(
                f"{name}={value!r}: edgeorch returns one choice per request; send several "
                "requests instead",
                field=name,
            )
    for name in ("tools", "functions"):
        if body.get(name):
            raise Unsupported(f"{name}: tool and function calling are not supported", field=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise Unsupported(f"{name}: tool and function calling are not supported", field=name)
    logprobs = body.get("logprobs")
    if logprobs not in (None, False) and not (chat is False and logprobs == 0):
        raise Unsupported("logprobs are not supported", field="logprobs")
    if body.get("top_logprobs"):
        raise Unsupported("logprobs are not supported", field="top_logprobs")
    if not chat and body.get("echo"):
        raise Unsupported("echo is not supported; prepend the prompt yourself", field="echo")
    if not chat and body.get("suffix"):
        raise Unsupported("suffix (insertion) is not supported", field="suffix")
    for name, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("repetition_penalty", 1),
    ):
        if body.get(name) not in (None, neutral):
            raise Unsupported(f"{name} is not supported", field=name)
    if body.get("logit_bias"):
        raise Unsupported("logit_bias is not supported", field="logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise Unsupported(
            "response_format other than text is not supported", field="response_format"
        )


def _messages(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", field="messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", field=where)
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls"):
            raise Unsupported(f"{where}: tool messages are not supported", field=where)
        if role not in PLAIN_CHAT_LABELS:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(PLAIN_CHAT_LABELS)}; got {role!r}",
                field=f"{where}.role",
            )
        parsed.append((str(role), _content(message.get("content"), where)))
    return parsed


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list", field=where)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str):
            raise Unsupported(f"{where}: {kind} content is not supported", field=where)
        else:
            raise InvalidRequest(f"{where}.content has a malformed part", field=where)
    return "".join(texts)


def _model(body: Mapping[str, Any], models: ModelView) -> str | None:
    model = body.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string", field="model")
    if models.served and model not in models.served:
        served = ", ".join(sorted(models.served))
        raise ModelNotFound(
            f"model {model!r} is not served by any live agent (served: {served})",
            field="model",
            model=model,
            served=served,
        )
    return model


def _only_model(models: ModelView) -> str | None:
    return next(iter(models.served)) if len(models.served) == 1 else None


def _rest_of_context(prompt: str, model: str | None, models: ModelView) -> int:
    """Chat's default max_tokens: what the prompt leaves of the smallest context that serves
    it (the coordinator refuses, with the numbers, if that is nothing)."""
    contexts = list(models.served.values())
    if model is not None and model in models.served:
        contexts = [models.served[model]]
    if not contexts:
        return GenerationParams().max_tokens
    return max(1, min(contexts) - models.count_tokens(prompt, model))


def _params(
    body: Mapping[str, Any],
    model: str | None,
    max_tokens: int,
    *,
    extra_stops: tuple[str, ...] = (),
) -> GenerationParams:
    fields: dict[str, Any] = {"max_tokens": max_tokens, "model": model}
    for name in ("temperature", "top_p", "min_p"):
        value = _float(body, name)
        if value is not None:
            fields[name] = value
    for name in ("top_k", "seed"):
        value = _int(body, name)
        if value is not None:
            fields[name] = value
    if fields.get("top_k") == -1:
        fields["top_k"] = 0  # vLLM's "no top-k"
    fields["ignore_eos"] = _bool(body, "ignore_eos")
    fields["cache_prompt"] = _bool(body, "cache_prompt", default=True)
    priority = body.get("priority")
    if priority is not None:
        if priority not in ("interactive", "batch"):
            raise InvalidRequest(
                f"priority must be 'interactive' or 'batch'; got {priority!r}", field="priority"
            )
        fields["priority"] = priority
    stops = _stops(body)
    fields["stop"] = (*stops, *(s for s in extra_stops if s not in stops))[
        : max(len(stops), MAX_STOP_STRINGS)
    ]
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else "request"
        raise InvalidRequest(f"invalid {name}: {first['msg']}", field=name) from None


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings", field="stop")
    return tuple(s for s in stop if s)


def _int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer; got {value!r}", field=name)
    return value


def _float(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number; got {value!r}", field=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, *, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false; got {value!r}", field=name)
    return value


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- responses ------------------------------------------------------------------------------


def error_response(error: EdgeorchError, request_id: str | None = None) -> JSONResponse:
    """The OpenAI-shaped error for ``error``, with its status code and, for 503, Retry-After."""
    status, kind = next((s, k) for cls, s, k in HTTP_ERRORS if isinstance(error, cls))
    # OpenAI's SDKs obey x-should-retry: never re-run a request that keeps killing agents.
    headers = {"x-should-retry": "true" if error.retryable else "false"}
    if isinstance(error, Overloaded):
        retry = error.details.get("retry_after_s")
        headers["Retry-After"] = str(
            max(1, math.ceil(retry if isinstance(retry, int | float) else 1))
        )
    elif status == 503:
        headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
    elif isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(_error_body(error, kind), status_code=status, headers=headers)


def _error_body(error: EdgeorchError, kind: str | None = None) -> dict[str, Any]:
    if kind is None:
        kind = next(k for cls, _, k in HTTP_ERRORS if isinstance(error, cls))
    param = error.details.get("field")
    return {
        "error": {
            "message": error.message,
            "type": kind,
            "param": param if isinstance(param, str) else None,
            "code": "context_length_exceeded" if isinstance(error, ContextOverflow) else error.code,
        }
    }


def _usage(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _sse(data: Mapping[str, Any] | str) -> bytes:
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


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

    def __init__(self, coordinator: Coordinator) -> None:
        settings = coordinator.settings
        assert settings.http is not None
        self._coordinator = coordinator
        self._metrics = coordinator.metrics
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
            self._metrics.http_requests.labels(route=route, status=str(status)).inc()
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
        body = _error_body(error, "invalid_request_error")
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
            count_tokens=lambda text, model: counter.count(text, model)[0],
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
                return JSONResponse(self._final_body(call, request_id, first))
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
            yield _sse(self._chunk(call, request_id, {"role": "assistant", "content": ""}))
        try:
            while not isinstance(reply, Result):
                if isinstance(reply, StreamChunk):
                    streamed.append(reply.text)
                    text = reply.text.lstrip() if strip else reply.text
                    strip = strip and not text
                    if text:
                        yield _sse(self._chunk(call, request_id, text))
                reply = await self._next(flight)
        except _ClientGone:
            return
        except EdgeorchError as exc:
            log.info("%s failed while streaming: %s: %s", request_id, exc.code, exc.message)
            yield _sse(_error_body(exc))
            yield _sse("[DONE]")
            return
        sent = "".join(streamed)
        if reply.text.startswith(sent) and len(reply.text) > len(sent):
            # A re-attached request, or text the coordinator never streamed: send the rest.
            rest = reply.text[len(sent) :]
            rest = rest.lstrip() if strip else rest
            if rest:
                yield _sse(self._chunk(call, request_id, rest))
        yield _sse(self._chunk(call, request_id, None, reply.finish_reason))
        if call.include_usage:
            yield _sse(
                {
                    **self._envelope(call, request_id, chunk=True),
                    "choices": [],
                    "usage": _usage(reply),
                }
            )
        yield _sse("[DONE]")

    def _envelope(self, call: Call, request_id: str, *, chunk: bool) -> dict[str, Any]:
        kind = (
            ("chat.completion.chunk" if chunk else "chat.completion")
            if call.kind == "chat"
            else "text_completion"
        )
        return {
            "id": call.response_id(request_id),
            "object": kind,
            "created": call.created,
            "model": call.model,
        }

    def _chunk(
        self,
        call: Call,
        request_id: str,
        content: str | dict[str, str] | None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if call.kind == "chat":
            choice["delta"] = (
                content
                if isinstance(content, dict)
                else ({} if content is None else {"content": content})
            )
        else:
            choice["text"] = content if isinstance(content, str) else ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        body = {**self._envelope(call, request_id, chunk=True), "choices": [choice]}
        if call.include_usage:
            body["usage"] = None
        return body

    def _final_body(self, call: Call, request_id: str, result: Result) -> dict[str, Any]:
        text = result.text.lstrip() if call.strip_leading else result.text
        choice: dict[str, Any] = {"index": 0}
        if call.kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = result.finish_reason
        body = {**self._envelope(call, request_id, chunk=False), "choices": [choice]}
        if not call.model:
            body["model"] = self._served_by(result.agent)
        body["usage"] = _usage(result)
        body["edgeorch"] = {
            "agent": result.agent,
            "attempts": result.attempts,
            "queue_s": result.queue_s,
            "ttft_s": result.ttft_s,
            "total_s": result.total_s,
            "predicted_tokens": result.predicted_tokens,
        }
        return body

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
            request_id=request_id, prompt=call.prompt, params=call.params, stream=call.stream
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
