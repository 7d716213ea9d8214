"""Factories for the pure core's inputs: each builds a valid object, overrides by keyword."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.agent_views import AgentState
from orchestrator.core.driver import ClusterDriver, DriverSettings
from orchestrator.core.estimate import LengthEstimate
from orchestrator.core.events import AgentJoined
from orchestrator.core.placement import Candidate, Choice, Fleet, Placement, make_placement
from orchestrator.core.policies import make_policy
from orchestrator.core.table import RequestRecord
from orchestrator.core.views import AgentView, QueuedRequest, RunningRequest, SpeedProfile
from orchestrator.lengths import QUANTILE_LEVELS
from orchestrator.protocol import AgentId, DeviceProfile, GenerationParams, RequestId


def params(**overrides: Any) -> GenerationParams:
    return GenerationParams(**{"max_tokens": 16, **overrides})


def queued(request_id: str = "r1", **overrides: Any) -> QueuedRequest:
    fields: dict[str, Any] = {
        "request_id": RequestId(request_id),
        "arrival_s": 0.0,
        "priority": "interactive",
        "prompt_tokens": 10,
        "prompt_tokens_exact": True,
        "max_tokens": 20,
        "model": None,
        "attempt": 1,
    }
    fields.update(overrides)
    return QueuedRequest(**fields)


def agent(agent_id: str = "a1", **overrides: Any) -> AgentView:
    fields: dict[str, Any] = {
        "agent_id": AgentId(agent_id),
        "model_name": "gemma",
        "n_ctx": 4096,
        "max_seqs": 4,
        "kv_budget_tokens": 16384,
        "running": 0,
        "kv_reserved_tokens": 0,
    }
    fields.update(overrides)
    return AgentView(**fields)


def record(request_id: str = "r1", **overrides: Any) -> RequestRecord:
    fields: dict[str, Any] = {
        "request_id": RequestId(request_id),
        "prompt": "hello world",
        "params": params(),
        "prompt_tokens": 3,
        "prompt_tokens_exact": True,
        "predicted_tokens": None,
        "arrival_s": 0.0,
    }
    fields.update(overrides)
    return RequestRecord(**fields)


def profile(**overrides: Any) -> DeviceProfile:
    fields: dict[str, Any] = {
        "hostname": "edge-1",
        "backend": "fake",
        "cpu_cores": 2,
        "threads": 2,
        "memory_total_bytes": 8 << 30,
        "memory_available_bytes": 4 << 30,
        "gpu_offload_supported": False,
        "n_gpu_layers": 0,
        "model_name": "fake",
        "n_ctx": 4096,
        "kv_budget_tokens": 32768,
        "max_seqs": 8,
    }
    fields.update(overrides)
    return DeviceProfile(**fields)


def estimate(median: float = 100.0, sigma: float = 0.8) -> LengthEstimate:
    """A log-normal predicted length around ``median`` (as the fake predictor makes them)."""
    z = {q: NormalDist().inv_cdf(q) for q in QUANTILE_LEVELS}
    return LengthEstimate(
        median * math.exp(sigma**2 / 2),
        tuple((q, median * math.exp(sigma * z[q])) for q in QUANTILE_LEVELS),
    )


def running(request_id: str = "x1", **overrides: Any) -> RunningRequest:
    fields: dict[str, Any] = {
        "request_id": RequestId(request_id),
        "agent_id": AgentId("a1"),
        "arrival_s": 0.0,
        "priority": "interactive",
        "prompt_tokens": 10,
        "max_tokens": 2000,
        "generated_tokens": 0,
        "kv_reservation_tokens": 200,
        "dispatched_s": 0.0,
    }
    fields.update(overrides)
    return RunningRequest(**fields)


def speed(single_tps: float = 100.0, max_seqs: int = 8, exponent: float = 0.35) -> SpeedProfile:
    return SpeedProfile.power_law(single_tps, 2000.0, max_seqs, exponent)


def agent_state(agent_id: str = "a1", **overrides: Any) -> AgentState:
    fields: dict[str, Any] = {
        "agent_id": AgentId(agent_id),
        "model_name": "gemma",
        "n_ctx": 4096,
        "max_seqs": 1,
        "kv_budget_tokens": 8000,
        "decode_tps": 20.0,
    }
    fields.update(overrides)
    return AgentState(**fields)


def driver(policy: str = "fcfs", *agents: AgentState, **settings: Any) -> ClusterDriver:
    """A cluster driver with ``agents`` joined (one default agent when none is given)."""
    config = SchedulerConfig(
        policy=make_policy(policy), placement=make_placement("predicted"), unavailable_timeout_s=30
    )
    cluster = ClusterDriver(DriverSettings(scheduler=config, **settings))
    for state in agents or (agent_state(),):
        cluster.on_event(AgentJoined(state), 0.0)
    return cluster


@dataclass(frozen=True)
class WeighEveryAgent:
    """A placement as it was before ``settle``: ``choose`` over every capable agent (the
    reference a searched placement must decide as)."""

    inner: Placement

    @property
    def name(self) -> str:
        return self.inner.name

    def choose(
        self, request: QueuedRequest, candidates: Sequence[Candidate], dispatch_count: int
    ) -> Choice:
        return self.inner.choose(request, candidates, dispatch_count)

    def settle(self, request: QueuedRequest, fleet: Fleet, dispatch_count: int) -> Choice | None:
        return None


def jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as a JSON-lines file (a trace, a length file) and return its path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
