"""The gateway's pure parts: OpenAI request mapping, chat rendering, error mapping, settings; and
the coordinator's metrics hooks read back through the Prometheus exposition."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.coordinator import Coordinator
from orchestrator.errors import (
    AgentFailure,
    Cancelled,
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
from orchestrator.gateway import Gateway, load_api_keys, parse_http_address
from orchestrator.openai_requests import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    PLAIN_CHAT_STOPS,
    ModelView,
    parse_chat,
    parse_completion,
    render_chat,
)
from orchestrator.openai_responses import UNAVAILABLE_RETRY_AFTER_S, error_response
from orchestrator.protocol import Accepted, AgentId, CancelRequest, RequestId, Submit, WireModel
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings
from orchestrator.tokens import ChatTemplate
from tests.factories import profile, record

GEMMA_LIKE = ChatTemplate(
    model_name="templated",
    source=(
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    bos_token="<bos>",
    eos_token="<eos>",
)


def view(served: dict[str, int] | None = None, template: ChatTemplate | None = None) -> ModelView:
    """Served models with their contexts; prompts count one token per word plus BOS."""
    return ModelView(
        served={"fake": 4096} if served is None else served,
        template=template,
        count_tokens=lambda text, model, chat: 1 + len(text.split()),
    )


def test_completion_maps_openai_fields_onto_generation_params() -> None:
    call = parse_completion(
        {
            "model": "fake",
            "prompt": ["Once upon a time"],
            "max_tokens": 32.0,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": -1,
            "min_p": 0.2,
            "seed": 7,
            "stop": "\n",
            "ignore_eos": True,
            "priority": "batch",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "ignored",
            "frequency_penalty": 0,
            "n": 1,
            "logprobs": None,
            "some_future_field": {"x": 1},
        },
        view(),
    )
    p = call.params
    assert call.prompt == "Once upon a time" and call.stream and call.include_usage
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (32, 0.0, 0.5, 0, 0.2)
    assert (p.seed, p.stop, p.ignore_eos, p.priority, p.model) == (
        7,
        ("\n",),
        True,
        "batch",
        "fake",
    )
    assert call.model == "fake" and call.kind == "completion"


def test_completion_defaults_follow_openai_and_the_sdk() -> None:
    call = parse_completion({"prompt": "hi", "seed": None, "stop": None}, view())
    assert call.params.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    assert call.params.model is None and call.model == "fake"  # the only served model
    assert call.params.temperature == 0.8 and call.params.stop == ()
    assert call.params.cache_prompt
    assert not call.stream and not call.include_usage


def test_cache_prompt_false_opts_out_of_prefix_reuse_as_on_llama_server() -> None:
    assert not parse_completion({"prompt": "hi", "cache_prompt": False}, view()).params.cache_prompt


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"suffix": "tail"}, "suffix"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
    ],
)
def test_unsupported_features_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Unsupported) as error:
        parse_completion({"prompt": "hi", **body}, view())
    assert error.value.details["field"] == field
    assert error_response(error.value).status_code == 400


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0]",
        ),
    ],
)
def test_unsupported_chat_features_are_refused_by_name(body: dict[str, Any], field: str) -> None:
    with pytest.raises(Unsupported) as error:
        parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, view())
    assert error.value.details["field"] == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": 3}, "prompt"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 101}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": [1]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"priority": 5}, "priority"),
        ({"model": 5}, "model"),
        ({"cache_prompt": "no"}, "cache_prompt"),
    ],
)
def test_bad_values_are_invalid_requests_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_completion({"prompt": "hi", **body}, view())
    assert error.value.details["field"] == field
    assert not isinstance(error.value, Unsupported)


def test_a_model_no_live_agent_serves_is_not_found_unless_none_is_live() -> None:
    with pytest.raises(ModelNotFound) as error:
        parse_completion({"prompt": "hi", "model": "gpt-4o"}, view())
    assert error.value.details["served"] == "fake"
    assert error_response(error.value).status_code == 404
    waiting = parse_completion({"prompt": "hi", "model": "gpt-4o"}, view(served={}))
    assert waiting.params.model == "gpt-4o"  # waits for a capable agent like any request


def test_plain_chat_format_and_its_stop_strings() -> None:
    call = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Capital of France?"},
            ],
            "stop": ["END"],
        },
        view(),
    )
    assert call.prompt == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Capital of France?\nAssistant:"
    )
    assert call.params.stop == ("END", *PLAIN_CHAT_STOPS)
    assert call.strip_leading and call.kind == "chat"


def test_a_chat_tells_the_predictor_its_latest_question_and_earlier_answer_lengths() -> None:
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write a poem."},
        {"role": "assistant", "content": "Roses are red, violets are blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Now one about the sea."},
    ]
    call = parse_chat({"messages": turns}, view())
    assert call.conversation is not None
    assert call.conversation.last_user == "Now one about the sea."
    assert call.conversation.earlier_answer_tokens == (7, 2)  # one per word plus BOS
    first = parse_chat({"messages": turns[:2]}, view()).conversation
    assert first is not None and first.earlier_answer_tokens == ()
    assert parse_chat({"messages": turns[:1]}, view()).conversation is None


def test_chat_max_tokens_default_to_the_rest_of_the_smallest_context() -> None:
    messages = [{"role": "user", "content": "one two three"}]
    call = parse_chat({"messages": messages}, view(served={"fake": 100}))
    prompt_tokens = 1 + len(call.prompt.split())
    assert call.params.max_tokens == 100 - prompt_tokens
    explicit = parse_chat({"messages": messages, "max_completion_tokens": 9}, view())
    assert explicit.params.max_tokens == 9
    # Too long a prompt: max_tokens 1, and the coordinator answers context_overflow.
    assert parse_chat({"messages": messages}, view(served={"fake": 3})).params.max_tokens == 1


def test_chat_uses_the_models_template_when_the_coordinator_has_it() -> None:
    body = {
        "model": "templated",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
    }
    call = parse_chat(body, view(served={"templated": 4096}, template=GEMMA_LIKE))
    assert call.prompt == (
        "<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\n"
    )  # no leading <bos>: the agent adds BOS itself
    assert call.params.stop == () and not call.strip_leading
    other = parse_chat(
        {**body, "model": "fake"},
        view(served={"templated": 4096, "fake": 4096}, template=GEMMA_LIKE),
    )
    assert other.prompt.startswith("System: Be brief.")


def test_a_template_that_raises_is_an_invalid_request() -> None:
    strict = ChatTemplate(
        "templated", "{{ raise_exception('roles must alternate') }}", "<bos>", "<eos>"
    )
    with pytest.raises(InvalidRequest, match="roles must alternate"):
        render_chat([("user", "hi")], strict)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidRequest("bad", field="x"), 400, "invalid_request"),
        (ContextOverflow("long", prompt_tokens=5000, max_tokens=10, n_ctx=4096), 400,
         "context_length_exceeded"),
        (Unsupported("n", field="n"), 400, "unsupported"),
        (ModelNotFound("m"), 404, "model_not_found"),
        (ProtocolError("frame"), 400, "protocol_error"),
        (Unauthorized("key"), 401, "unauthorized"),
        (Overloaded("full", retry_after_s=2.5), 503, "overloaded"),
        (Unavailable("none"), 503, "unavailable"),
        (RequestTimeout("slow"), 504, "timeout"),
        (AgentFailure("crashes", attempts=3, limit=3), 502, "agent_failure"),
        (Cancelled("cancelled"), 500, "cancelled"),
        (InternalError("bug"), 500, "internal"),
    ],
)  # fmt: skip
def test_errors_map_by_type_to_status_and_openai_shape(
    error: EdgeorchError, status: int, code: str
) -> None:
    for sent in (error, error_from_wire(error.code, error.message, error.details)):
        response = error_response(sent)
        body = json.loads(bytes(response.body))
        assert response.status_code == status
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["code"] == code and body["error"]["message"] == error.message
        assert response.headers["x-should-retry"] == str(error.retryable).lower()
    retry_after = error_response(error).headers.get("retry-after")
    if isinstance(error, Overloaded):
        assert retry_after == "3"
    elif status == 503:
        assert retry_after == str(UNAVAILABLE_RETRY_AFTER_S)
    else:
        assert retry_after is None


def test_http_address_parsing() -> None:
    assert parse_http_address("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_http_address("[::1]:8080") == ("::1", 8080)
    assert parse_http_address(":9000") == ("0.0.0.0", 9000)
    assert parse_http_address("localhost:0") == ("localhost", 0)
    for bad in ("8000", "host:", "host:port", "host:70000"):
        with pytest.raises(InvalidRequest) as error:
            parse_http_address(bad)
        assert error.value.details["field"] == "http"


def test_api_keys_from_setting_and_file(tmp_path: Path) -> None:
    assert load_api_keys(CoordinatorSettings()) == ()
    keys = tmp_path / "keys"
    keys.write_text("# comment\n k-file-1 \n\nk-file-2\n")
    settings = CoordinatorSettings(http_api_keys="a, b,", http_api_keys_file=str(keys))
    assert load_api_keys(settings) == ("a", "b", "k-file-1", "k-file-2")
    keys.write_text("# only a comment\n")
    with pytest.raises(InvalidRequest, match="no keys"):
        load_api_keys(CoordinatorSettings(http_api_keys_file=str(keys)))
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_api_keys(CoordinatorSettings(http_api_keys_file=str(tmp_path / "missing")))


def _samples(coordinator: Coordinator) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = coordinator.metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_hooks_and_state_read_back_through_the_exposition() -> None:
    now = [100.0]
    coordinator = Coordinator(CoordinatorSettings(), clock=lambda: now[0])
    coordinator.add_agent(
        AgentSession(
            agent_id=AgentId("a1"),
            identity=b"id",
            name="a1",
            profile=profile(kv_budget_tokens=1000, decode_tps=50.0),
            last_seen_s=now[0],
            kv_used_tokens=250,
        ),
        now=0.0,
    )
    metrics = coordinator.metrics
    natural = record("natural", predicted_tokens=10.0, arrival_s=99.0)
    coordinator.table.add(natural)
    coordinator.table.add(record("waiting", arrival_s=99.5))
    coordinator.table.dispatch(RequestId("natural"), AgentId("a1"), 300, now=99.5)
    metrics.dispatched(natural, 99.5, "prefix_here")
    for at, n in ((99.75, 1), (100.0, 4), (100.5, 15)):
        first = natural.first_token_s is None
        coordinator.table.add_tokens(RequestId("natural"), " x" * n, n, at)
        metrics.tokens(natural, AgentId("a1"), n, first, at)
    samples = _samples(coordinator)
    assert samples[("edgeorch_requests_waiting", ())] == 1
    assert samples[("edgeorch_requests_running", ())] == 1
    agent = (("agent", "a1"), ("model", "fake"))
    assert samples[("edgeorch_agent_kv_usage_ratio", agent)] == 0.25
    assert samples[("edgeorch_agent_kv_reserved_tokens", agent)] == 300
    assert samples[("edgeorch_agent_decode_tokens_per_second", agent)] == 20 / 10.0
    assert samples[("edgeorch_queue_time_seconds_sum", ())] == 0.5
    assert samples[("edgeorch_time_to_first_token_seconds_sum", ())] == 0.75
    # 4 tokens 0.25 s after the first (1/16 s each), then 15 tokens 0.5 s later (1/30 s each).
    assert samples[("edgeorch_inter_token_latency_seconds_count", ())] == 19
    assert math.isclose(samples[("edgeorch_inter_token_latency_seconds_sum", ())], 0.75)

    coordinator.table.finish(RequestId("natural"), "stop", 101.0)
    metrics.finished(natural, 101.0)
    capped = record("capped", predicted_tokens=10.0, arrival_s=100.0)
    coordinator.table.add(capped)
    coordinator.table.dispatch(RequestId("capped"), AgentId("a1"), 300, now=100.0)
    coordinator.table.finish(RequestId("capped"), "length", 101.0)
    metrics.finished(capped, 101.0)
    samples = _samples(coordinator)
    assert samples[("edgeorch_request_duration_seconds_count", ())] == 2
    # Only the natural end teaches: 20 tokens against a predicted 10.
    assert samples[("edgeorch_predictor_abs_log_error_count", ())] == 1
    assert math.isclose(samples[("edgeorch_predictor_abs_log_error_sum", ())], math.log(2))
    assert samples[("edgeorch_predictor_abs_error_tokens_sum", ())] == 10
    assert samples[("edgeorch_requests_total", (("outcome", "completed"),))] == 2

    coordinator.table.dispatch(RequestId("waiting"), AgentId("a1"), 100, now=101.0)
    coordinator.table.requeue(RequestId("waiting"), agent_failed=True)
    metrics.requeued(RequestId("waiting"), "agent_died")
    record_again = coordinator.table.dispatch(RequestId("waiting"), AgentId("a1"), 100, now=102.0)
    metrics.dispatched(record_again, 102.0, "no_prefix")
    metrics.refused("overloaded")
    samples = _samples(coordinator)
    assert samples[("edgeorch_redispatches_total", (("reason", "agent_died"),))] == 1
    coordinator.table.reserve(RequestId("waiting"), 160)
    coordinator.table.reserve(RequestId("waiting"), 120)  # 40 cells lent to a neighbour
    assert _samples(coordinator)[("edgeorch_kv_lent_tokens_total", ())] == 40
    assert samples[("edgeorch_placements_total", (("prefix", "prefix_here"),))] == 1
    assert samples[("edgeorch_placements_total", (("prefix", "no_prefix"),))] == 1
    assert samples[("edgeorch_rejected_requests_total", (("reason", "overloaded"),))] == 1


class LocalLink:
    """The coordinator as the gateway sees it, but what the gateway sends is kept, not sent,
    and the gateway's deliver callback is kept for the test to call."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.sent: list[WireModel] = []
        self.delivered: list[Callable[[WireModel], None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.coordinator, name)

    def connect_local(self, deliver: Callable[[WireModel], None]) -> bytes:
        self.delivered.append(deliver)
        return self.coordinator.connect_local(deliver)

    def send_local(self, identity: bytes, message: Submit | CancelRequest) -> None:
        self.sent.append(message)


def test_a_request_admitted_after_its_client_left_is_cancelled_then() -> None:
    """With a predictor, admission waits for the prediction; a cancel sent before it finds no
    request, so the gateway cancels again when the acceptance arrives. Driven as an ASGI app:
    the client sends its request, then goes away before any reply."""

    async def scenario() -> None:
        coordinator = Coordinator(CoordinatorSettings(http="127.0.0.1:0"))
        local = LocalLink(coordinator)
        gateway = Gateway(local, coordinator.metrics)
        (deliver,) = local.delivered
        sent = local.sent
        leave = asyncio.Event()
        body = json.dumps({"prompt": "Say hi.", "max_tokens": 4}).encode()
        requests = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if requests:
                return requests.pop()
            await leave.wait()
            return {"type": "http.disconnect"}

        responses: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            responses.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"r1")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000),
        }
        try:
            exchange = asyncio.ensure_future(gateway(scope, receive, send))
            while not sent:
                await asyncio.sleep(0)
            assert [type(m) for m in sent] == [Submit]
            leave.set()  # the client went away before the acceptance
            await exchange
            assert responses[0]["status"] == 499
            assert sent[1:] == [CancelRequest(request_id="r1")]
            deliver(Accepted(request_id="r1", queue_position=0, prompt_tokens=3))
            await asyncio.sleep(0)
            assert sent[1:] == [CancelRequest(request_id="r1")] * 2
            deliver(Accepted(request_id="r1", queue_position=0, prompt_tokens=3))
            await asyncio.sleep(0)
            assert len(sent) == 3  # cancelled again only once
        finally:
            gateway.close()

    asyncio.run(scenario())
