"""Bad input gets a typed, non-retryable error with the numbers that explain it: absurd
parameters name their field, and the context check's boundary is exact."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from orchestrator.client import Client
from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.placement import LeastLoaded
from orchestrator.core.policies import FirstComeFirstServed
from orchestrator.core.scheduler import decide
from orchestrator.core.views import DispatchAction, RejectAction, Snapshot
from orchestrator.errors import ContextOverflow, InvalidRequest, ProtocolError
from orchestrator.protocol import CLIENT_MESSAGES, MAX_CONTAINER_ITEMS, PROTOCOL_VERSION, decode
from orchestrator.replies import client_facing
from tests.bad_inputs import BAD_FIELDS, BAD_PARAMS, case_id
from tests.factories import agent, queued

N_CTX = 64
CONFIG = SchedulerConfig(
    policy=FirstComeFirstServed(), placement=LeastLoaded(), unavailable_timeout_s=5.0
)


def _submit(**fields: Any) -> bytes:
    frame: bytes = msgpack.packb(
        {"v": PROTOCOL_VERSION, "type": "submit", "request_id": "r1", "prompt": "hi", **fields}
    )
    return frame


@pytest.mark.parametrize(("params", "field"), BAD_PARAMS, ids=map(case_id, BAD_PARAMS))
def test_absurd_parameters_are_invalid_requests_naming_the_field(
    params: dict[str, Any], field: str
) -> None:
    error = decode(_submit(params=params), CLIENT_MESSAGES)
    assert isinstance(error, ProtocolError)
    reply = client_facing(error)
    assert isinstance(reply, InvalidRequest) and not reply.retryable
    assert (reply.details["field"], reply.details["request_id"]) == (field, "r1")


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS, ids=map(case_id, BAD_FIELDS))
def test_bad_request_fields_are_invalid_requests_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    reply = client_facing(decode(_submit(**fields), CLIENT_MESSAGES))  # type: ignore[arg-type]
    assert isinstance(reply, InvalidRequest) and reply.details["field"] == field


def test_a_stop_list_beyond_the_container_limit_is_refused_before_parsing() -> None:
    error = decode(_submit(params={"stop": ["x"] * (MAX_CONTAINER_ITEMS + 1)}), CLIENT_MESSAGES)
    assert isinstance(error, ProtocolError) and "msgpack" in error.message


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**12}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"stop": ["s"] * 17}, "stop"),
        ({"seed": -5}, "seed"),
    ],
)
def test_the_sdk_names_the_field_before_sending(options: dict[str, Any], field: str) -> None:
    with Client("tcp://127.0.0.1:9", timeout_s=1) as client, pytest.raises(InvalidRequest) as err:
        client.generate("hi", **options)
    assert err.value.details["field"] == field


@pytest.mark.parametrize(
    ("max_tokens", "fits"), [(N_CTX - 11, True), (N_CTX - 10, True), (N_CTX - 9, False)]
)
def test_context_overflow_boundary_with_an_exact_prompt_count(max_tokens: int, fits: bool) -> None:
    """prompt + max_tokens == n_ctx still fits (the last cell is usable); one more overflows."""
    request = queued("r1", prompt_tokens=10, prompt_tokens_exact=True, max_tokens=max_tokens)
    snapshot = Snapshot(
        queue=(request,), agents=(agent("a1", n_ctx=N_CTX, kv_budget_tokens=4 * N_CTX),)
    )
    (action,) = decide(snapshot, 0.0, CONFIG)
    if fits:
        assert isinstance(action, DispatchAction)
        return
    assert isinstance(action, RejectAction) and isinstance(action.error, ContextOverflow)
    assert action.error.details == {"prompt_tokens": 10, "max_tokens": max_tokens, "n_ctx": N_CTX}
    assert not action.error.retryable


def test_an_estimated_prompt_count_is_left_to_the_agent_at_the_boundary() -> None:
    request = queued("r1", prompt_tokens=10, prompt_tokens_exact=False, max_tokens=N_CTX)
    snapshot = Snapshot(queue=(request,), agents=(agent("a1", n_ctx=N_CTX),))
    (action,) = decide(snapshot, 0.0, CONFIG)
    assert isinstance(action, DispatchAction) and action.kv_reservation_tokens == N_CTX
