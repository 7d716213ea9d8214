"""``edgeorch bench --live``: replay a trace against a real local cluster (a coordinator and
``--agents`` agent processes on loopback, ``--backend fake`` or ``llama``), one fresh cluster
per policy on the same arrivals, and report in the same JSON as the simulator.

Each request asks for exactly its trace length (``max_tokens`` = length, ``ignore_eos``), as
serving benchmarks do. Only ``--rate`` is accepted: a live cluster's nominal capacity is not
known before it runs. JCT is measured by the client (submit to result); TTFT is the
coordinator's (arrival to first token).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from orchestrator.bench import BenchSpec, arrival_scale, load_trace, output_lengths, policy_stats
from orchestrator.client import AsyncClient
from orchestrator.errors import EdgeorchError, InvalidRequest
from orchestrator.local import LocalCluster
from orchestrator.sim import Outcome, SimReport

LIVE_REQUEST_TIMEOUT_S: Final = 900.0


@dataclass(frozen=True, slots=True)
class LiveSpec:
    agents: int
    backend: str
    agent_args: tuple[str, ...] = ()
    log_dir: Path | None = None


def run_live(
    spec: BenchSpec, live: LiveSpec, progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    if spec.rate is None:
        raise InvalidRequest(
            "edgeorch bench --live needs --rate R (a live cluster's capacity is not known in "
            "advance, so --load cannot be converted to arrivals)",
            field="load",
        )
    if live.agents < 1:
        raise InvalidRequest(f"--agents must be at least 1, got {live.agents}", field="agents")
    rows = load_trace(spec.trace, spec.max_requests)
    lengths = output_lengths(rows, spec.length_scale, spec.max_output_tokens)
    factor = arrival_scale(rows, lengths, 1.0, None, spec.rate)
    start = rows[0].arrival_s
    arrivals = [(r.arrival_s - start) * factor for r in rows]
    results: dict[str, Any] = {}
    diagnostics: dict[str, Any] = {}
    for name in spec.policies:
        with tempfile.TemporaryDirectory(prefix="edgeorch-bench-") as scratch:
            log_dir = live.log_dir / name if live.log_dir else Path(scratch)
            log_dir.mkdir(parents=True, exist_ok=True)
            began = time.perf_counter()
            outcomes = _run_policy(
                name, spec, live, log_dir, [r.prompt for r in rows], lengths, arrivals, progress
            )
        report = SimReport(
            outcomes=outcomes,
            preemptions=sum(max(0, o.attempts - 1) for o in outcomes),
            kv_preemptions=0,
            events=0,
            decisions=0,
            max_kv_overuse_tokens=0.0,
            end_s=max((o.finished_s or 0.0) for o in outcomes),
        )
        results[name] = policy_stats(report)
        diagnostics[name] = {"wall_s": round(time.perf_counter() - began, 3)}
    return {
        "trace": str(spec.trace),
        "load": None,
        "rate": spec.rate,
        "capacity_tokens_s": 0.0,
        "placement": spec.placement,
        "mode": "live",
        "cluster": {
            "name": f"live {live.agents} x {live.backend}",
            "agents": live.agents,
            "backend": live.backend,
            "args": list(live.agent_args),
        },
        "policies": results,
        "diagnostics": diagnostics,
    }


def _run_policy(
    policy: str,
    spec: BenchSpec,
    live: LiveSpec,
    log_dir: Path,
    prompts: list[str],
    lengths: list[int],
    arrivals: list[float],
    progress: Callable[[str, int, int], None] | None,
) -> list[Outcome]:
    cluster = LocalCluster(log_dir, "--policy", policy, "--placement", spec.placement)
    try:
        for i in range(live.agents):
            cluster.start_agent(f"agent-{i + 1}", "--backend", live.backend, *live.agent_args)
        cluster.wait_for_agents(live.agents)
        return asyncio.run(
            _replay(cluster.clients_endpoint, policy, prompts, lengths, arrivals, progress)
        )
    finally:
        cluster.stop()


async def _replay(
    endpoint: str,
    policy: str,
    prompts: list[str],
    lengths: list[int],
    arrivals: list[float],
    progress: Callable[[str, int, int], None] | None,
) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    done: list[Outcome] = []
    async with AsyncClient(endpoint, timeout_s=LIVE_REQUEST_TIMEOUT_S) as client:
        origin = loop.time()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, origin + arrivals[i] - loop.time()))
            sent = loop.time() - origin
            try:
                result = await client.generate(
                    prompts[i], max_tokens=lengths[i], ignore_eos=True, request_id=f"b{i:05d}"
                )
            except EdgeorchError:
                done.append(Outcome(f"b{i:05d}", sent, 0, None, None, 1, True))
            else:
                finished = loop.time() - origin
                done.append(
                    Outcome(
                        request_id=result.request_id,
                        arrival_s=sent,
                        output_tokens=result.completion_tokens,
                        finished_s=finished,
                        first_token_s=sent + result.ttft_s,
                        attempts=result.attempts,
                        failed=False,
                    )
                )
            if progress is not None:
                progress(f"{policy} live", len(done), len(prompts))

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return done
