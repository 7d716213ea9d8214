"""The OpenAI-compatible HTTP gateway of a real coordinator process with real fake-backend agent
processes, driven by the real ``openai`` package, httpx and curl."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.backends.fake.engine import fake_completion
from orchestrator.local import LocalCluster, free_port

pytestmark = pytest.mark.integration

FAST = ("--backend", "fake", "--fake-decode-tps", "400", "--fake-prefill-tps", "20000")
SLOW = ("--backend", "fake", "--fake-decode-tps", "20", "--model-name", "slow")
WAIT_S = 30.0


class Gateway:
    """A LocalCluster with ``--http`` and the base URL to reach it."""

    def __init__(self, path: Path, *coordinator_args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cluster = LocalCluster(path, "--http", f"127.0.0.1:{self.port}", *coordinator_args)
        wait_until(lambda: _live(self.url), f"gateway at {self.url}", self.cluster)

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=WAIT_S
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics by (name, sorted labels)."""
        text = httpx.get(f"{self.url}/metrics", timeout=WAIT_S).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> None:
        self.cluster.stop()


def _live(url: str) -> bool:
    try:
        return httpx.get(f"{url}/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(check: Callable[[], bool], what: str, cluster: LocalCluster) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {WAIT_S} s:\n{cluster.all_logs()}")


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One coordinator with a fast fake agent (model "fake", 256-token context) and a slow one
    (model "slow") shared by the tests below; each test names the model it wants."""
    served = Gateway(tmp_path_factory.mktemp("gateway"))
    try:
        served.cluster.start_agent("fast", *FAST, "--n-ctx", "256")
        served.cluster.start_agent("slow", *SLOW)
        served.cluster.wait_for_agents(2)
        yield served
    finally:
        served.stop()


def test_openai_client_completions_streamed_and_not(gateway: Gateway) -> None:
    client = gateway.openai()
    prompt = "alpha beta gamma"
    completion = client.completions.create(
        model="fake",
        prompt=prompt,
        max_tokens=7,
        extra_headers={"X-Request-Id": "client-chosen-1"},
        extra_body={"priority": "batch", "top_k": 20, "min_p": 0.1},
        user="ignored-field",
    )
    assert completion.choices[0].text == fake_completion(prompt, 7)
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "fake"
    assert completion.id == "cmpl-client-chosen-1"
    assert completion._request_id == "client-chosen-1"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 7)
    assert completion.usage.total_tokens == 11

    stream = client.completions.create(
        model="fake",
        prompt=prompt,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == fake_completion(prompt, 7)
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_openai_client_chat_streamed_and_not(gateway: Gateway) -> None:
    client = gateway.openai()
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
    ]
    # The plain chat format (the fake model has no template): the fake echoes the prompt's words.
    prompt = "System: Be brief.\nUser: Name a colour.\nAssistant:"
    chat = client.chat.completions.create(model="fake", messages=messages, max_tokens=6)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == fake_completion(prompt, 6).lstrip()
    assert chat.usage is not None and chat.usage.completion_tokens == 6
    assert chat.id.startswith("chatcmpl-")

    stream = client.chat.completions.create(
        model="fake", messages=messages, max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_errors_are_openai_shaped_and_typed(gateway: Gateway) -> None:
    client = gateway.openai()
    with pytest.raises(openai.BadRequestError) as n:
        client.completions.create(model="fake", prompt="hi", n=2)
    assert (n.value.status_code, n.value.code, n.value.param) == (400, "unsupported", "n")
    assert n.value.response.headers["x-request-id"]

    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model="fake",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert (tools.value.code, tools.value.param) == ("unsupported", "tools")

    with pytest.raises(openai.BadRequestError) as logprobs:
        client.completions.create(model="fake", prompt="hi", logprobs=2)
    assert logprobs.value.param == "logprobs"

    # 256-token context: a long prompt plus max_tokens cannot fit, for a streaming request too.
    with pytest.raises(openai.BadRequestError) as overflow:
        client.completions.create(model="fake", prompt="word " * 300, max_tokens=10, stream=True)
    assert overflow.value.code == "context_length_exceeded"
    assert "256" in overflow.value.message and "max_tokens 10" in overflow.value.message

    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="hi")
    assert missing.value.code == "model_not_found" and "fake" in missing.value.message

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="fake", prompt="hi", max_tokens=0)
    assert bad.value.param == "max_tokens"

    raw = httpx.post(f"{gateway.url}/v1/completions", content=b"{not json", timeout=WAIT_S)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "body"
    assert raw.headers["x-should-retry"] == "false"
    unknown = httpx.get(f"{gateway.url}/v2/nothing", timeout=WAIT_S)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


def test_models_lists_what_live_agents_serve(gateway: Gateway) -> None:
    models = gateway.openai().models.list()
    assert sorted(m.id for m in models.data) == ["fake", "slow"]
    assert gateway.openai().models.retrieve("slow").id == "slow"
    health = httpx.get(f"{gateway.url}/health", timeout=WAIT_S)
    assert health.status_code == 200 and health.json()["agents"] == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(gateway: Gateway) -> None:
    body = {"model": "fake", "prompt": "one two three", "max_tokens": 9, "stream": True}
    run = subprocess.run(
        [
            "curl",
            "-N",
            "-sS",
            "--max-time",
            str(WAIT_S),
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
            f"{gateway.url}/v1/completions",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT_S + 10,
        check=True,
    )
    events = [line for line in run.stdout.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == fake_completion("one two three", 9)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_metrics_move_and_client_disconnect_cancels(gateway: Gateway) -> None:
    before = gateway.metrics()
    client = gateway.openai()
    for i in range(3):
        client.completions.create(model="fake", prompt=f"metrics {i}", max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake", prompt="hi", n=3)
    after = gateway.metrics()
    for name in (
        "edgeorch_queue_time_seconds_count",
        "edgeorch_time_to_first_token_seconds_count",
        "edgeorch_request_duration_seconds_count",
    ):
        assert sample(after, name) - sample(before, name) == 3, name
    assert (
        sample(after, "edgeorch_inter_token_latency_seconds_count")
        - sample(before, "edgeorch_inter_token_latency_seconds_count")
        == 3 * 4
    )  # every token after the first (a frame of its own)
    completed = sample(after, "edgeorch_requests_total", outcome="completed")
    assert completed - sample(before, "edgeorch_requests_total", outcome="completed") == 3
    fast_tokens = sample(after, "edgeorch_agent_generated_tokens_total", agent="fast")
    assert fast_tokens - sample(before, "edgeorch_agent_generated_tokens_total", agent="fast") == 15
    assert sample(after, "edgeorch_rejected_requests_total", reason="unsupported") >= 1
    assert sample(after, "edgeorch_agent_kv_budget_tokens", agent="fast", model="fake") > 0
    assert sample(after, "edgeorch_agent_decode_tokens_per_second", agent="fast", model="fake") > 0
    assert sample(after, "edgeorch_http_requests_total", route="/v1/completions", status="200") >= 3

    # A slow streaming request: running while streamed, cancelled when the client goes away.
    cancelled = sample(after, "edgeorch_requests_total", outcome="cancelled")
    body = {"model": "slow", "prompt": "keep going", "max_tokens": 1000, "stream": True}
    with (
        httpx.Client(base_url=gateway.url, timeout=WAIT_S) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        assert [json.loads(next(events).removeprefix("data: ")) for _ in range(2)]
        running = gateway.metrics()
        assert sample(running, "edgeorch_requests_running") == 1
        assert sample(running, "edgeorch_agent_running_requests", agent="slow", model="slow") == 1
        assert sample(running, "edgeorch_agent_kv_reserved_tokens", agent="slow", model="slow") > 0
    # Leaving the block closed the connection mid-stream.
    wait_until(
        lambda: (
            sample(gateway.metrics(), "edgeorch_requests_total", outcome="cancelled")
            == cancelled + 1
        ),
        "cancellation after the stream's client left",
        gateway.cluster,
    )
    with gateway.cluster.client() as sdk:
        status = sdk.status()
    assert not status.running and request_id not in {q.request_id for q in status.queue}

    # A non-streaming request whose client gives up while it waits is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.url}/v1/completions",
            json={**body, "stream": False},
            headers={"X-Request-Id": "gives-up"},
            timeout=httpx.Timeout(WAIT_S, read=1.0),
        )
    wait_until(
        lambda: (
            sample(gateway.metrics(), "edgeorch_requests_total", outcome="cancelled")
            == cancelled + 2
        ),
        "cancellation after the waiting client left",
        gateway.cluster,
    )
    assert sample(gateway.metrics(), "edgeorch_requests_running") == 0


def test_no_agent_is_503_with_retry_after(tmp_path: Path) -> None:
    served = Gateway(tmp_path, "--unavailable-timeout-s", "1")
    try:
        health = httpx.get(f"{served.url}/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.headers["retry-after"]
        assert httpx.get(f"{served.url}/live", timeout=WAIT_S).status_code == 200
        with pytest.raises(openai.InternalServerError) as error:
            served.openai().completions.create(model="any", prompt="hello", max_tokens=3)
        assert error.value.status_code == 503 and error.value.code == "unavailable"
        assert int(error.value.response.headers["retry-after"]) >= 1
        assert error.value.response.headers["x-should-retry"] == "true"
        metrics = served.metrics()
        assert sample(metrics, "edgeorch_rejected_requests_total", reason="unavailable") == 1
    finally:
        served.stop()


def test_bearer_keys_are_required_when_configured(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# gateway keys\nfirst-key\n\nsecond-key\n")
    served = Gateway(tmp_path / "cluster", "--http-api-keys-file", str(keys))
    try:
        served.cluster.start_agent("fast", *FAST)
        served.cluster.wait_for_agents(1)
        with pytest.raises(openai.AuthenticationError) as missing:
            served.openai(api_key="wrong-key").completions.create(model="fake", prompt="hi")
        assert missing.value.status_code == 401 and missing.value.code == "unauthorized"
        assert missing.value.response.headers["www-authenticate"] == "Bearer"
        bare = httpx.get(f"{served.url}/v1/models", timeout=WAIT_S)
        assert bare.status_code == 401 and bare.headers["x-request-id"]
        for key in ("first-key", "second-key"):
            result = served.openai(api_key=key).completions.create(
                model="fake", prompt="hi there", max_tokens=2
            )
            assert result.usage is not None and result.usage.completion_tokens == 2
        # Probes and metrics stay open to the operator's tooling.
        assert httpx.get(f"{served.url}/health", timeout=WAIT_S).status_code == 200
        metrics = served.metrics()
        assert sample(metrics, "edgeorch_rejected_requests_total", reason="unauthorized") == 2
    finally:
        served.stop()


def test_sigterm_finishes_open_streams_and_refuses_new_requests(tmp_path: Path) -> None:
    served = Gateway(tmp_path)
    try:
        served.cluster.start_agent("paced", "--backend", "fake", "--fake-decode-tps", "40")
        served.cluster.wait_for_agents(1)
        body = {"prompt": "drain me", "max_tokens": 60, "stream": True, "ignore_eos": True}
        with (
            httpx.Client(base_url=served.url, timeout=WAIT_S) as http,
            http.stream("POST", "/v1/completions", json=body) as response,
        ):
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            texts = [json.loads(next(events).removeprefix("data: "))["choices"][0]["text"]]
            served.cluster.processes["coordinator"].send_signal(signal.SIGTERM)
            refused = httpx.post(
                f"{served.url}/v1/completions", json={"prompt": "too late"}, timeout=WAIT_S
            )
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "unavailable"
            health = httpx.get(f"{served.url}/health", timeout=WAIT_S)
            assert health.status_code == 503 and health.json()["draining"] is True
            rest = [e.removeprefix("data: ") for e in events]
        assert rest[-1] == "[DONE]"
        texts += [json.loads(e)["choices"][0]["text"] for e in rest[:-1]]
        assert "".join(texts) == fake_completion("drain me", 60)
        assert served.cluster.processes["coordinator"].wait(timeout=WAIT_S) == 0
    finally:
        served.stop()


def test_a_failure_after_streaming_began_is_an_error_event(tmp_path: Path) -> None:
    """The only agent dies mid-stream: the request (not blamed, it was making progress) waits
    for another agent, none comes, and the open stream ends with an error event."""
    served = Gateway(tmp_path, "--unavailable-timeout-s", "1")
    try:
        served.cluster.start_agent("doomed", *SLOW)
        served.cluster.wait_for_agents(1)
        stream = served.openai().completions.create(
            model="slow", prompt="until the agent dies", max_tokens=1000, stream=True
        )
        texts = [next(iter(stream)).choices[0].text]
        served.cluster.kill("doomed")
        with pytest.raises(openai.APIError) as error:
            texts += [chunk.choices[0].text for chunk in stream]
        assert error.value.code == "unavailable" and "no agent" in error.value.message
        assert texts[0]
    finally:
        served.stop()


def test_a_follow_up_turn_reuses_the_agents_cache_as_metrics_and_status_show(
    gateway: Gateway,
) -> None:
    """The agent's heartbeat carries its prompt cache to /metrics and ``edgeorch status``;
    ``cache_prompt: false`` opts a request out."""
    client = gateway.openai()
    key = {"agent": "fast", "model": "fake"}
    history = "cache test: the first turn of a long conversation about " + " ".join(
        f"river{i}" for i in range(20)
    )
    history_tokens = len(history.split()) + 1
    origin = gateway.metrics()
    first = client.completions.create(model="fake", prompt=history, max_tokens=4)

    def moved(name: str, since: dict[Any, float], **labels: str) -> float:
        return sample(gateway.metrics(), name, **key, **labels) - sample(
            since, name, **key, **labels
        )

    computed = "edgeorch_agent_prompt_tokens_total"
    wait_until(
        lambda: moved(computed, origin, source="computed") >= history_tokens,
        "the first turn in the agent's heartbeat",
        gateway.cluster,
    )
    before = gateway.metrics()
    follow_up = f"{history}{first.choices[0].text} and now tell me about the sea"
    client.completions.create(model="fake", prompt=follow_up, max_tokens=4)
    client.completions.create(
        model="fake", prompt=follow_up, max_tokens=4, extra_body={"cache_prompt": False}
    )
    follow_up_tokens = len(follow_up.split()) + 1
    reused = history_tokens + 4
    wait_until(
        lambda: moved(computed, before, source="computed") >= 7 + follow_up_tokens,
        "both turns in the agent's heartbeat",
        gateway.cluster,
    )
    assert moved(computed, before, source="reused") == reused  # the opted-out turn: none
    assert moved(computed, before, source="computed") == 7 + follow_up_tokens
    assert moved("edgeorch_agent_prefix_cache_hits_total", before) == 1
    assert sample(gateway.metrics(), "edgeorch_agent_kv_parked_tokens", **key) > 0
    with gateway.cluster.client() as sdk:
        (fast,) = [a for a in sdk.status().agents if a.name == "fast"]
    assert fast.cache.reused_tokens >= reused and fast.cache.parked_tokens > 0
