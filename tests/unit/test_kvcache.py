"""The agent's KV ledger: shared prefixes, parked sequences, cells in use, eviction order."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agents.kvcache import MIN_REUSED_TOKENS, KvLedger, common_prefix


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


def test_parked_cells_are_those_only_parked_sequences_hold() -> None:
    ledger = KvLedger()
    parked = ledger.open(0)
    ledger.append(parked, list(range(10)))
    ledger.park(parked)
    active = ledger.open(1)
    ledger.copy_prefix(parked, active, 6)
    assert ledger.used_cells(parked=False) == 6
    assert ledger.parked_cells() == 4


def test_longest_prefix_prefers_the_longest_then_the_most_recent() -> None:
    ledger = KvLedger()
    base = list(range(MIN_REUSED_TOKENS))
    old, new, longer = ledger.open(0), ledger.open(1), ledger.open(2)
    ledger.append(old, base)
    ledger.append(new, base)
    ledger.append(longer, [*base, -1])
    for sequence in (old, longer, new):
        ledger.park(sequence)
    match = ledger.longest_prefix([*base, -1, 5])
    assert match is not None and match.source is longer and match.tokens == len(base) + 1
    match = ledger.longest_prefix([*base, 7])
    assert match is not None and match.source is new and match.tokens == len(base)
    assert ledger.longest_prefix([*base[:-1], 8]) is None  # too short to be worth sharing


def test_eviction_takes_the_least_recent_and_shared_prefixes_last() -> None:
    ledger = KvLedger()
    shared, first, second = ledger.open(0), ledger.open(1), ledger.open(2)
    ledger.append(shared, [1, 2, 3])
    ledger.append(first, [5])
    ledger.append(second, [6])
    ledger.park(shared)
    ledger.park(first)
    ledger.park(second)
    user = ledger.open(3)
    ledger.copy_prefix(shared, user, 2)
    assert ledger.eviction_order() == [first, second, shared]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


operations = st.lists(
    st.tuples(
        st.sampled_from(["open", "append", "copy", "park", "drop"]),
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
        elif op == "park" and a in live:
            ledger.park(live[a])  # type: ignore[arg-type]
        elif op == "drop" and a in live:
            ledger.drop(live.pop(a))  # type: ignore[arg-type]
            del cells[a]
        distinct = {cell for held in cells.values() for cell in held}
        assert ledger.used_cells() == len(distinct)
        for seq_id, sequence in live.items():
            assert len(sequence.tokens) == len(cells[seq_id])  # type: ignore[attr-defined]
