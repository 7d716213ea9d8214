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


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Iterator[object]:
    from agents.backends.llama.engine import LlamaEngine

    engine = LlamaEngine(
        model_path, n_ctx=512, max_seqs=4, kv_budget_tokens=2048, n_gpu_layers=0, threads=2
    )
    yield engine
    engine.close()
