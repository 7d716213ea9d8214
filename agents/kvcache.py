"""The agent's KV bookkeeping: which token prefix each llama.cpp sequence id holds in the
unified pool (and which cells running sequences share), and the host-memory cache of parked
prompts that finished sequences leave behind for reuse.

llama.cpp's unified cache shares cells between sequence ids (``llama_memory_seq_cp`` adds an id
to cells, it copies no data), so the pool's use is not the sum of sequence lengths. Cells are
tracked as runs: the tokens one sequence appended contiguously. A sequence holds a prefix of each
run it got by copying and the whole of the runs it appended, so a run's cells in use are its
longest holder's extent.

Parked prompts live outside the pool, as llama.cpp's serialized sequence state (llama-server's
``--cache-ram`` does the same): on the CPU backend every prompt token attends over every cell
in the pool's used range, masked or not, so cells kept in the pool for later would slow every
prefill (2x at a full pool on the development machine; docs/BENCHMARKS.md, "Prompt cache").
What host memory cannot hold may spill to disk (a ``Spill``): reading a parked chat back costs
milliseconds where prefilling it again on an edge CPU costs seconds.
Pure bookkeeping: no llama.cpp calls, no clock (recency is a counter); the spill does the I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final, Protocol

from orchestrator.core.prefix import block_hashes

MIN_REUSED_TOKENS: Final = 16
"""Shorter common prefixes (a BOS and a word or two) are computed again: sharing them would
save next to nothing."""


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
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    source: CachedSequence
    tokens: int


@dataclass(eq=False, slots=True)
class ParkedPrompt:
    """A finished sequence's tokens and its saved cache (opaque to the bookkeeping): the state
    itself in host memory, or the spill's handle to it once ``spilled``."""

    tokens: list[int]
    state: object
    size_bytes: int
    last_used: int = 0
    blocks: tuple[int, ...] = ()
    """Its tokens' prefix block hashes (``core.prefix.block_hashes``)."""
    spilled: bool = False


class Spill(Protocol):
    """Where parked states go when host memory is full (``agents.kvspill.DiskSpill``)."""

    capacity_bytes: int

    def write(self, state: object, size_bytes: int) -> object:
        """Store a state (now or in the background); returns the handle to read it back by.
        May raise OSError; a failure found later makes ``read`` return None."""
        ...

    def read(self, handle: object, size_bytes: int) -> object | None:
        """The state again, or None when it is gone or damaged."""
        ...

    def delete(self, handle: object) -> None: ...


class PromptCache:
    """Parked prompts in host memory, at most ``capacity_bytes``, and beyond that in ``spill``
    (at most its own capacity), least recently used moved out first. It also keeps which
    prefix blocks (``core.prefix``) its entries hold, which the agent reports so the
    coordinator can place a request where its prefix is."""

    def __init__(self, capacity_bytes: int, spill: Spill | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.spill = spill
        self._entries: list[ParkedPrompt] = []
        self._clock = 0
        self._blocks: Counter[int] = Counter()
        """Block hash -> how many entries hold it."""
        self._held: frozenset[int] | None = frozenset()
        """``held_blocks()`` until the blocks change (None: to compute again)."""
        self.spill_failures = 0
        """Spill writes and reads that failed (the state was dropped or computed again)."""
        self.spill_reads = 0
        """States read back from the spill for a hit."""

    def park(self, tokens: list[int], state: object, size_bytes: int) -> bool:
        """Keep a finished sequence's cache; false when it alone exceeds the capacity. An
        entry whose tokens the new one extends is dropped: the new one serves its requests."""
        if size_bytes > self.capacity_bytes or len(tokens) < MIN_REUSED_TOKENS:
            return False
        for entry in [e for e in self._entries if common_prefix(e.tokens, tokens) == len(e.tokens)]:
            self.remove(entry)
        self._clock += 1
        entry = ParkedPrompt(tokens, state, size_bytes, self._clock, block_hashes(tokens).hashes)
        self._entries.append(entry)
        self._blocks.update(entry.blocks)
        self._held = None
        self._fit()
        return True

    def state_of(self, entry: ParkedPrompt) -> object | None:
        """The entry's state, read back from the spill if it went there (and then kept in
        host memory again, as the most recently used); None, and the entry forgotten, when
        the spill lost it."""
        if not entry.spilled:
            return entry.state
        assert self.spill is not None
        state = self.spill.read(entry.state, entry.size_bytes)
        if state is None:
            self.spill_failures += 1
            self.remove(entry)
            return None
        self.spill_reads += 1
        self.spill.delete(entry.state)
        entry.state, entry.spilled = state, False
        self.touch(entry)
        self._fit(keep=entry)
        return state

    def _fit(self, keep: ParkedPrompt | None = None) -> None:
        """Move the least recently used states out of host memory until the rest fit: to the
        spill while it has room (its own least recently used go first), else away."""
        spill = self.spill
        while self.bytes_held() > self.capacity_bytes:
            victim = min(
                (e for e in self._entries if not e.spilled and e is not keep),
                key=lambda e: e.last_used,
            )
            if spill is None or victim.size_bytes > spill.capacity_bytes:
                self.remove(victim)
                continue
            try:
                handle = spill.write(victim.state, victim.size_bytes)
            except OSError:
                self.spill_failures += 1
                self.remove(victim)
                continue
            victim.state, victim.spilled = handle, True
            while self.spilled_bytes() > spill.capacity_bytes:
                self.remove(min((e for e in self._entries if e.spilled), key=lambda e: e.last_used))

    def longest_prefix(self, tokens: list[int]) -> tuple[ParkedPrompt, int] | None:
        """The entry sharing the longest prefix with ``tokens`` (at least
        ``MIN_REUSED_TOKENS``), and how long that prefix is."""
        best: tuple[ParkedPrompt, int] | None = None
        for entry in self._entries:
            length = common_prefix(entry.tokens, tokens)
            if length >= MIN_REUSED_TOKENS and (best is None or length > best[1]):
                best = (entry, length)
        return best

    def touch(self, entry: ParkedPrompt) -> None:
        self._clock += 1
        entry.last_used = self._clock

    def remove(self, entry: ParkedPrompt) -> None:
        self._entries.remove(entry)
        if entry.spilled and self.spill is not None:
            self.spill.delete(entry.state)
        self._blocks.subtract(entry.blocks)
        for h in entry.blocks:
            if self._blocks[h] <= 0:
                del self._blocks[h]
        self._held = None

    def clear(self) -> None:
        for entry in list(self._entries):
            self.remove(entry)

    def held_blocks(self) -> frozenset[int]:
        """The prefix block hashes of every parked prompt, in memory or spilled."""
        if self._held is None:
            self._held = frozenset(self._blocks)
        return self._held

    def tokens_spilled(self) -> int:
        """Tokens of the parked prompts that are on the spill, not in host memory."""
        return sum(len(e.tokens) for e in self._entries if e.spilled)

    def tokens_held(self) -> int:
        """Tokens of every parked prompt, in memory or spilled."""
        return sum(len(e.tokens) for e in self._entries)

    def bytes_held(self) -> int:
        """Bytes of the states in host memory."""
        return sum(e.size_bytes for e in self._entries if not e.spilled)

    def spilled_bytes(self) -> int:
        return sum(e.size_bytes for e in self._entries if e.spilled)


class KvLedger:
    """The sequences in one pool and the cells they use."""

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

    def drop(self, sequence: CachedSequence) -> None:
        del self._sequences[sequence.seq_id]

    def sequences(self) -> list[CachedSequence]:
        return list(self._sequences.values())

    def used_cells(self) -> int:
        """Distinct cells the sequences hold."""
        extents: dict[int, int] = {}
        for sequence in self._sequences.values():
            for run, end in sequence.runs:
                key = id(run)
                extents[key] = max(extents.get(key, 0), end - run.start)
        return sum(extents.values())

    def longest_prefix(self, tokens: list[int]) -> PrefixMatch | None:
        """The sequence sharing the longest token prefix with ``tokens`` (ties: the most
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

    def _tick(self) -> int:
        self._clock += 1
        return self._clock


COMPARE_STRIDE: Final = 64
"""Tokens compared a slice at a time (in C) before the one slice that differs is walked."""


def common_prefix(left: list[int], right: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(left), len(right))
    start = 0
    while start < n:
        end = min(n, start + COMPARE_STRIDE)
        if left[start:end] != right[start:end]:
            break
        start = end
    else:
        return n
    for index in range(start, min(n, start + COMPARE_STRIDE)):
        if left[index] != right[index]:
            return index
    return n
