"""How long one scheduling decision takes on a large cluster (the pure cluster driver alone).

A driver with ``--agents`` unequal agents (``--max-seqs`` sequences each) and a queue held at
``--queued`` requests with log-normal predicted lengths first fills every slot: a decision
places at most the 16 requests it looks ahead at, so filling 100 agents of 16 sequences takes
100 decisions, timed apart as ``fill`` (a coordinator starting on a backlog does this once).
Then, every slot busy, it takes a steady stream of the events a live coordinator sees
(tokens, runs ending, new arrivals) and schedules once after each. Prints the percentiles of
``schedule`` in that steady state (also net of the garbage collector's pauses, and by how many
requests a decision dispatched: none, one, several), of ``fill`` and of ``on_event``.

    .venv/bin/python benchmarks/decision_latency.py [--queued 10000] [--agents 100]
        [--max-seqs 16] [--decisions 3000] [--policy srtf] [--placement predicted] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from statistics import NormalDist
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.core.agent_views import AgentState
from orchestrator.core.driver import ClusterDriver
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import (
    AgentJoined,
    Dispatched,
    Effect,
    Ended,
    Event,
    RequestAccepted,
    RunEnded,
    StopRun,
    TokensReceived,
)
from orchestrator.core.lifecycle import RequestState
from orchestrator.core.table import RequestRecord
from orchestrator.core.views import SpeedProfile
from orchestrator.lengths import QUANTILE_LEVELS
from orchestrator.protocol import AgentId, GenerationParams, RequestId
from orchestrator.settings import SchedulingTunables, driver_settings

SEED: Final = 20261203
MEDIAN_OUTPUT_TOKENS: Final = 150.0
OUTPUT_SIGMA: Final = 1.0
"""Spread of the predicted (and actual) output lengths: log-normal, as real answers are."""
N_CTX_TOKENS: Final = 4096
EVENT_STEP_S: Final = 0.001
"""Simulated time between events (a busy coordinator's pace)."""
TOKENS_PER_END: Final = 8
"""Token chunks between two runs ending (fewer ends than chunks, as live)."""


def _estimate(median: float) -> LengthEstimate:
    z = {q: NormalDist().inv_cdf(q) for q in QUANTILE_LEVELS}
    return LengthEstimate(
        median * math.exp(OUTPUT_SIGMA**2 / 2),
        tuple((q, median * math.exp(OUTPUT_SIGMA * z[q])) for q in QUANTILE_LEVELS),
    )


class Workload:
    """Seeded requests and the events a busy cluster produces."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.count = 0

    def request(self, now: float) -> RequestAccepted:
        self.count += 1
        median = MEDIAN_OUTPUT_TOKENS * math.exp(self.rng.gauss(0.0, OUTPUT_SIGMA))
        prompt = int(50 * math.exp(self.rng.gauss(0.0, 1.0))) + 1
        record = RequestRecord(
            request_id=RequestId(f"r{self.count}"),
            prompt="x",
            params=GenerationParams(max_tokens=min(2048, int(4 * median) + 16)),
            prompt_tokens=prompt,
            prompt_tokens_exact=True,
            predicted_tokens=median,
            arrival_s=now,
            estimate=_estimate(median),
        )
        return RequestAccepted(record)


def build(args: argparse.Namespace, rng: random.Random) -> tuple[ClusterDriver, Workload]:
    settings = driver_settings(
        SchedulingTunables(),
        policy=args.policy,
        placement=args.placement,
        unavailable_timeout_s=30.0,
    )
    driver = ClusterDriver(settings)
    for i in range(args.agents):
        single = rng.uniform(10.0, 60.0)
        state = AgentState(
            agent_id=AgentId(f"agent-{i}"),
            model_name="gemma",
            n_ctx=N_CTX_TOKENS,
            max_seqs=args.max_seqs,
            kv_budget_tokens=N_CTX_TOKENS * args.max_seqs,
            decode_tps=single,
            speed=SpeedProfile.power_law(single, 20 * single, args.max_seqs, 0.6),
        )
        driver.on_event(AgentJoined(state), 0.0)
    return driver, Workload(rng)


def _summary(effect: Effect) -> tuple[str, ...]:
    """What a decision did, to check that two versions of the driver decide alike."""
    match effect:
        case Dispatched(record, agent_id):
            return ("dispatch", record.request_id, agent_id)
        case StopRun(agent_id, request_id, attempt):
            return ("stop", request_id, agent_id, str(attempt))
        case Ended(record, _):
            return ("ended", record.request_id, record.state.value)
        case _:
            return (type(effect).__name__, repr(effect))


class _Collector:
    """Time the garbage collector paused the benchmark (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.paused_s = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.paused_s += time.perf_counter() - self._started


def _bucket(dispatched: int) -> str:
    return "none" if dispatched == 0 else "one" if dispatched == 1 else "several"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(1e6 * ordered[len(ordered) // 2], 1),
        "p99_us": round(1e6 * ordered[int(0.99 * (len(ordered) - 1))], 1),
        "max_us": round(1e6 * ordered[-1], 1),
        "mean_us": round(1e6 * statistics.fmean(ordered), 1),
    }


def _acknowledge(driver: ClusterDriver, effects: list[Effect], now: float) -> int:
    """Each dispatched request's first token, as its agent would send it; the dispatches."""
    placed = 0
    for effect in effects:
        if isinstance(effect, Dispatched):
            placed += 1
            record = effect.record
            driver.on_event(
                TokensReceived(effect.agent_id, record.request_id, record.attempt, "t", 1), now
            )
    return placed


def fill(driver: ClusterDriver, now: float) -> tuple[list[float], float]:
    """Schedule until a decision places nothing: every slot busy. Each decision's seconds, and
    the simulated time after them."""
    took: list[float] = []
    while True:
        now += EVENT_STEP_S
        started = time.perf_counter()
        effects = driver.schedule(now)
        took.append(time.perf_counter() - started)
        if not _acknowledge(driver, effects, now):
            return took[:-1], now


def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(SEED)
    driver, workload = build(args, rng)
    now = 0.0
    for _ in range(args.queued + args.agents * args.max_seqs):
        driver.on_event(workload.request(now), now)
    fill_s, now = fill(driver, now)
    schedule_s: list[float] = []
    net_of_gc_s: list[float] = []
    by_dispatches: dict[str, list[float]] = {"none": [], "one": [], "several": []}
    collector = _Collector()
    gc.callbacks.append(collector)
    digest = hashlib.sha256()
    event_s: list[float] = []
    progress_every = max(1, args.decisions // 10)
    step = 0
    while len(schedule_s) < args.decisions:
        now += EVENT_STEP_S
        step += 1
        running = [r for a in driver.agents for r in driver.table.on_agent(a)]
        victim = rng.choice(running)
        events: list[Event] = []
        if step % TOKENS_PER_END:
            events.append(
                TokensReceived(
                    victim.agent_id or AgentId(""), victim.request_id, victim.attempt, "t", 1
                )
            )
        else:
            events.append(
                RunEnded(victim.agent_id or AgentId(""), victim.request_id, victim.attempt, "stop")
            )
            events.append(workload.request(now))
        for event in events:
            started = time.perf_counter()
            driver.on_event(event, now)
            event_s.append(time.perf_counter() - started)
        collector.paused_s = 0.0
        started = time.perf_counter()
        effects = driver.schedule(now)
        took = time.perf_counter() - started
        schedule_s.append(took)
        net_of_gc_s.append(took - collector.paused_s)
        digest.update(repr([_summary(effect) for effect in effects]).encode())
        by_dispatches[_bucket(_acknowledge(driver, effects, now))].append(took)
        if len(schedule_s) % progress_every == 0:
            print(
                f"{len(schedule_s)}/{args.decisions} decisions, "
                f"queue {driver.table.count(RequestState.QUEUED)}",
                file=sys.stderr,
            )
    gc.callbacks.remove(collector)
    return {
        "schedule": percentiles(schedule_s),
        "schedule_net_of_gc": percentiles(net_of_gc_s),
        "schedule_by_dispatches": {
            bucket: {"decisions": len(samples), **percentiles(samples)}
            for bucket, samples in by_dispatches.items()
            if samples
        },
        "fill": {"decisions": len(fill_s), **percentiles(fill_s)},
        "on_event": percentiles(event_s),
        "decisions_sha256": digest.hexdigest()[:16],
        "queued_at_end": driver.table.count(RequestState.QUEUED),
        "running_at_end": sum(len(driver.table.on_agent(a)) for a in driver.agents),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--max-seqs", type=int, default=16)
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--policy", default="srtf")
    parser.add_argument("--placement", default="predicted")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report: dict[str, object] = {
        "queued": args.queued,
        "agents": args.agents,
        "max_seqs": args.max_seqs,
        "policy": args.policy,
        "placement": args.placement,
        "decisions": args.decisions,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "result": run(args),
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
