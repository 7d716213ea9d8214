"""The llama.cpp backend: continuous batching over llama.cpp's low-level API."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import psutil

from agents.backends import Measured
from agents.base import Engine
from agents.model import cache_dir, ensure_default_model
from agents.probe import cached_speed, physical_cores
from orchestrator.errors import InvalidRequest
from orchestrator.settings import AgentSettings


def build(settings: AgentSettings, environ: Mapping[str, str]) -> Engine:
    """Load the model (the embedded default unless ``--model``) into a new engine."""
    from agents.backends.llama.engine import LlamaEngine

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
        prompt_cache_bytes=settings.prompt_cache_bytes,
        prompt_cache_disk_bytes=settings.prompt_cache_disk_bytes,
        prompt_cache_dir=Path(settings.prompt_cache_dir)
        if settings.prompt_cache_dir
        else cache_dir(environ) / "kv",
    )


def measure(engine: Engine, environ: Mapping[str, str]) -> Measured:
    """Speeds measured through the engine once per device and llama.cpp build, then cached."""
    from orchestrator.llamalib import llama_cpp

    library = llama_cpp()
    build_id = f"{library.__version__} {library.llama_print_system_info().decode()}"
    return Measured(
        cached_speed(engine, environ, build_id), bool(library.llama_supports_gpu_offload())
    )
