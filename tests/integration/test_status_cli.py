"""``edgeorch status`` and ``edgeorch submit`` against a real coordinator and fake agent:
estimates while requests wait, the waiting line on stderr, one JSON document with --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.local import LocalCluster

pytestmark = pytest.mark.integration

WAIT_S = 60.0


@pytest.fixture
def fcfs_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path, "--policy", "fcfs")
    try:
        yield local
    finally:
        local.stop()


def edgeorch(cluster: LocalCluster, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "EDGEORCH_CLIENTS_ENDPOINT": cluster.clients_endpoint}
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_waiting_requests_show_their_place_and_estimates(fcfs_cluster: LocalCluster) -> None:
    cluster = fcfs_cluster
    cluster.start_agent("slow", "--backend", "fake", "--fake-decode-tps", "20", "--max-seqs", "1")
    cluster.wait_for_agents(1)
    # 200 tokens at 20 tokens/s hold the only slot for about 10 s.
    blocker = edgeorch(cluster, "submit", "block", "--max-tokens", "200", "--ignore-eos", "--json")
    with cluster.client() as client:
        deadline = time.monotonic() + WAIT_S
        while not client.status().running and time.monotonic() < deadline:
            time.sleep(0.1)
        text = edgeorch(cluster, "submit", "first waiter", "--max-tokens", "5", "--ignore-eos")
        as_json = edgeorch(cluster, "submit", "second waiter", "--max-tokens", "5", "--json")
        report = client.status()
        while len(report.queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            report = client.status()
    assert len(report.queue) == 2 and len(report.running) == 1, report
    (running,) = report.running
    assert running.eta_start_s == 0.0 and running.eta_finish_s is not None
    for position, queued in enumerate(report.queue):
        assert queued.queue_position == position and queued.eta_agent_id == "slow"
        assert queued.eta_start_s is not None and queued.eta_finish_s is not None
        assert running.eta_finish_s <= queued.eta_start_s < queued.eta_finish_s

    status_json = edgeorch(cluster, "status", "--json")
    out, _ = status_json.communicate(timeout=WAIT_S)
    document = json.loads(out)
    assert {"agents", "queue", "running", "policy", "completed", "failed"} <= set(document)
    assert all(q["eta_finish_s"] > 0 for q in document["queue"])
    table = edgeorch(cluster, "status")
    out, _ = table.communicate(timeout=WAIT_S)
    assert "QUEUE (policy order" in out and "FINISH IN" in out and "slow" in out

    out, err = text.communicate(timeout=WAIT_S)
    assert text.returncode == 0, err
    assert out.startswith("first waiter")
    assert "[queued: " in err and "ahead; starts in ~" in err
    assert "tokens on slow" in err

    out, err = as_json.communicate(timeout=WAIT_S)
    assert as_json.returncode == 0, err
    assert json.loads(out)["completion_tokens"] >= 1  # stdout is one JSON document
    assert "[queued" not in err  # off a terminal, --json shows no waiting line
    blocker.communicate(timeout=WAIT_S)
