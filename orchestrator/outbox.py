"""The coordinator's write-ahead outbox: journal ops commit before any frame sent after them.

Without a journal, frames leave at once. With one, ops and frames wait here and leave together
when the event loop goes idle (or the batch fills): one transaction for the ops, then the
frames and in-process replies, in order. A journal write that fails stops the coordinator
(crash-only) rather than let it acknowledge what it could not record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from orchestrator.journal import Journal, JournalOp

log = logging.getLogger("edgeorch.coordinator")

JOURNAL_BATCH_MAX: Final = 512
"""Journal ops and frames held for one commit before flushing without waiting for the loop to
go idle (a burst of frames is read without yielding, so bursts share one commit)."""


class Outbox:
    def __init__(self, journal: Journal | None) -> None:
        self.journal = journal
        self._ops: list[JournalOp] = []
        self._sends: list[Callable[[], object]] = []
        self._flush_handle: asyncio.Handle | None = None
        self.failed: asyncio.Future[None] | None = None
        """Set (with the exception) when a journal write failed; created by ``start``."""

    def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()

    def write(self, op: JournalOp) -> None:
        """Journal ``op``; it commits before any frame sent after this call leaves."""
        if self.journal is not None:
            self._ops.append(op)
            self._schedule_flush()

    def send(self, send: Callable[[], object]) -> None:
        """Carry out ``send`` at once without a journal, else after the pending ops commit."""
        if self.journal is None:
            send()
            return
        self._sends.append(send)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if len(self._ops) + len(self._sends) >= JOURNAL_BATCH_MAX:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Commit the pending ops as one transaction, then send what waited."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        ops, self._ops = self._ops, []
        sends, self._sends = self._sends, []
        if self.failed is not None and self.failed.done():
            return  # stopping: nothing leaves that the journal may not hold
        if self.journal is not None and ops:
            try:
                self.journal.write(ops)
            except Exception as exc:
                log.exception("journal %s write failed: stopping", self.journal.path)
                if self.failed is not None and not self.failed.done():
                    self.failed.set_exception(exc)
                return
        for send in sends:
            send()
