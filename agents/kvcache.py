"""The agent's map of its unified KV pool: which token prefix each sequence id holds, which cells
are shared between ids, and which sequences are parked for reuse.

llama.cpp's unified cache shares cells between sequence ids (``llama_memory_seq_cp`` adds an id
to cells, it copies no data), so the pool's use is not the sum of sequence lengths. Cells are
tracked as runs: the tokens one sequence appended contiguously. A sequence holds a prefix of each
run it got by copying and the whole of the runs it appended, so a run's cells in use are its
longest holder's extent. Pure bookkeeping: no llama.cpp calls, no clock (recency is a counter).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

MIN_REUSED_TOKENS: Final = 16
"""Shorter common prefixes (a BOS and a word or two) are computed again: sharing them would
save next to nothing and pin cells that eviction could otherwise free."""


@dataclass(eq=False, slots=True)
class _Run:
    """Cells appended contiguously by ``owner`` from position ``start``."""

    owner: CachedSequence
    start: int


@dataclass(eq=False, slots=True)
class CachedSequence:
    """The tokens one llama.cpp sequence id holds at positions 0..len(tokens)-1."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    runs: list[tuple[_Run, int]] = field(default_factory=list)
    """(run, end position): the runs covering 0..len(tokens) in order."""
    parked: bool = False
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    source: CachedSequence
    tokens: int


class KvLedger:
    """Every cached sequence of one pool, active or parked, and the cells they use."""

    def __init__(self) -> None:
        self._sequences: dict[int, CachedSequence] = {}
        self._clock = 0

    def open(self, seq_id: int) -> CachedSequence:
        """An empty active sequence on a free ``seq_id``."""
        if seq_id in self._sequences:
            raise ValueError(f"sequence id {seq_id} is in use")
        sequence = CachedSequence(seq_id, last_used=self._tick())
        self._sequences[seq_id] = sequence
        return sequence

    def copy_prefix(self, source: CachedSequence, target: CachedSequence, length: int) -> None:
        """``target`` (empty) now shares ``source``'s first ``length`` cells."""
        if target.tokens or not 0 <= length <= len(source.tokens):
            raise ValueError(f"cannot copy {length} of {len(source.tokens)} tokens")
        target.tokens = source.tokens[:length]
        target.runs = [(run, min(end, length)) for run, end in source.runs if run.start < length]
        source.last_used = target.last_used = self._tick()

    def append(self, sequence: CachedSequence, tokens: list[int]) -> None:
        """Cells for ``tokens`` at the next positions of ``sequence``."""
        if not tokens:
            return
        start = len(sequence.tokens)
        sequence.tokens.extend(tokens)
        end = len(sequence.tokens)
        if sequence.runs and sequence.runs[-1][0].owner is sequence:
            sequence.runs[-1] = (sequence.runs[-1][0], end)
        else:
            sequence.runs.append((_Run(sequence, start), end))

    def park(self, sequence: CachedSequence) -> None:
        sequence.parked = True
        sequence.last_used = self._tick()

    def drop(self, sequence: CachedSequence) -> None:
        del self._sequences[sequence.seq_id]

    def sequences(self) -> list[CachedSequence]:
        return list(self._sequences.values())

    def parked(self) -> list[CachedSequence]:
        return [s for s in self._sequences.values() if s.parked]

    def used_cells(self, *, parked: bool = True) -> int:
        """Distinct cells held by active sequences, and by parked ones unless ``parked`` is
        false (then the cells only parked sequences hold count as free)."""
        extents: dict[int, int] = {}
        for sequence in self._sequences.values():
            if sequence.parked and not parked:
                continue
            for run, end in sequence.runs:
                key = id(run)
                extents[key] = max(extents.get(key, 0), end - run.start)
        return sum(extents.values())

    def parked_cells(self) -> int:
        """Cells that only parked sequences hold: free on demand."""
        return self.used_cells() - self.used_cells(parked=False)

    def longest_prefix(self, tokens: list[int]) -> PrefixMatch | None:
        """The cached sequence sharing the longest token prefix with ``tokens`` (ties: the most
        recently used), or None when none shares ``MIN_REUSED_TOKENS``."""
        best: PrefixMatch | None = None
        for sequence in self._sequences.values():
            length = common_prefix(sequence.tokens, tokens)
            if length >= MIN_REUSED_TOKENS and (
                best is None
                or length > best.tokens
                or (length == best.tokens and sequence.last_used > best.source.last_used)
            ):
                best = PrefixMatch(sequence, length)
        return best

    def eviction_order(self) -> list[CachedSequence]:
        """Parked sequences, first to evict first: least recently used, except that a sequence
        whose cells others share goes last (evicting it frees little, and its prefix is the one
        most likely asked for again)."""
        shared = self._shared_owners()
        return sorted(self.parked(), key=lambda s: (s in shared, s.last_used))

    def _shared_owners(self) -> set[CachedSequence]:
        return {
            run.owner
            for sequence in self._sequences.values()
            for run, _ in sequence.runs
            if run.owner is not sequence
        }

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


def common_prefix(left: list[int], right: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(left), len(right))
    for index in range(n):
        if left[index] != right[index]:
            return index
    return n
