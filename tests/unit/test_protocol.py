"""Wire messages: round trips, and every kind of malformed frame becomes a ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from pydantic import ValidationError

from orchestrator.errors import ContextOverflow, ProtocolError, error_from_wire
from orchestrator.protocol import (
    AGENT_COMMANDS,
    AGENT_MESSAGES,
    CLIENT_MESSAGES,
    CLIENT_REPLIES,
    MAX_ERROR_CHARS,
    MAX_FRAME_BYTES,
    MAX_SEQS_LIMIT,
    PROTOCOL_VERSION,
    Accepted,
    ConversationHint,
    Dispatch,
    ErrorInfo,
    ErrorReply,
    Heartbeat,
    Register,
    Reserve,
    Result,
    RunFailed,
    RunFinished,
    StatusQuery,
    Submit,
    TokenChunk,
    decode,
    encode,
)
from tests.factories import params, profile

ROUND_TRIPS = [
    (Register(name="a", profile=profile()), AGENT_MESSAGES),
    (Heartbeat(kv_used_tokens=5, running=("r1", "r2")), AGENT_MESSAGES),
    (TokenChunk(request_id="r", attempt=1, text="hé", n_tokens=1), AGENT_MESSAGES),
    (
        RunFinished(
            request_id="r",
            attempt=2,
            prompt_tokens=3,
            completion_tokens=4,
            finish_reason="length",
            prefill_s=0.1,
            decode_s=0.2,
        ),
        AGENT_MESSAGES,
    ),
    (
        RunFailed(
            request_id="r",
            attempt=1,
            error=ErrorInfo(
                code="context_overflow", message="m", retryable=False, details={"n_ctx": 8}
            ),
        ),
        AGENT_MESSAGES,
    ),
    (Dispatch(request_id="r", attempt=1, prompt="p", params=params(stop=("\n",))), AGENT_COMMANDS),
    (Reserve(request_id="r", attempt=2, kv_reservation_tokens=300), AGENT_COMMANDS),
    (Submit(request_id="r", prompt="p", params=params(seed=3), stream=True), CLIENT_MESSAGES),
    (
        Submit(
            request_id="r",
            prompt="<chat>",
            conversation=ConversationHint(last_user="and?", earlier_answer_tokens=(40, 7)),
        ),
        CLIENT_MESSAGES,
    ),
    (StatusQuery(query_id="q"), CLIENT_MESSAGES),
    (Accepted(request_id="r", queue_position=0, prompt_tokens=3), CLIENT_REPLIES),
    (
        Result(
            request_id="r",
            text="t",
            prompt_tokens=1,
            completion_tokens=1,
            finish_reason="stop",
            queue_s=0.0,
            ttft_s=0.1,
            total_s=0.2,
            agent="a",
            attempts=1,
        ),
        CLIENT_REPLIES,
    ),
    (
        ErrorReply(
            request_id=None, error=ErrorInfo(code="unavailable", message="m", retryable=True)
        ),
        CLIENT_REPLIES,
    ),
]


@pytest.mark.parametrize(("message", "adapter"), ROUND_TRIPS, ids=lambda m: getattr(m, "type", ""))
def test_round_trip(message, adapter) -> None:
    assert decode(encode(message), adapter) == message


@pytest.mark.parametrize(("message", "adapter"), ROUND_TRIPS, ids=lambda m: getattr(m, "type", ""))
def test_a_frame_holds_exactly_what_model_dump_gives(message, adapter) -> None:
    assert encode(message) == msgpack.packb(message.model_dump(), use_bin_type=True)


def test_a_value_msgpack_cannot_pack_is_refused() -> None:
    with pytest.raises(TypeError, match="cannot put a set on the wire"):
        encode(Heartbeat.model_construct(kv_used_tokens=1, running={"r1"}))


def _frame(**fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields})


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        msgpack.packb([1, 2, 3]),
        msgpack.packb("string"),
        msgpack.packb({"type": "submit"}),  # no version
        msgpack.packb({"v": 99, "type": "submit"}),
        _frame(type="nope"),
        _frame(type="submit", request_id="r", prompt="p", extra=1),  # unknown field
        _frame(type="submit", request_id="r", prompt=5),  # wrong type
        _frame(type="submit", request_id="r", prompt=""),  # empty prompt
        _frame(type="submit", request_id="r", prompt="p", params={"max_tokens": 0}),
        _frame(type="submit", request_id="r", prompt="p", params={"max_tokens": "5"}),
        _frame(type="submit", request_id="r", prompt="p", params={"temperature": -1.0}),
        _frame(type="submit", request_id=b"bytes", prompt="p"),
        _frame(type="submit", request_id="r", prompt="p", conversation={"last_user": ""}),
        _frame(
            type="submit",
            request_id="r",
            prompt="p",
            conversation={"last_user": "q", "earlier_answer_tokens": [-1]},
        ),
        _frame(
            type="submit",
            request_id="r",
            prompt="p",
            conversation={"last_user": "q", "earlier_answer_tokens": [1] * 257},
        ),
        msgpack.packb({1: 2}),
        msgpack.packb(msgpack.ExtType(1, b"x")),
        b"\x91" * 5000,  # deeply nested arrays
    ],
)
def test_malformed_frames_are_protocol_errors(frame: bytes) -> None:
    assert isinstance(decode(frame, CLIENT_MESSAGES), ProtocolError)


def test_oversized_frame_is_refused_before_unpacking() -> None:
    error = decode(b"\x00" * (MAX_FRAME_BYTES + 1), CLIENT_MESSAGES)
    assert isinstance(error, ProtocolError)
    assert error.details["size_bytes"] == MAX_FRAME_BYTES + 1


def test_schema_error_names_the_field() -> None:
    error = decode(
        _frame(type="submit", request_id="r9", prompt="p", params={"max_tokens": -3}),
        CLIENT_MESSAGES,
    )
    assert isinstance(error, ProtocolError)
    assert error.details["field"] == "params.max_tokens"
    assert error.details["request_id"] == "r9"


def test_messages_are_frozen() -> None:
    message = StatusQuery(query_id="q")
    with pytest.raises(ValidationError):
        message.query_id = "other"  # type: ignore[misc]


def test_float_fields_accept_integers_from_msgpack() -> None:
    frame = _frame(type="submit", request_id="r", prompt="p", params={"temperature": 0})
    message = decode(frame, CLIENT_MESSAGES)
    assert isinstance(message, Submit)
    assert message.params.temperature == 0.0


def test_error_details_named_like_constructor_arguments_survive_the_wire() -> None:
    error = error_from_wire("context_overflow", "too long", {"message": "peer's", "n_ctx": 8})
    assert isinstance(error, ContextOverflow)
    assert (error.message, error.details) == ("too long", {"message": "peer's", "n_ctx": 8})


def test_an_agent_cannot_advertise_an_absurd_batch_size() -> None:
    frame = encode(Register(name="a", profile=profile()))
    raw = msgpack.unpackb(frame)
    raw["profile"]["max_seqs"] = MAX_SEQS_LIMIT + 1
    error = decode(msgpack.packb(raw), AGENT_MESSAGES)
    assert isinstance(error, ProtocolError) and error.details["field"] == "profile.max_seqs"


def test_an_error_echoing_a_huge_tag_still_fits_a_reply() -> None:
    error = decode(_frame(type="y" * 1_000_000, request_id="r" * 1000), CLIENT_MESSAGES)
    assert isinstance(error, ProtocolError)
    assert error.details["type"] is None and error.details["request_id"] is None
    info = ErrorInfo.of(error)
    assert len(info.message) <= MAX_ERROR_CHARS
    assert len(encode(ErrorReply(error=info))) < 3 * MAX_ERROR_CHARS
