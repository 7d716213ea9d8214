"""``edgeorch bench --live``: replay a trace against a real local cluster, one policy after the
other on the same arrivals.

The agents start once (model loaded, speed probed) and stay up; for each policy the coordinator
is restarted with it and the agents re-register. Every request is sent at its scaled arrival
time with ``ignore_eos`` and the same ``max_tokens`` for all (the ``--max-output-tokens`` cap, or
the longest length), and the client stops it (cancels) once it has streamed its trace length.
Sending each request's own length as ``max_tokens``, as serving benchmarks do with ShareGPT
lengths, would tell a length-aware scheduler the truth (it caps predictions by the budget).
Timings are taken by the client (submit to first streamed text, submit to the last token it
needed); the few tokens generated before a cancel lands are the replay's overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from orchestrator.client import AsyncClient, Client
from orchestrator.errors import EdgeorchError, InvalidRequest
from orchestrator.local import SHARED_CORES_ENV, LocalCluster
from orchestrator.protocol import ConversationHint
from orchestrator.traces import arrival_scale

LIVE_REQUEST_TIMEOUT_S: Final = 900.0
AGENT_START_TIMEOUT_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class LiveOutcome:
    arrival_s: float
    first_token_s: float | None
    finished_s: float | None
    output_tokens: int
    attempts: int


@dataclass(frozen=True, slots=True)
class LiveCluster:
    agents: int
    backend: str
    agent_args: tuple[str, ...]


def capacity_tokens_s(endpoint: str) -> tuple[float, list[dict[str, Any]]]:
    """The live agents' nominal decode capacity (their measured full-batch tokens/s, summed)
    and a description of each."""
    with Client(endpoint) as client:
        report = client.status()
    described = []
    total = 0.0
    for agent in report.agents:
        profile = agent.profile
        best = max((tps for _, tps in profile.decode_curve), default=profile.decode_tps or 0.0)
        total += best
        described.append(
            {
                "name": agent.agent_id,
                "backend": profile.backend,
                "max_seqs": profile.max_seqs,
                "kv_budget_tokens": profile.kv_budget_tokens,
                "decode_curve": [list(point) for point in profile.decode_curve],
                "threads": profile.threads,
            }
        )
    return total, described


async def replay(
    endpoint: str,
    prompts: Sequence[str],
    arrivals_s: Sequence[float],
    lengths: Sequence[int],
    max_tokens: int,
    progress: Callable[[int, int], None] | None = None,
    conversations: Sequence[ConversationHint | None] | None = None,
) -> list[LiveOutcome]:
    """Send each request at its arrival offset with the shared ``max_tokens`` (and its
    ``conversations[i]`` hint for the predictor, if any) and stop it (cancel) once it has
    streamed its trace length; return client-side timings."""
    outcomes: list[LiveOutcome | None] = [None] * len(prompts)
    done = 0

    async with AsyncClient(endpoint, timeout_s=LIVE_REQUEST_TIMEOUT_S) as client:
        origin = time.perf_counter()

        async def one(index: int) -> None:
            nonlocal done
            await asyncio.sleep(max(0.0, arrivals_s[index] - (time.perf_counter() - origin)))
            sent = time.perf_counter() - origin
            first: float | None = None
            finished: float | None = None
            attempts, produced = 1, 0
            try:
                stream = await client.generate(
                    prompts[index],
                    max_tokens=max_tokens,
                    ignore_eos=True,
                    temperature=0.0,
                    stream=True,
                    conversation=None if conversations is None else conversations[index],
                )
                async with contextlib.aclosing(aiter(stream)) as chunks:
                    async for _ in chunks:
                        if first is None:
                            first = time.perf_counter() - origin
                        if stream.tokens >= lengths[index]:
                            break
                finished = time.perf_counter() - origin
                if stream.result is None:
                    await stream.cancel()
                attempts, produced = stream.attempts, min(stream.tokens, lengths[index])
            except EdgeorchError:
                finished = None
            outcomes[index] = LiveOutcome(sent, first, finished, produced, attempts)
            done += 1
            if progress is not None:
                progress(done, len(prompts))

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return [o for o in outcomes if o is not None]


def live_stats(outcomes: Sequence[LiveOutcome]) -> dict[str, Any]:
    """The per-policy object of the bench JSON, from client-side timings."""
    done = [o for o in outcomes if o.finished_s is not None and o.output_tokens > 0]
    jct = np.array([o.finished_s - o.arrival_s for o in done if o.finished_s is not None])
    ttft = np.array([o.first_token_s - o.arrival_s for o in done if o.first_token_s is not None])
    tokens = np.array([o.output_tokens for o in done])
    first = min((o.arrival_s for o in outcomes), default=0.0)
    last = max((o.finished_s for o in done if o.finished_s is not None), default=first)

    def pct(values: np.ndarray[Any, Any], p: float) -> float:
        return round(float(np.percentile(values, p)), 4) if len(values) else float("nan")

    def mean(values: np.ndarray[Any, Any]) -> float:
        return round(float(values.mean()), 4) if len(values) else float("nan")

    return {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "mean_jct_s": mean(jct),
        "p50_jct_s": pct(jct, 50),
        "p90_jct_s": pct(jct, 90),
        "p99_jct_s": pct(jct, 99),
        "mean_ttft_s": mean(ttft),
        "p99_ttft_s": pct(ttft, 99),
        "mean_norm_latency_s_per_token": mean(jct / tokens) if len(jct) else float("nan"),
        "throughput_tokens_s": round(float(tokens.sum()) / max(1e-9, last - first), 3),
        "preemptions": int(sum(o.attempts - 1 for o in done)),
        "_jct_samples": jct.tolist(),
    }


def run_live(
    *,
    trace: Path,
    rows: Sequence[Any],
    lengths: Sequence[int],
    policies: Sequence[str],
    placement: str,
    load: float | None,
    rate: float | None,
    cluster: LiveCluster,
    progress: Callable[[str, int, int], None] | None = None,
    log_dir: Path | None = None,
    max_tokens: int | None = None,
    coordinator_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every policy on the same scaled arrivals against one set of live agents; every
    request asks for ``max_tokens`` (default: the longest length), never its own length."""
    if "oracle" in policies:
        raise InvalidRequest("the oracle policy knows true lengths: sim only", field="policies")
    if any(row.follows is not None for row in rows):
        raise InvalidRequest(
            "rows that follow another request's end (follows, gap_s) replay only in the simulator",
            field="trace",
        )
    folder = log_dir or Path(tempfile.mkdtemp(prefix="edgeorch-live-"))
    local = LocalCluster(
        folder, "--policy", policies[0], "--placement", placement, *coordinator_args
    )
    results: dict[str, Any] = {}
    try:
        for index in range(1, cluster.agents + 1):
            local.start_agent(
                f"agent-{index}",
                "--backend",
                cluster.backend,
                *cluster.agent_args,
                env_defaults=SHARED_CORES_ENV if cluster.agents > 1 else None,
            )
        local.wait_for_agents(cluster.agents, timeout_s=AGENT_START_TIMEOUT_S)
        capacity, agents = capacity_tokens_s(local.clients_endpoint)
        factor = arrival_scale(rows, lengths, capacity, load, rate)
        arrivals = [(row.arrival_s - rows[0].arrival_s) * factor for row in rows]
        for position, name in enumerate(policies):
            if position > 0:
                local.stop_process("coordinator")
                # A journal of its own: no request left over from the last policy is replayed.
                journal = str(folder / f"journal-{name}.sqlite3")
                local.start_coordinator("--policy", name, "--journal", journal)
                local.wait_for_agents(cluster.agents, timeout_s=AGENT_START_TIMEOUT_S)
            label = f"{name} (live)"
            report = asyncio.run(
                replay(
                    local.clients_endpoint,
                    [row.prompt for row in rows],
                    arrivals,
                    lengths,
                    max_tokens or max(lengths),
                    None if progress is None else functools.partial(progress, label),
                    [row.conversation for row in rows],
                )
            )
            results[name] = live_stats(report)
    finally:
        local.stop()
    return {
        "trace": str(trace),
        "load": load,
        "rate": rate,
        "capacity_tokens_s": round(capacity, 3),
        "placement": placement,
        "mode": "live",
        "cluster": {
            "name": f"local {cluster.agents} x {cluster.backend}",
            "agents": agents,
            "cpus": os.cpu_count(),
        },
        "policies": results,
        "settings": {
            "requests": len(rows),
            "mean_output_tokens": round(float(np.mean(lengths)), 1),
            "logs": str(folder),
        },
    }
