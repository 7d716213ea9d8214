"""OpenAI-shaped responses: bodies and stream chunks of completions and chats, server-sent
events, and errors mapped by type to a status code (``HTTP_ERRORS``; 503s carry Retry-After)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from starlette.responses import JSONResponse

from orchestrator.errors import (
    AgentFailure,
    ContextOverflow,
    EdgeorchError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    RequestTimeout,
    Unauthorized,
    Unavailable,
)
from orchestrator.openai_requests import Call
from orchestrator.protocol import Result

UNAVAILABLE_RETRY_AFTER_S: Final = 5
"""``Retry-After`` when no agent can take a request: an agent starts or rejoins in seconds."""
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
    return JSONResponse(error_body(error, kind), status_code=status, headers=headers)


def error_body(error: EdgeorchError, kind: str | None = None) -> dict[str, Any]:
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


def usage_of(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def sse(data: Mapping[str, Any] | str) -> bytes:
    if not isinstance(data, str):
        data = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def envelope(call: Call, request_id: str, *, chunk: bool) -> dict[str, Any]:
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


def chunk_body(
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
    body = {**envelope(call, request_id, chunk=True), "choices": [choice]}
    if call.include_usage:
        body["usage"] = None
    return body


def final_body(call: Call, request_id: str, result: Result, served_model: str) -> dict[str, Any]:
    """The whole response; ``served_model`` names the model when the request named none."""
    text = result.text.lstrip() if call.strip_leading else result.text
    choice: dict[str, Any] = {"index": 0}
    if call.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    choice["logprobs"] = None
    choice["finish_reason"] = result.finish_reason
    body = {**envelope(call, request_id, chunk=False), "choices": [choice]}
    if not call.model:
        body["model"] = served_model
    body["usage"] = usage_of(result)
    body["edgeorch"] = {
        "agent": result.agent,
        "attempts": result.attempts,
        "queue_s": result.queue_s,
        "ttft_s": result.ttft_s,
        "total_s": result.total_s,
        "predicted_tokens": result.predicted_tokens,
    }
    return body
