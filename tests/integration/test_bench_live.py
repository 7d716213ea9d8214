"""``edgeorch bench --live`` against a real local cluster of fake agents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.integration


def test_live_bench_replays_a_trace_on_fake_agents(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with trace.open("w") as f:
        for i in range(6):
            row = {
                "arrival_s": i * 0.1,
                "prompt": f"tell me about {i} things",
                "output_tokens": 5 + i,
            }
            f.write(json.dumps(row) + "\n")
    out = tmp_path / "live.json"
    code = main(
        [
            "bench", "--trace", str(trace), "--live", "--agents", "1", "--backend", "fake",
            "--agent-arg=--fake-decode-tps=500", "--policies", "fcfs", "--rate", "10",
            "--json", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert data["mode"] == "live" and data["rate"] == 10 and data["load"] is None
    stats = data["policies"]["fcfs"]
    assert (stats["completed"], stats["failed"]) == (6, 0)
    assert stats["p50_jct_s"] <= stats["p99_jct_s"] and stats["throughput_tokens_s"] > 0
    assert out.with_suffix(".png").exists()
