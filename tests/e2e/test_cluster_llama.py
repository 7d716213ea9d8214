"""`edgeorch up` with real llama agents on the default model, driven through the CLI and SDK."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.client import Client
from orchestrator.errors import ContextOverflow, EdgeorchError
from orchestrator.local import LocalCluster, free_port
from orchestrator.tokens import GgufTokenCounter

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "orchestrator.cli"]


def edgeorch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def wait_for_agents(endpoint: str, count: int, up: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    with Client(endpoint) as client:
        while time.monotonic() < deadline:
            assert up.poll() is None, log.read_text()
            try:
                if len(client.status().agents) == count:
                    return
            except EdgeorchError:
                pass
            time.sleep(0.2)
    raise TimeoutError(log.read_text())


def test_up_serves_the_default_model_and_stops_cleanly(tmp_path: Path, model_path: Path) -> None:
    agents = f"tcp://127.0.0.1:{free_port()}"
    clients = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [
                *CLI,
                "up",
                "--agents",
                "2",
                "--backend",
                "llama",
                "--agents-endpoint",
                agents,
                "--clients-endpoint",
                clients,
                "--max-seqs",
                "4",
                "--n-ctx",
                "1024",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EDGEORCH_LOG_LEVEL": "INFO"},
        )
    try:
        wait_for_agents(clients, 2, up, log)
        status = edgeorch("status", "--coordinator", clients, "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert sorted(a["agent_id"] for a in report["agents"]) == ["agent-1", "agent-2"]
        for agent in report["agents"]:
            assert agent["profile"]["backend"] == "llama"
            assert agent["profile"]["n_ctx"] == 1024
            assert agent["profile"]["kv_budget_tokens"] >= 1024
            assert agent["profile"]["model_name"]
        submitted = edgeorch(
            "submit",
            "The capital of France is",
            "--coordinator",
            clients,
            "--max-tokens",
            "16",
            "--json",
        )
        assert submitted.returncode == 0, submitted.stderr
        result = json.loads(submitted.stdout)
        assert 1 <= result["completion_tokens"] <= 16 and result["text"]
        streamed = edgeorch(
            "submit", "Water boils at", "--coordinator", clients, "--max-tokens", "8"
        )
        assert streamed.returncode == 0, streamed.stderr
        assert streamed.stdout.startswith("Water boils at")
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0, log.read_text()


@pytest.mark.parametrize(
    "coordinator_counts", [True, False], ids=["coordinator-exact", "agent-exact"]
)
def test_context_overflow_is_a_typed_error_with_the_numbers(
    tmp_path: Path, model_path: Path, coordinator_counts: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the model's tokenizer the coordinator refuses at once; without it (an empty cache)
    it only estimates, and the agent refuses with its exact count."""
    if not coordinator_counts:
        monkeypatch.setenv("EDGEORCH_CACHE_DIR", str(tmp_path / "empty-cache"))
    cluster = LocalCluster(tmp_path)
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
            "256",
            "--max-seqs",
            "2",
        )
        cluster.wait_for_agents(1, timeout_s=120)
        with cluster.client() as client:
            prompt = "hello " * 300
            with pytest.raises(ContextOverflow) as error:
                client.generate(prompt, max_tokens=10)
            details = error.value.details
            assert details["n_ctx"] == 256 and details["max_tokens"] == 10
            counter = GgufTokenCounter(model_path)
            assert details["prompt_tokens"] == counter.count(prompt, counter.model_name)[0]
            assert not error.value.retryable
            ok = client.generate(
                "The capital of France is", max_tokens=8, temperature=0.0, ignore_eos=True
            )
            assert ok.completion_tokens == 8
    finally:
        cluster.stop()
