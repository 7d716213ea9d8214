"""Wire messages and the msgpack codec.

Every frame is one msgpack map carrying ``v`` (the protocol version) and ``type`` (the tag of a
frozen, strict pydantic model). Each socket direction has its own tagged union and one
``TypeAdapter`` built at import. ``decode`` is total: it returns a message or a ``ProtocolError``
and never raises, so a hostile peer cannot crash a daemon. The ZeroMQ sockets are created with
``MAX_FRAME_BYTES`` as ``ZMQ_MAXMSGSIZE``, the same limit ``decode`` enforces before unpacking.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Final, Literal, NewType, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from orchestrator.errors import EdgeorchError, ProtocolError

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
MAX_PROMPT_CHARS: Final = 1024 * 1024
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_TOKENS_LIMIT: Final = 1 << 20
MAX_CONTAINER_ITEMS: Final = 10_000
MAX_TEMPERATURE: Final = 100.0
MAX_SEED: Final = (1 << 32) - 1
MAX_ID_CHARS: Final = 128
MAX_ERROR_CHARS: Final = 4096
"""Longest error message on the wire; longer ones (and string details) are cut to fit."""
MAX_ERROR_DETAILS: Final = 64
MAX_EARLIER_ANSWERS: Final = 256
"""Earlier answers a ``ConversationHint`` may list (the predictor reads the last few)."""
MAX_SEQS_LIMIT: Final = 256
"""Concurrent sequences an agent may advertise (the agent's ``--max-seqs`` bound): placement
tabulates a speed per batch size, so an unbounded value from a hostile peer would stall it."""

RequestId = NewType("RequestId", str)
AgentId = NewType("AgentId", str)
Priority = Literal["interactive", "batch"]
FinishReason = Literal["stop", "length", "cancelled"]
MAX_BACKEND_CHARS: Final = 32
Backend = Annotated[
    str, Field(min_length=1, max_length=MAX_BACKEND_CHARS, pattern=r"^[a-z][a-z0-9_-]*$")
]
"""An engine backend's registered name (``agents.backends.BACKENDS``): descriptive on the wire,
so a coordinator takes agents of backends newer than itself."""
WireId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
DetailValue = str | int | float | bool | None
DETAIL_TYPES: Final = (str, int, float, bool, type(None))


class WireModel(BaseModel):
    """Base of every wire message: immutable, no coercion, no unknown fields."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")


class GenerationParams(WireModel):
    """Sampling and length parameters, named as in OpenAI and vLLM."""

    max_tokens: int = Field(default=128, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=0.8, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...] = Field(
        default=(), max_length=MAX_STOP_STRINGS
    )
    ignore_eos: bool = False
    priority: Priority = "interactive"
    model: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    cache_prompt: bool = True
    """Reuse (and keep) the agent's cached KV of the longest matching token prefix, as
    llama-server's field of that name; false computes the whole prompt and parks nothing."""


class ErrorInfo(WireModel):
    """An ``EdgeorchError`` in transit."""

    code: str = Field(max_length=64)
    message: str = Field(max_length=MAX_ERROR_CHARS)
    retryable: bool
    details: dict[str, DetailValue] = Field(default_factory=dict, max_length=MAX_ERROR_DETAILS)

    @classmethod
    def of(cls, error: EdgeorchError) -> ErrorInfo:
        """The wire form of ``error``; a message or string detail that echoes a hostile
        peer's input is cut to ``MAX_ERROR_CHARS`` so the reply stays valid and small."""
        details = {
            k: v[:MAX_ERROR_CHARS] if isinstance(v, str) else v
            for k, v in itertools.islice(error.details.items(), MAX_ERROR_DETAILS)
            if isinstance(v, DETAIL_TYPES)
        }
        return cls(
            code=error.code,
            message=error.message[:MAX_ERROR_CHARS],
            retryable=error.retryable,
            details=details,
        )


class DeviceProfile(WireModel):
    """What an agent tells the coordinator about its device and engine at registration."""

    hostname: str
    backend: Backend
    cpu_cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    memory_total_bytes: int = Field(ge=0)
    memory_available_bytes: int = Field(ge=0)
    gpu_offload_supported: bool
    n_gpu_layers: int = Field(ge=0)
    model_name: str
    model_path: str | None = None
    n_ctx: int = Field(ge=1)
    kv_budget_tokens: int = Field(ge=1)
    max_seqs: int = Field(ge=1, le=MAX_SEQS_LIMIT)
    decode_tps: float | None = Field(default=None, gt=0)
    prefill_tps: float | None = Field(default=None, gt=0)
    decode_curve: tuple[tuple[int, float], ...] = Field(default=(), max_length=64)
    """Measured aggregate decode tokens/s at several numbers of concurrent sequences."""


# --- agent -> coordinator -------------------------------------------------------------------


class PromptCacheStats(WireModel):
    """An agent's prompt (KV prefix) cache: cells parked now, and prompt tokens since the
    agent started (counters; an agent that reports none sends zeros)."""

    parked_tokens: int = Field(default=0, ge=0)
    hits: int = Field(default=0, ge=0)
    reused_tokens: int = Field(default=0, ge=0)
    computed_tokens: int = Field(default=0, ge=0)
    spilled_tokens: int = Field(default=0, ge=0)
    """Of ``parked_tokens``, those spilled to disk."""
    spill_reads: int = Field(default=0, ge=0)
    spill_failures: int = Field(default=0, ge=0)


BlockHash = Annotated[int, Field(ge=-(2**63), lt=2**63)]


class PrefixReport(WireModel):
    """The prompt prefix blocks an agent holds (``core.prefix``): changes since its previous
    report, or (``snapshot``) all of them. Reports are numbered from 0 per connection, so the
    coordinator notices one it missed and waits for the next snapshot."""

    seq: int = Field(ge=0)
    block_tokens: int = Field(ge=1)
    snapshot: bool = False
    stored: tuple[BlockHash, ...] = Field(default=(), max_length=MAX_CONTAINER_ITEMS)
    removed: tuple[BlockHash, ...] = Field(default=(), max_length=MAX_CONTAINER_ITEMS)


class MeasuredSpeed(WireModel):
    """What an agent's engine achieved while serving (the registration's ``decode_curve`` and
    ``prefill_tps`` come from a short probe): aggregate decode tokens/s by sequences, prompt
    tokens/s."""

    decode_curve: tuple[tuple[int, float], ...] = Field(default=(), max_length=64)
    prefill_tps: float | None = Field(default=None, gt=0)


class Register(WireModel):
    type: Literal["register"] = "register"
    v: int = PROTOCOL_VERSION
    name: WireId
    profile: DeviceProfile


class Heartbeat(WireModel):
    """Liveness and load; ``draining`` asks the coordinator to send no new work."""

    type: Literal["heartbeat"] = "heartbeat"
    v: int = PROTOCOL_VERSION
    kv_used_tokens: int = Field(ge=0)
    running: tuple[WireId, ...] = Field(default=(), max_length=MAX_CONTAINER_ITEMS)
    draining: bool = False
    cache: PromptCacheStats = Field(default_factory=lambda: PromptCacheStats())
    speed: MeasuredSpeed | None = None
    """Speeds measured while serving; None until the engine measured any."""
    prefixes: PrefixReport | None = None
    """What changed in the prompt prefixes it holds; None: nothing changed, or it keeps none."""


class Goodbye(WireModel):
    """The agent is leaving after draining: forget it now rather than at the liveness bound."""

    type: Literal["goodbye"] = "goodbye"
    v: int = PROTOCOL_VERSION


class TokenChunk(WireModel):
    """Text of ``n_tokens`` new tokens of one attempt, in order, with their ids in the agent's
    model (so a later attempt on the same model resumes from exactly these tokens)."""

    type: Literal["chunk"] = "chunk"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)
    text: str
    n_tokens: int = Field(ge=0)
    token_ids: tuple[int, ...] = Field(default=(), max_length=MAX_CONTAINER_ITEMS)


class RunFinished(WireModel):
    """The attempt ended. ``text``, ``n_tokens`` and ``token_ids`` are its last tokens when
    they came with the end (as a ``TokenChunk`` would carry them): one frame instead of two."""

    type: Literal["finished"] = "finished"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: FinishReason
    prefill_s: float = Field(ge=0)
    decode_s: float = Field(ge=0)
    text: str = ""
    n_tokens: int = Field(default=0, ge=0)
    token_ids: tuple[int, ...] = Field(default=(), max_length=MAX_CONTAINER_ITEMS)


class RunFailed(WireModel):
    type: Literal["failed"] = "failed"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)
    error: ErrorInfo


# --- coordinator -> agent -------------------------------------------------------------------


class Welcome(WireModel):
    """Registration accepted; the agent adopts the coordinator's heartbeat timing, and calls
    the coordinator lost after ``heartbeat_liveness`` silent intervals."""

    type: Literal["welcome"] = "welcome"
    v: int = PROTOCOL_VERSION
    agent_id: WireId
    heartbeat_interval_s: float = Field(gt=0)
    heartbeat_liveness: int = Field(default=3, ge=1)


class Ping(WireModel):
    """Coordinator liveness: sent to an agent that got no other frame for an interval."""

    type: Literal["ping"] = "ping"
    v: int = PROTOCOL_VERSION


class Dispatch(WireModel):
    """Run one attempt. What earlier attempts generated is appended to the prompt and counts
    against ``params.max_tokens`` as ``resume_tokens``: as ``resume_token_ids`` when they came
    from ``resume_model`` and the agent serves it, else as ``resume_text`` re-tokenized."""

    type: Literal["dispatch"] = "dispatch"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    params: GenerationParams
    resume_text: str = ""
    resume_tokens: int = Field(default=0, ge=0)
    resume_token_ids: tuple[int, ...] = Field(default=(), max_length=MAX_TOKENS_LIMIT)
    resume_model: str | None = None
    kv_reservation_tokens: int | None = Field(default=None, ge=1)
    """KV cells the coordinator reserved (prompt included). The agent holds this much rather
    than the whole ``max_tokens``: the coordinator raises it as the run grows, or preempts."""


class Reregister(WireModel):
    """The coordinator does not know this agent (it restarted, or declared the agent dead):
    register again. In-flight work of the old registration was already requeued."""

    type: Literal["reregister"] = "reregister"
    v: int = PROTOCOL_VERSION


class CancelRun(WireModel):
    type: Literal["cancel"] = "cancel"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)


class Reserve(WireModel):
    """The coordinator lent cells this attempt reserved and has not used to another sequence
    on the agent: hold ``kv_reservation_tokens`` for it from now on (never less than it uses).
    Sent only for such a lowering: the agent needs no word of raises, it claims less than
    the coordinator then. An older agent drops the frame and holds its dispatch reservation."""

    type: Literal["reserve"] = "reserve"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    attempt: int = Field(ge=1)
    kv_reservation_tokens: int = Field(ge=1)


# --- client -> coordinator ------------------------------------------------------------------


class ConversationHint(WireModel):
    """What the length predictor reads of a chat request instead of its rendered prompt.

    A rendered chat starts with the system prompt or the first turn and ends in template
    markup, so the predictor's head-and-tail view of it misses the question; the latest user
    message and the lengths of the assistant's earlier answers predict the answer better
    (``orchestrator/predictor/conversation.py``). Scheduling only: the agent runs ``prompt``.
    """

    last_user: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    earlier_answer_tokens: tuple[Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)], ...] = Field(
        default=(), max_length=MAX_EARLIER_ANSWERS
    )
    """The assistant's earlier answers in this chat, oldest first, in the served model's
    tokens."""


class Submit(WireModel):
    """A generation request; ``request_id`` is chosen by the client and doubles as the
    idempotency key: submitting the same id again re-attaches to the same request."""

    type: Literal["submit"] = "submit"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    params: GenerationParams = GenerationParams()
    stream: bool = False
    conversation: ConversationHint | None = None


class CancelRequest(WireModel):
    type: Literal["cancel_request"] = "cancel_request"
    v: int = PROTOCOL_VERSION
    request_id: WireId


class StatusQuery(WireModel):
    """Ask for the cluster's status; with ``request_id``, the report lists only that request
    (still with its place in the whole queue), which is cheap enough to poll while waiting."""

    type: Literal["status_query"] = "status_query"
    v: int = PROTOCOL_VERSION
    query_id: WireId
    request_id: WireId | None = None


# --- coordinator -> client ------------------------------------------------------------------


class Accepted(WireModel):
    type: Literal["accepted"] = "accepted"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    queue_position: int = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    predicted_tokens: float | None = None


class StreamChunk(WireModel):
    """Streamed text starting at character ``offset`` of the output; ``index`` counts chunks
    sent to the current route. On a re-attach the coordinator resends the whole output so far
    at offset 0, and the client yields only the characters past what it already has."""

    type: Literal["stream"] = "stream"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    index: int = Field(ge=0)
    text: str
    offset: int = Field(ge=0)
    tokens: int = Field(default=0, ge=0)
    """Output tokens generated so far, this chunk's included (text alone cannot be counted)."""
    attempt: int = Field(default=1, ge=1)
    """The dispatch attempt running now (above 1 after a preemption or a failed agent)."""


class Result(WireModel):
    type: Literal["result"] = "result"
    v: int = PROTOCOL_VERSION
    request_id: WireId
    text: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    finish_reason: FinishReason
    queue_s: float = Field(ge=0)
    ttft_s: float = Field(ge=0)
    total_s: float = Field(ge=0)
    agent: str
    attempts: int = Field(ge=1)
    predicted_tokens: float | None = None


class ErrorReply(WireModel):
    type: Literal["error"] = "error"
    v: int = PROTOCOL_VERSION
    request_id: str | None = None
    error: ErrorInfo


class AgentStatus(WireModel):
    agent_id: str
    name: str
    profile: DeviceProfile
    running: int = Field(ge=0)
    kv_used_tokens: int = Field(ge=0)
    kv_reserved_tokens: int = Field(ge=0)
    last_seen_s: float = Field(ge=0)
    cache: PromptCacheStats = Field(default_factory=lambda: PromptCacheStats())
    draining: bool = False


class RequestStatus(WireModel):
    request_id: str
    state: str
    priority: Priority
    prompt_tokens: int = Field(ge=0)
    max_tokens: int = Field(ge=1)
    predicted_tokens: float | None = None
    age_s: float = Field(ge=0)
    agent_id: str | None = None
    attempt: int = Field(ge=1)
    generated_tokens: int = Field(ge=0)
    queue_position: int | None = Field(default=None, ge=0)
    """Requests ahead of this one in the policy's order (0: next); None once it runs."""
    eta_start_s: float | None = Field(default=None, ge=0)
    """Estimated seconds from the report until it starts (0 when running; None: unknown)."""
    eta_finish_s: float | None = Field(default=None, ge=0)
    """Estimated seconds from the report until it finishes (None: unknown)."""
    eta_agent_id: str | None = None
    """The agent the estimate expects it to run on."""


class StatusReport(WireModel):
    type: Literal["status"] = "status"
    v: int = PROTOCOL_VERSION
    query_id: str
    policy: str
    agents: tuple[AgentStatus, ...]
    queue: tuple[RequestStatus, ...]
    running: tuple[RequestStatus, ...]
    completed: int = Field(ge=0)
    failed: int = Field(ge=0)


AgentMessage = Annotated[
    Register | Heartbeat | TokenChunk | RunFinished | RunFailed | Goodbye,
    Field(discriminator="type"),
]
AgentCommand = Annotated[
    Welcome | Dispatch | CancelRun | Reserve | Reregister | Ping, Field(discriminator="type")
]
ClientMessage = Annotated[Submit | CancelRequest | StatusQuery, Field(discriminator="type")]
ClientReply = Annotated[
    Accepted | StreamChunk | Result | ErrorReply | StatusReport, Field(discriminator="type")
]

AGENT_MESSAGES: Final[TypeAdapter[AgentMessage]] = TypeAdapter(AgentMessage)
AGENT_COMMANDS: Final[TypeAdapter[AgentCommand]] = TypeAdapter(AgentCommand)
CLIENT_MESSAGES: Final[TypeAdapter[ClientMessage]] = TypeAdapter(ClientMessage)
CLIENT_REPLIES: Final[TypeAdapter[ClientReply]] = TypeAdapter(ClientReply)

T = TypeVar("T")


def encode(message: WireModel) -> bytes:
    """Serialise one message to a msgpack frame: its fields as ``model_dump`` gives them, read
    from the model itself (half the time of ``model_dump`` for a dispatch or a result)."""
    frame: bytes = msgpack.packb(message.__dict__, use_bin_type=True, default=_nested_fields)
    return frame


def _nested_fields(value: object) -> dict[str, Any]:
    """A nested message's fields (msgpack calls this for what it cannot pack itself)."""
    if isinstance(value, BaseModel):
        return value.__dict__
    raise TypeError(f"cannot put a {type(value).__name__} on the wire")


def decode(frame: bytes, adapter: TypeAdapter[T]) -> T | ProtocolError:
    """Parse a frame into a message of ``adapter``'s union, or say precisely why not.

    Schema failures name the offending field in ``details['field']`` and the message tag in
    ``details['type']`` so the coordinator can answer a client with a typed ``invalid_request``.
    """
    if len(frame) > MAX_FRAME_BYTES:
        return ProtocolError(
            f"frame of {len(frame)} bytes exceeds the limit of {MAX_FRAME_BYTES}",
            size_bytes=len(frame),
            limit_bytes=MAX_FRAME_BYTES,
        )
    try:
        raw = msgpack.unpackb(
            frame,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
        )
    except Exception as exc:
        return ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}")
    if not isinstance(raw, dict):
        return ProtocolError(f"frame must be a msgpack map, got {type(raw).__name__}")
    version = raw.get("v")
    if version != PROTOCOL_VERSION:
        return ProtocolError(
            f"protocol version {repr(version)[:MAX_ID_CHARS]} is not supported "
            f"(expected {PROTOCOL_VERSION})",
            version=version if isinstance(version, int) else None,
            expected=PROTOCOL_VERSION,
        )
    try:
        return adapter.validate_python(raw)
    except ValidationError as exc:
        return _schema_error(raw, exc)
    except Exception as exc:
        return ProtocolError(f"frame could not be validated: {type(exc).__name__}")


def _schema_error(raw: dict[Any, Any], exc: ValidationError) -> ProtocolError:
    first = exc.errors(include_url=False)[0]
    tag = _short(raw.get("type"))
    location = [str(part) for part in first["loc"]]
    if location and location[0] == tag:
        location = location[1:]
    field = ".".join(location)[:MAX_ID_CHARS] or "type"
    request_id = _short(raw.get("request_id"))
    return ProtocolError(
        f"invalid {tag if isinstance(tag, str) else 'message'}: {field}: {first['msg']}"[
            :MAX_ERROR_CHARS
        ],
        type=tag if isinstance(tag, str) else None,
        field=field,
        request_id=request_id if isinstance(request_id, str) else None,
        errors=exc.error_count(),
    )


def _short(value: object) -> str | None:
    """A string from a frame that is safe to echo in an error (an id or a tag), else None."""
    return value if isinstance(value, str) and len(value) <= MAX_ID_CHARS else None
