"""Turning generated token bytes into streamable text: incremental UTF-8 decoding and stop strings.

A token can end inside a multi-byte character, and a stop string can span several tokens, so
text is released only once it is whole and cannot be the start of a stop string. The stop string
itself is never emitted (as in OpenAI's API).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopStringFilter:
    """Feeds token bytes in, yields text safe to stream, and reports when a stop string hit."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that may be streamed now."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(piece)
        return self._release()

    def feed_text(self, piece: str) -> str:
        """Like ``feed`` for engines whose tokens are already text."""
        if self.stopped:
            return ""
        self._pending += piece
        return self._release()

    def flush(self) -> str:
        """End of generation: whatever is held back is final text (unless a stop hit)."""
        if self.stopped:
            return ""
        text = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return text

    def _release(self) -> str:
        hits = [(self._pending.find(s), s) for s in self._stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            self.stopped = True
            text, self._pending = self._pending[:cut], ""
            return text
        hold = self._held_suffix()
        text = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return text

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
