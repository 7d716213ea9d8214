"""The agent's KV bookkeeping: shared prefixes and cells in use in the pool, and the host
cache of parked prompts."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.kvcache import MIN_REUSED_TOKENS, KvLedger, PromptCache, common_prefix
from agents.kvspill import DiskSpill


def test_a_copied_prefix_shares_its_cells() -> None:
    ledger = KvLedger()
    source = ledger.open(0)
    ledger.append(source, [1, 2, 3, 4, 5])
    copy = ledger.open(1)
    ledger.copy_prefix(source, copy, 3)
    ledger.append(copy, [9, 9])
    assert copy.tokens == [1, 2, 3, 9, 9]
    assert ledger.used_cells() == 5 + 2
    ledger.drop(source)
    assert ledger.used_cells() == 5  # the copy still holds the three shared cells


def test_longest_prefix_prefers_the_longest_then_the_most_recent() -> None:
    ledger = KvLedger()
    base = list(range(MIN_REUSED_TOKENS))
    old, new, longer = ledger.open(0), ledger.open(1), ledger.open(2)
    ledger.append(old, base)
    ledger.append(new, base)
    ledger.append(longer, [*base, -1])
    copy = ledger.open(3)
    ledger.copy_prefix(new, copy, 2)  # uses ``new`` last
    match = ledger.longest_prefix([*base, -1, 5])
    assert match is not None and match.source is longer and match.tokens == len(base) + 1
    match = ledger.longest_prefix([*base, 7])
    assert match is not None and match.source in (new, copy) and match.tokens == len(base)
    assert ledger.longest_prefix([*base[:-1], 8]) is None  # too short to be worth sharing


def test_the_prompt_cache_keeps_the_longest_version_and_evicts_the_least_recent() -> None:
    cache = PromptCache(capacity_bytes=100)
    base = list(range(MIN_REUSED_TOKENS))
    assert cache.park(base, "turn 1", 30)
    assert cache.park([*base, 1, 2], "turn 2", 30)  # extends turn 1, which it replaces
    assert cache.tokens_held() == len(base) + 2 and cache.bytes_held() == 30
    other = [-t for t in base]
    assert cache.park(other, "other", 30)
    found = cache.longest_prefix([*base, 1, 9])
    assert found is not None and found[0].state == "turn 2" and found[1] == len(base) + 1
    cache.touch(found[0])
    assert cache.park([7, *base], "third", 50)  # over capacity: "other" is the least recent
    assert cache.longest_prefix(other) is None
    assert cache.longest_prefix(base) is not None
    assert not cache.park(base, "too big", 101)
    assert not cache.park(base[:3], "too short", 1)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


@given(st.lists(st.integers(0, 3), max_size=300), st.lists(st.integers(0, 3), max_size=300))
def test_common_prefix_by_slices_matches_a_token_by_token_walk(
    left: list[int], right: list[int]
) -> None:
    walked = next(
        (i for i, (a, b) in enumerate(zip(left, right, strict=False)) if a != b),
        min(len(left), len(right)),
    )
    assert common_prefix(left, right) == walked
    assert common_prefix([*left, *right], [*left, *left]) >= len(left)


class MemorySpill:
    """A spill in a dict, with failures on demand."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.stored: dict[int, object] = {}
        self.full = False
        self._next = 0

    def write(self, state: object, size_bytes: int) -> object:
        if self.full:
            raise OSError("no space left on device")
        self._next += 1
        self.stored[self._next] = state
        return self._next

    def read(self, handle: object, size_bytes: int) -> object | None:
        assert isinstance(handle, int)
        return self.stored.get(handle)

    def delete(self, handle: object) -> None:
        assert isinstance(handle, int)
        self.stored.pop(handle, None)


def prompt(first: int) -> list[int]:
    return list(range(first, first + MIN_REUSED_TOKENS))


def test_what_memory_cannot_hold_spills_and_comes_back_on_a_hit() -> None:
    spill = MemorySpill(capacity_bytes=60)
    cache = PromptCache(capacity_bytes=50, spill=spill)
    for n in range(3):
        assert cache.park(prompt(100 * n), f"s{n}", 30)
    # s0 went to the spill at s1, s1 at s2 (each alone fits memory); the spill holds both.
    assert cache.bytes_held() == 30 and cache.spilled_bytes() == 60
    assert sorted(map(str, spill.stored.values())) == ["s0", "s1"]
    assert cache.tokens_held() == 3 * MIN_REUSED_TOKENS
    assert cache.tokens_spilled() == 2 * MIN_REUSED_TOKENS
    assert len(cache.held_blocks()) == 0  # 16-token prompts fill no 64-token block
    found = cache.longest_prefix(prompt(0))
    assert found is not None and found[0].spilled
    assert cache.state_of(found[0]) == "s0"  # read back, kept in memory again
    assert cache.spill_reads == 1 and cache.spill_failures == 0
    assert not found[0].spilled and sorted(map(str, spill.stored.values())) == ["s1", "s2"]
    assert cache.park(prompt(300), "s3", 30)  # the spill is full: its oldest (s1) goes
    assert cache.longest_prefix(prompt(100)) is None
    assert sorted(map(str, spill.stored.values())) == ["s0", "s2"]


def test_a_lost_or_failed_spill_costs_the_entry_only() -> None:
    spill = MemorySpill(capacity_bytes=100)
    cache = PromptCache(capacity_bytes=30, spill=spill)
    cache.park(prompt(0), "s0", 30)
    cache.park(prompt(100), "s1", 30)
    spill.stored.clear()  # the file went away under the agent
    entry = cache.longest_prefix(prompt(0))
    assert entry is not None and cache.state_of(entry[0]) is None
    assert cache.longest_prefix(prompt(0)) is None and cache.spill_failures == 1
    spill.full = True
    assert cache.park(prompt(200), "s2", 30)  # s1 cannot spill: dropped, s2 kept
    assert cache.longest_prefix(prompt(100)) is None and cache.spill_failures == 2
    assert cache.longest_prefix(prompt(200)) is not None


def test_states_larger_than_the_spill_are_dropped_and_clear_empties_it() -> None:
    spill = MemorySpill(capacity_bytes=20)
    cache = PromptCache(capacity_bytes=30, spill=spill)
    cache.park(prompt(0), "big", 30)
    cache.park(prompt(100), "next", 30)
    assert cache.longest_prefix(prompt(0)) is None and not spill.stored
    spill.capacity_bytes = 100
    cache.park(prompt(200), "third", 30)
    assert spill.stored
    cache.clear()
    assert not spill.stored and cache.tokens_held() == 0


def test_disk_spill_round_trips_a_state_and_reads_damage_as_gone(tmp_path: Path) -> None:
    spill = DiskSpill(tmp_path, capacity_bytes=1 << 20)
    state = (ctypes.c_uint8 * 8)(*range(8))
    handle = spill.write(state, 6)
    back = spill.read(handle, 6)
    assert back is not None and bytes(back) == bytes(range(6))  # type: ignore[call-overload]
    (path,) = spill.directory.glob("*.state")
    for damaged in (b"xyz", bytes(range(7))):
        path.write_bytes(damaged)
        assert spill.read(handle, 6) is None
    spill.delete(handle)
    assert spill.read(handle, 6) is None and not path.exists()
    spill.close()
    assert not spill.directory.exists()


def test_a_spill_write_that_fails_reads_as_gone(tmp_path: Path) -> None:
    spill = DiskSpill(tmp_path, capacity_bytes=1 << 20)
    spill.directory.rmdir()  # the write (on the spill's thread) cannot create its file
    handle = spill.write((ctypes.c_uint8 * 4)(), 4)
    assert spill.read(handle, 4) is None
    spill.delete(handle)
    spill.close()


def test_disk_spill_removes_what_a_killed_agent_left_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = tmp_path / "kv-999999999-abc"
    dead.mkdir()
    (dead / "0.state").write_bytes(b"old")
    live = tmp_path / f"kv-{os.getppid()}-def"
    live.mkdir()
    spill = DiskSpill(tmp_path, capacity_bytes=1)
    assert not dead.exists() and live.exists() and spill.directory.exists()
    spill.close()


operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "append", "copy", "drop"]),
        st.integers(0, 5),
        st.integers(0, 5),
        st.integers(0, 12),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_used_cells_match_a_cell_by_cell_model(steps: list[tuple[str, int, int, int]]) -> None:
    """Against a model that names every cell by the sequence that wrote it and its position,
    as llama.cpp's unified cache does (a copy adds owners to cells, it writes none)."""
    ledger = KvLedger()
    live: dict[int, object] = {}
    cells: dict[int, list[tuple[int, int]]] = {}
    writes = 0
    for op, a, b, n in steps:
        if op == "open" and a not in live:
            live[a] = ledger.open(a)
            cells[a] = []
        elif op == "append" and a in live:
            sequence = live[a]
            ledger.append(sequence, [7] * n)  # type: ignore[arg-type]
            start = len(cells[a])
            cells[a] += [(writes, start + i) for i in range(n)]
            writes += 1
        elif op == "copy" and a in live and b not in live:
            length = min(n, len(cells[a]))
            live[b] = ledger.open(b)
            ledger.copy_prefix(live[a], live[b], length)  # type: ignore[arg-type]
            cells[b] = cells[a][:length]
        elif op == "drop" and a in live:
            ledger.drop(live.pop(a))  # type: ignore[arg-type]
            del cells[a]
        distinct = {cell for held in cells.values() for cell in held}
        assert ledger.used_cells() == len(distinct)
        for seq_id, sequence in live.items():
            assert len(sequence.tokens) == len(cells[seq_id])  # type: ignore[attr-defined]
