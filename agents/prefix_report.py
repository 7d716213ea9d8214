"""The heartbeat's prefix report: which prompt prefix blocks the agent's engine holds, as changes
since the last report, with a full snapshot first on every connection and then every
``SNAPSHOT_EVERY_REPORTS`` reports, so a coordinator that restarted or missed a report
resynchronises. The coordinator treats the blocks as a hint for placement only; the engine
matches actual tokens before it reuses anything."""

from __future__ import annotations

from typing import Final

from orchestrator.protocol import MAX_CONTAINER_ITEMS, PrefixReport

SNAPSHOT_EVERY_REPORTS: Final = 30
"""Reports between snapshots (30 s at the default heartbeat interval)."""


class PrefixReporter:
    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._reported: frozenset[int] = frozenset()
        self._seq = 0

    def restart(self) -> None:
        """A new connection: the next report is a snapshot numbered 0."""
        self._seq = 0

    def report(self, held: frozenset[int]) -> PrefixReport | None:
        """The report for a heartbeat, given every block held now; None when nothing changed
        and no snapshot is due. More blocks than a frame holds are cut (a hint loses some
        hits, nothing else)."""
        snapshot = self._seq % SNAPSHOT_EVERY_REPORTS == 0
        if snapshot:
            stored, removed = held, frozenset[int]()
        else:
            stored, removed = held - self._reported, self._reported - held
            if not stored and not removed:
                return None
        report = PrefixReport(
            seq=self._seq,
            block_tokens=self.block_tokens,
            snapshot=snapshot,
            stored=tuple(sorted(stored)[:MAX_CONTAINER_ITEMS]),
            removed=tuple(sorted(removed)[:MAX_CONTAINER_ITEMS]),
        )
        self._reported = held
        self._seq += 1
        return report
