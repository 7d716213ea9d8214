from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.model import ensure_default_model


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded default model, assembled once into the cache."""
    return ensure_default_model(os.environ, progress=None)


@pytest.fixture(scope="session", params=["cpu", "gpu"])
def gpu_layers(request: pytest.FixtureRequest) -> int:
    """Layers to offload: none, then all of them (-1) where this llama.cpp build has a GPU
    backend; the GPU runs are skipped on a CPU-only build."""
    if request.param == "cpu":
        return 0
    from orchestrator.llamalib import llama_cpp

    if not llama_cpp().llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build cannot offload (build with CMAKE_ARGS=-DGGML_CUDA=on)")
    return -1


@pytest.fixture(scope="session")
def engine(model_path: Path, gpu_layers: int) -> Iterator[object]:
    from agents.backends.llama.engine import LlamaEngine

    engine = LlamaEngine(
        model_path,
        n_ctx=512,
        max_seqs=4,
        kv_budget_tokens=2048,
        n_gpu_layers=gpu_layers,
        threads=2,
    )
    yield engine
    engine.close()
