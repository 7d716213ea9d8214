"""The agent's KV bookkeeping: shared prefixes and cells in use in the pool, and the host
cache of parked prompts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.kvcache import MIN_REUSED_TOKENS, KvLedger, PromptCache, common_prefix


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
