"""The in-process coordinator benchmark serves every request it submits."""

from __future__ import annotations

import asyncio
from pathlib import Path

from benchmarks.coordinator_inprocess import one_run


def test_every_request_is_served_with_and_without_the_journal(tmp_path: Path) -> None:
    for journal_dir in (None, tmp_path):
        per_request_s = asyncio.run(one_run(300, 16, 4, journal_dir))
        assert 0 < per_request_s < 0.01
