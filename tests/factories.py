"""Factories for the pure core's inputs: each builds a valid object, overrides by keyword."""

from __future__ import annotations

from typing import Any

from orchestrator.core.table import RequestRecord
from orchestrator.core.views import AgentView, QueuedRequest
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
