"""Device probe and engine construction for an agent: what this machine has, what it runs."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import psutil

from agents.backends import backend
from agents.base import Engine
from agents.probe import physical_cores
from orchestrator.protocol import DeviceProfile
from orchestrator.settings import AgentSettings


def build_engine(settings: AgentSettings, environ: Mapping[str, str]) -> Engine:
    """The engine the settings ask for (a llama engine loads its model here)."""
    return backend(settings.backend).build(settings, environ)


def probe_profile(
    settings: AgentSettings, engine: Engine, environ: Mapping[str, str]
) -> DeviceProfile:
    """The profile the agent registers with, its speeds as its backend measures them."""
    memory = psutil.virtual_memory()
    measured = backend(engine.backend).measure(engine, environ)
    speed = measured.speed
    return DeviceProfile(
        hostname=socket.gethostname(),
        backend=engine.backend,
        cpu_cores=physical_cores(),
        threads=engine.threads,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        gpu_offload_supported=measured.gpu_offload_supported,
        n_gpu_layers=engine.n_gpu_layers,
        model_name=engine.model_name,
        model_path=engine.model_path,
        n_ctx=engine.n_ctx,
        kv_budget_tokens=engine.kv_budget_tokens,
        max_seqs=engine.max_seqs,
        decode_tps=speed.decode_tps,
        prefill_tps=speed.prefill_tps,
        decode_curve=speed.decode_curve,
    )
