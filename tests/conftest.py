from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from orchestrator.local import LocalCluster

# Property tests check behaviour, not speed: hypothesis's default 200 ms deadline per example
# fails them on a loaded two-core machine, and timing is what the benchmarks measure.
settings.register_profile("edgeorch", deadline=None)
settings.load_profile("edgeorch")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A coordinator (no agents yet) on ephemeral ports; stopped after the test."""
    local = LocalCluster(tmp_path)
    try:
        yield local
    finally:
        local.stop()
