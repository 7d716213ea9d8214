from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.local import LocalCluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A coordinator (no agents yet) on ephemeral ports; stopped after the test."""
    local = LocalCluster(tmp_path)
    try:
        yield local
    finally:
        local.stop()
