"""What CURVE authentication costs the coordinator: its CPU seconds for the same workload with
and without keys (two fake agents, N concurrent requests of T forced tokens each), alternating
runs so load on a shared machine hits both alike.

    .venv/bin/python benchmarks/curve_overhead.py [--requests 200] [--tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.auth import generate_keys
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster

FAKE = ("--backend", "fake", "--fake-decode-tps", "400", "--fake-prefill-tps", "20000")
AGENTS = ("a1", "a2")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(root: Path, keys: Path | None, requests: int, tokens: int) -> tuple[float, float]:
    """(coordinator CPU seconds, wall seconds) to serve the workload."""
    server = () if keys is None else (
        "--curve-secret-key", str(keys / "server.key_secret"),
        "--curve-allow-dir", str(keys / "allowed"),
    )  # fmt: skip
    cluster = LocalCluster(root / f"run-{time.monotonic_ns()}", *server, "--predictor", "none")
    client_keys: dict[str, Any] = {}
    if keys is not None:
        cluster.client_keys = (keys / "clients" / "client.key_secret", keys / "server.key")
        secret, server_key = cluster.client_keys
        client_keys = {"curve_secret_key": secret, "curve_server_key": server_key}
    try:
        for name in AGENTS:
            agent = () if keys is None else (
                "--curve-secret-key", str(keys / "agents" / f"{name}.key_secret"),
                "--curve-server-key", str(keys / "server.key"),
            )  # fmt: skip
            cluster.start_agent(name, *FAKE, "--max-seqs", "16", *agent)
        cluster.wait_for_agents(len(AGENTS))
        pid = cluster.processes["coordinator"].pid
        cpu_before, started = cpu_seconds(pid), time.monotonic()

        async def serve() -> None:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=120, **client_keys) as c:
                results = await asyncio.gather(
                    *(
                        c.generate(f"request {i}", max_tokens=tokens, ignore_eos=True)
                        for i in range(requests)
                    )
                )
            assert all(r.completion_tokens == tokens for r in results)

        asyncio.run(serve())
        return cpu_seconds(pid) - cpu_before, time.monotonic() - started
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        keys = root / "keys"
        generate_keys(keys, agents=AGENTS, clients=["client"])
        for _ in range(args.repeats):
            for label, run_keys in (("off", None), ("curve", keys)):
                cpu, wall = run(root, run_keys, args.requests, args.tokens)
                print(f"{label:5s} coordinator CPU {cpu:.2f} s, wall {wall:.2f} s", flush=True)


if __name__ == "__main__":
    main()
