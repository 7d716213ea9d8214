"""The HTTP gateway in front of a real llama agent on the embedded default model, through the
real ``openai`` package."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from orchestrator.local import LocalCluster, free_port
from orchestrator.tokens import GgufTokenCounter

pytestmark = pytest.mark.e2e

TIMEOUT_S = 120.0


def test_openai_client_against_the_default_model(tmp_path: Path, model_path: Path) -> None:
    port = free_port()
    cluster = LocalCluster(tmp_path, "--http", f"127.0.0.1:{port}")
    try:
        cluster.start_agent(
            "llama-1",
            "--backend",
            "llama",
            "--model",
            str(model_path),
            "--threads",
            "2",
            "--n-ctx",
            "512",
            "--max-seqs",
            "2",
        )
        cluster.wait_for_agents(1, timeout_s=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, cluster.all_logs()
            time.sleep(0.1)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
        )
        counter = GgufTokenCounter(model_path)
        assert [m.id for m in client.models.list().data] == [counter.model_name]

        prompt = "The capital of France is"
        stream = client.completions.create(
            model=counter.model_name,
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 8
        assert usage.prompt_tokens == counter.count(prompt, counter.model_name)[0]
        whole = client.completions.create(
            model=counter.model_name,
            prompt=prompt,
            max_tokens=8,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        assert whole.choices[0].text == streamed and streamed.strip()  # greedy: same text

        chat = client.chat.completions.create(
            model=counter.model_name,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0.0,
        )
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage is not None and 1 <= chat.usage.completion_tokens <= 8
        assert isinstance(chat.choices[0].message.content, str)
    finally:
        cluster.stop()
