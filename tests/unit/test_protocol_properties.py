"""``decode`` is total: any bytes become a message of the socket's union or a ProtocolError,
never another exception (a hostile peer must not be able to crash a daemon)."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from orchestrator.errors import ProtocolError
from orchestrator.protocol import (
    AGENT_COMMANDS,
    AGENT_MESSAGES,
    CLIENT_MESSAGES,
    CLIENT_REPLIES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    ErrorInfo,
    ErrorReply,
    WireModel,
    decode,
    encode,
)
from tests.mutations import agent_frames, client_frames, encoded, mutate

ADAPTERS: list[TypeAdapter[Any]] = [AGENT_MESSAGES, AGENT_COMMANDS, CLIENT_MESSAGES, CLIENT_REPLIES]
VALID = encoded(client_frames()) + encoded(agent_frames())

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
message_like = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(PROTOCOL_VERSION), msgpack_values),
        "type": st.sampled_from(
            ["submit", "register", "heartbeat", "chunk", "finished", "failed", "dispatch"]
        )
        | msgpack_values,
    },
    optional={
        "request_id": st.text(max_size=200) | msgpack_values,
        "prompt": st.text(max_size=50) | msgpack_values,
        "params": st.dictionaries(
            st.sampled_from(["max_tokens", "temperature", "top_p", "stop", "seed", "x"]),
            msgpack_values,
        )
        | msgpack_values,
        "attempt": msgpack_values,
        "profile": msgpack_values,
    },
)


def _check(frame: bytes) -> None:
    """Decoding never raises, and the coordinator can always answer the error it gets."""
    for adapter in ADAPTERS:
        result = decode(frame, adapter)
        assert isinstance(result, ProtocolError | WireModel), type(result)
        if isinstance(result, ProtocolError):
            reply = encode(ErrorReply(error=ErrorInfo.of(result)))
            assert len(reply) < MAX_FRAME_BYTES // 100


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_to_a_message_or_a_protocol_error(frame: bytes) -> None:
    _check(frame)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message_like)
def test_any_msgpack_map_decodes_to_a_message_or_a_protocol_error(value: dict[str, Any]) -> None:
    _check(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.randoms(use_true_random=False))
def test_mutated_real_messages_decode_to_a_message_or_a_protocol_error(
    frame: bytes, rng: random.Random
) -> None:
    for part in mutate(frame, rng):
        _check(part)


@pytest.mark.parametrize("frame", VALID, ids=range(len(VALID)))
def test_the_fuzz_seeds_are_valid_messages(frame: bytes) -> None:
    assert any(isinstance(decode(frame, a), WireModel) for a in ADAPTERS)


def test_a_seeded_sweep_of_mutations_never_raises() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        for part in mutate(rng.choice(VALID), rng, allow_oversized=rng.random() < 0.01):
            _check(part)
