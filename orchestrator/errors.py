"""The one error tree of edgeorch.

Every failure a user can see is an ``EdgeorchError`` with a stable wire ``code`` and a
``retryable`` flag, so the SDK, the CLI and (later) the HTTP gateway map errors by type, never by
matching message text::

    EdgeorchError
    ├── InvalidRequest            invalid_request      bad parameters, empty prompt, unknown fields
    │   ├── ContextOverflow       context_overflow     prompt + max_tokens beyond the context
    │   ├── Unsupported           unsupported          a known feature edgeorch does not offer
    │   └── ModelNotFound         model_not_found      no live agent serves the named model
    ├── ProtocolError             protocol_error       a frame that is not a valid message
    ├── Unavailable               unavailable          no capable agent within the timeout (retry)
    ├── Overloaded                overloaded           the queue is full (retry after a while)
    ├── AgentFailure              agent_failure        the request kept killing its agents
    ├── Cancelled                 cancelled            cancelled by the client or on shutdown
    ├── RequestTimeout            timeout              the client gave up waiting
    ├── Unauthorized              unauthorized         a refused CURVE key or HTTP API key
    └── InternalError             internal             a bug: please report it

An error crosses the wire as ``(code, message, retryable, details)``; ``error_from_wire`` rebuilds
the same class on the other side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


class EdgeorchError(Exception):
    """Base of every edgeorch error; ``details`` carries the numbers that explain it."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, details={self.details!r})"


class InvalidRequest(EdgeorchError):
    """The request can never succeed as sent; ``details['field']`` names the culprit."""

    code = "invalid_request"


class ContextOverflow(InvalidRequest):
    """Prompt tokens plus max_tokens exceed the context of every capable agent."""

    code = "context_overflow"


class Unsupported(InvalidRequest):
    """A valid request for a feature edgeorch does not offer (e.g. ``n`` > 1, tools)."""

    code = "unsupported"


class ModelNotFound(InvalidRequest):
    """The request names a model that no live agent serves; ``details['served']`` lists them."""

    code = "model_not_found"


class ProtocolError(EdgeorchError):
    """A frame that does not decode to a valid message of the expected union."""

    code = "protocol_error"


class Unavailable(EdgeorchError):
    """No agent able to run the request appeared within the timeout."""

    code = "unavailable"
    retryable = True


class Overloaded(EdgeorchError):
    """The coordinator's queue is full; ``details['retry_after_s']`` says when to retry."""

    code = "overloaded"
    retryable = True


class AgentFailure(EdgeorchError):
    """The request failed on agents too many times (it may be what crashes them)."""

    code = "agent_failure"


class Cancelled(EdgeorchError):
    """The request was cancelled before it finished."""

    code = "cancelled"


class RequestTimeout(EdgeorchError):
    """The caller's deadline passed before a result arrived."""

    code = "timeout"
    retryable = True


class Unauthorized(EdgeorchError):
    """The peer could not prove who it is: a CURVE handshake refused (no key, a key not on the
    allow list, a wrong server key) or an HTTP request without a valid API key. Retrying does
    not help until the keys are fixed."""

    code = "unauthorized"


class InternalError(EdgeorchError):
    """An unexpected failure inside edgeorch."""

    code = "internal"


ERRORS_BY_CODE: Mapping[str, type[EdgeorchError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        ContextOverflow,
        Unsupported,
        ModelNotFound,
        ProtocolError,
        Unavailable,
        Overloaded,
        AgentFailure,
        Cancelled,
        RequestTimeout,
        Unauthorized,
        InternalError,
    )
}


def error_from_wire(code: str, message: str, details: Mapping[str, Any]) -> EdgeorchError:
    """Rebuild the typed error a peer sent; an unknown code becomes ``InternalError``. Details
    are set after construction, so a peer's detail named like a constructor argument
    (``message``) cannot turn a typed error into a ``TypeError``."""
    error = ERRORS_BY_CODE.get(code, InternalError)(message)
    error.details = dict(details)
    return error
