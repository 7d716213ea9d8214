"""Device probe and engine construction for an agent: what this machine has, what it runs."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path

import psutil

from agents.base import Engine
from agents.fake import FakeEngine, FakeTimingModel
from agents.probe import SpeedProfile, cached_speed, concurrency_points
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import DeviceProfile
from orchestrator.settings import AgentSettings


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def build_engine(settings: AgentSettings, environ: Mapping[str, str]) -> Engine:
    """The engine the settings ask for; the llama backend loads its model here."""
    if settings.backend == "fake":
        return FakeEngine(
            FakeTimingModel(
                decode_tps=settings.fake_decode_tps, prefill_tps=settings.fake_prefill_tps
            ),
            n_ctx=settings.n_ctx,
            max_seqs=settings.max_seqs,
            kv_budget_tokens=settings.kv_budget_tokens,
            model_name=settings.model_name or "fake",
            crash_marker=settings.fake_crash_marker,
        )
    from agents.engine import LlamaEngine
    from agents.model import ensure_default_model

    if settings.model is None:
        model_path = ensure_default_model(environ)
    else:
        model_path = Path(settings.model)
        if not model_path.is_file():
            raise InvalidRequest(f"model file {model_path} does not exist", field="model")
    return LlamaEngine(
        model_path,
        n_ctx=settings.n_ctx,
        max_seqs=settings.max_seqs,
        kv_budget_tokens=settings.kv_budget_tokens,
        n_gpu_layers=settings.n_gpu_layers,
        threads=settings.threads or physical_cores(),
        model_name=settings.model_name,
        available_memory_bytes=psutil.virtual_memory().available,
    )


def probe_profile(
    settings: AgentSettings, engine: Engine, environ: Mapping[str, str]
) -> DeviceProfile:
    """The profile the agent registers with, speeds measured (llama, cached) or modelled (fake)."""
    memory = psutil.virtual_memory()
    if isinstance(engine, FakeEngine):
        offload = False
        speed = SpeedProfile(
            prefill_tps=engine.timing.prefill_tps,
            decode_curve=tuple(
                (c, round(c / engine.timing.decode_step_s(c), 1))
                for c in concurrency_points(engine.max_seqs)
            ),
        )
    else:
        from orchestrator.llamalib import llama_cpp

        library = llama_cpp()
        offload = bool(library.llama_supports_gpu_offload())
        build = f"{library.__version__} {library.llama_print_system_info().decode()}"
        speed = cached_speed(engine, environ, build)
    return DeviceProfile(
        hostname=socket.gethostname(),
        backend=engine.backend,
        cpu_cores=physical_cores(),
        threads=engine.threads,
        memory_total_bytes=memory.total,
        memory_available_bytes=memory.available,
        gpu_offload_supported=offload,
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
