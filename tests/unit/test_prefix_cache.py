"""Prefix blocks and cache-aware placement: the chained hashes, the coordinator's index of what
each agent holds, placement weighing each agent's cached prefix, and the simulator's
per-device prefix caches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.mooncake_trace import convert
from orchestrator.core.admission import SchedulerConfig
from orchestrator.core.driver import ClusterDriver
from orchestrator.core.events import (
    AgentLost,
    Dispatched,
    PrefixesHeld,
    PrefixesRemoved,
    PrefixesStored,
    RequestAccepted,
)
from orchestrator.core.placement import (
    Candidate,
    Choice,
    make_placement,
    placement_cost_s,
    predicted_completion_s,
)
from orchestrator.core.policies import job_tokens, make_policy
from orchestrator.core.prefix import PrefixIndex, PromptBlocks, block_hashes, cached_tokens
from orchestrator.core.views import SpeedProfile
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import AgentId
from orchestrator.sim import SimRequest, Simulator
from orchestrator.sim_cache import (
    IdleAwarePrefixCache,
    LruPrefixCache,
    SpillingPrefixCache,
    infinite_cache_reuse,
)
from orchestrator.sim_cluster import Cluster, DeviceSpec
from orchestrator.traces import arrival_scale, load_trace
from tests.factories import agent, agent_state, driver, jsonl, queued, record

A1, A2 = AgentId("a1"), AgentId("a2")


@given(
    st.lists(st.integers(0, 1000), min_size=0, max_size=40),
    st.lists(st.integers(0, 1000), min_size=0, max_size=40),
    st.integers(1, 8),
)
def test_two_prompts_share_leading_hashes_exactly_as_far_as_they_share_whole_blocks(
    a: list[int], b: list[int], block: int
) -> None:
    ha, hb = block_hashes(a, block).hashes, block_hashes(b, block).hashes
    assert len(ha) == len(a) // block
    assert common(ha, hb) == min(common(a, b) // block, len(ha), len(hb))


def common(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def test_a_block_hash_depends_on_every_block_before_it() -> None:
    first = block_hashes([1, 2, 3, 4], 2).hashes
    moved = block_hashes([9, 9, 3, 4], 2).hashes
    assert first[1] != moved[1]  # same tokens, different prefix


def test_covered_tokens_never_reach_the_whole_prompt() -> None:
    blocks = PromptBlocks((1, 2, 3), 64)
    assert blocks.tokens_of(2, 1000) == 128
    assert blocks.tokens_of(3, 192) == 191  # the last token is always computed


def test_the_index_matches_leading_runs_per_agent_and_forgets_agents() -> None:
    index = PrefixIndex()
    index.stored(A1, [1, 2, 3])
    index.stored(A2, [1, 2, 7])
    assert index.matches([1, 2, 3, 4]) == {A1: 3, A2: 2}
    assert index.matches([5, 1]) == {}
    index.removed(A1, [2])
    assert index.matches([1, 2, 3]) == {A1: 1, A2: 2}
    index.replace(A2, [9])
    assert index.matches([1, 2]) == {A1: 1}
    index.forget(A1)
    assert index.matches([1]) == {} and index.blocks_held(A1) == 0
    assert cached_tokens(PromptBlocks((9, 8), 10), 100, index) == {A2: 10}


def two_equal_agents_driver() -> tuple[ClusterDriver, list[int]]:
    cluster = driver(
        "fcfs",
        agent_state("a1", max_seqs=4, speed=SpeedProfile(((1, 50.0), (4, 120.0)), 500.0)),
        agent_state("a2", max_seqs=4, speed=SpeedProfile(((1, 50.0), (4, 120.0)), 500.0)),
    )
    return cluster, list(range(100, 116))


def test_placement_sends_a_request_where_its_prefix_is_cached() -> None:
    for holder in (A1, A2):
        cluster, hashes = two_equal_agents_driver()
        cluster.on_event(PrefixesStored(holder, tuple(hashes)), 0.0)
        blocks = PromptBlocks(tuple(hashes), 64)
        cluster.on_event(
            RequestAccepted(record("r1", prompt_tokens=1100, prompt_blocks=blocks)), 0.0
        )
        effects = cluster.schedule(1.0)
        assert [e.agent_id for e in effects if isinstance(e, Dispatched)] == [holder]


def test_stale_entries_go_with_evictions_snapshots_and_lost_agents() -> None:
    c, hashes = two_equal_agents_driver()
    c.on_event(PrefixesStored(A2, tuple(hashes)), 0.0)
    c.on_event(PrefixesRemoved(A2, tuple(hashes[:1])), 0.0)
    assert c.prefixes.matches(hashes) == {}
    c.on_event(PrefixesHeld(A2, tuple(hashes)), 0.0)
    assert c.prefixes.matches(hashes) == {A2: 16}
    c.on_event(AgentLost(A2, "died"), 0.0)
    c.on_event(PrefixesStored(A2, tuple(hashes)), 0.0)
    assert c.prefixes.matches(hashes) == {}


def test_the_job_size_counts_only_the_uncached_prompt() -> None:
    srtf = make_policy("srtf")
    whole = queued(prompt_tokens=1000, estimate=None)
    cached = queued(prompt_tokens=1000, estimate=None, cached_prompt_tokens=900)
    assert job_tokens(cached, 50.0) < job_tokens(whole, 50.0)
    assert srtf.key(cached) < srtf.key(whole)


# --- the simulator ------------------------------------------------------------------------

ONE_DEVICE = Cluster(
    "one",
    (
        DeviceSpec(
            "d1", "m", 4, 4096, 16384, SpeedProfile(((1, 50.0),), 100.0), prefix_cache_tokens=640
        ),
    ),
)


def sim_request(rid: str, at: float, hashes: tuple[int, ...] | None) -> SimRequest:
    blocks = None if hashes is None else PromptBlocks(hashes, 64)
    return SimRequest(rid, at, 640, 10, 10, None, prompt_blocks=blocks)


def run_one_device(*requests: SimRequest) -> tuple[int, int, list[float]]:
    config = SchedulerConfig(make_policy("fcfs"), make_placement("predicted"), 1e9)
    report = Simulator(ONE_DEVICE, config).run(list(requests))
    first = sorted(report.outcomes, key=lambda o: o.request_id)
    ttft = [o.first_token_s - o.arrival_s for o in first if o.first_token_s is not None]
    return report.prompt_tokens, report.reused_prompt_tokens, ttft


def test_a_device_prefills_only_what_it_does_not_hold() -> None:
    blocks = tuple(range(10))
    prompts, reused, ttft = run_one_device(
        sim_request("r1", 0.0, blocks), sim_request("r2", 100.0, blocks)
    )
    assert (prompts, reused) == (1280, 639)
    assert ttft[1] < ttft[0] / 100  # one token instead of 640 at 100 tokens/s


def test_the_simulated_driver_places_a_request_where_its_prefix_is_cached() -> None:
    """Joining the busy holder (one token to prefill) beats prefilling 640 tokens on the idle
    device, which cache-blind placement would pick for its faster step."""
    spec = ONE_DEVICE.devices[0]
    two = Cluster("two", (spec, replace(spec, name="d2")))
    config = SchedulerConfig(make_policy("fcfs"), make_placement("predicted"), 1e9)
    blocks = tuple(range(10))
    report = Simulator(two, config).run(
        [sim_request("r1", 0.0, blocks), sim_request("r2", 1.0, blocks)]
    )
    assert report.reused_prompt_tokens == 639


def test_evicted_blocks_are_prefilled_again_and_caching_can_be_off() -> None:
    other = tuple(range(100, 110))
    _, reused, _ = run_one_device(
        sim_request("r1", 0.0, tuple(range(10))),
        sim_request("r2", 50.0, other),  # fills the 640-token cache: r1's blocks go
        sim_request("r3", 100.0, tuple(range(10))),
    )
    assert reused == 0
    _, reused, _ = run_one_device(sim_request("r1", 0.0, None), sim_request("r2", 9.0, None))
    assert reused == 0


def test_the_infinite_cache_bound_counts_every_earlier_prefix() -> None:
    a, b = PromptBlocks((1, 2, 3), 64), PromptBlocks((1, 2, 9), 64)
    assert infinite_cache_reuse([(a, 192), (b, 192), (None, 50), (a, 200)]) == 128 + 192


# --- traces -------------------------------------------------------------------------------


def test_trace_rows_may_give_a_prompt_as_length_and_prefix_blocks(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"arrival_s": 0, "prompt": "", "prompt_tokens": 100, "output_tokens": 5,
         "prefix_blocks": [1, 2], "block_tokens": 64},
        {"arrival_s": 1, "prompt": "hi", "output_tokens": 3},
    ]  # fmt: skip
    first, second = load_trace(jsonl(path, rows))
    assert first.prompt_tokens == 100 and first.prefix == PromptBlocks((1, 2), 64)
    assert second.prompt_tokens is None and second.prefix is None
    bad = dict(rows[0], prefix_blocks=[1, "x"])
    path.write_text(json.dumps(bad) + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(InvalidRequest, match="line 1"):
        load_trace(path)


def test_the_work_load_basis_counts_prefill_time(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps({"arrival_s": i, "prompt": "", "output_tokens": 100}) + "\n"
            for i in range(11)
        )
    )
    rows = load_trace(path)
    lengths = [100] * 11
    decode_only = arrival_scale(rows, lengths, 100.0, 1.0, None)
    with_prefill = arrival_scale(rows, lengths, 100.0, 1.0, None, ([1000] * 11, 1000.0))
    assert with_prefill == pytest.approx(2 * decode_only)  # a prompt takes as long as its answer


def test_mooncake_rows_scale_lengths_and_blocks_together() -> None:
    rows = [
        {"timestamp": 1500, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]},
        {"timestamp": 2000, "input_length": 90000, "output_length": 0,
         "hash_ids": list(range(176))},
    ]  # fmt: skip
    first, second = convert(rows, Fraction(1, 8), 3072)
    assert first == {
        "arrival_s": 1.5, "prompt": "", "prompt_tokens": 138, "output_tokens": 7,
        "prefix_blocks": [0, 1, 2], "block_tokens": 64,
    }  # fmt: skip
    assert second["prompt_tokens"] == 3072 and second["prefix_blocks"] == list(range(48))
    assert second["output_tokens"] == 1


def test_a_full_cache_drops_a_prompts_tail_before_its_head() -> None:
    for cache in (LruPrefixCache(4 * 64), IdleAwarePrefixCache(4 * 64)):
        cache.keep(PromptBlocks((1, 2, 3), 64), 0.0)
        stored, evicted = cache.keep(PromptBlocks((7, 8), 64), 1.0)
        assert stored == [8, 7] and evicted == [3]
        assert cache.held(PromptBlocks((1, 2, 3), 64), 1000) == 128


def test_blocks_evicted_from_memory_spill_to_disk_and_come_back_on_use() -> None:
    for memory in (LruPrefixCache(2 * 64), IdleAwarePrefixCache(2 * 64)):
        cache = SpillingPrefixCache(memory, disk_tokens=3 * 64)
        first, second = PromptBlocks((1, 2), 64), PromptBlocks((7, 8), 64)
        assert cache.keep(first, 0.0) == ([2, 1], [])
        assert cache.keep(second, 1.0) == ([8, 7], [])  # 1 and 2 went to disk, not away
        assert cache.held(first, 1000) == 128 and cache.restored(first, 1000) == 128
        assert cache.restored(second, 1000) == 0
        assert cache.keep(first, 2.0) == ([], [])  # back in memory; 7 and 8 to disk
        assert cache.restored(first, 1000) == 0 and cache.restored(second, 1000) == 128
        stored, evicted = cache.keep(PromptBlocks((20, 21), 64), 3.0)
        assert stored == [21, 20] and evicted == [8]  # the disk's oldest block goes for good
        assert cache.held(second, 1000) == 64 and cache.held(PromptBlocks((8,), 64), 1000) == 0


def test_a_device_reads_spilled_blocks_back_faster_than_it_prefills_them() -> None:
    spec = replace(ONE_DEVICE.devices[0], prefix_disk_tokens=640, disk_restore_tps=1e4)
    config = SchedulerConfig(make_policy("fcfs"), make_placement("predicted"), 1e9)
    blocks = tuple(range(10))
    report = Simulator(Cluster("disk", (spec,)), config).run(
        [
            sim_request("r1", 0.0, blocks),
            sim_request("other", 50.0, tuple(range(100, 110))),  # memory full: r1 to disk
            sim_request("r2", 100.0, blocks),
        ]
    )
    _, first, second = sorted(report.outcomes, key=lambda o: o.request_id)  # other, r1, r2
    assert report.reused_prompt_tokens == 639
    assert first.first_token_s is not None and second.first_token_s is not None
    ttft = [first.first_token_s - first.arrival_s, second.first_token_s - second.arrival_s]
    assert ttft[1] < ttft[0] / 10  # 639 tokens read at 10,000/s, not prefilled at 100/s
    assert ttft[1] > 639 / 1e4


def test_idle_eviction_keeps_the_block_that_comes_back() -> None:
    """Block 1 (a conversation) came back once; then five one-off prompts pass through a cache
    of four blocks. Least-recently-used drops the conversation while its user thinks;
    idle-aware drops the one-off prompts, which never came back."""
    kept = {}
    for cache in (LruPrefixCache(4 * 64), IdleAwarePrefixCache(4 * 64)):
        cache.keep(PromptBlocks((1,), 64), 0.0)
        cache.keep(PromptBlocks((100,), 64), 1.0)
        cache.keep(PromptBlocks((1,), 64), 2.0)
        for t in range(3, 8):
            cache.keep(PromptBlocks((100 + t,), 64), float(t))
        kept[type(cache).__name__] = cache.held(PromptBlocks((1, 2), 64), 1000)
    assert kept == {"LruPrefixCache": 0, "IdleAwarePrefixCache": 64}


def test_idle_eviction_drops_a_block_long_overdue_before_one_still_due() -> None:
    """Block 1 came back every second (an agent's tool calls) and then stopped, at t=2; block
    2 came back after 50 s (a user thinking). At t=100 a new prompt needs room: block 1,
    overdue for 97 s, is expected to stay idle longest, not block 2 or the new prompt."""
    cache = IdleAwarePrefixCache(2 * 64)
    for t, h in ((0.0, 1), (0.0, 2), (1.0, 1), (2.0, 1), (50.0, 2)):
        cache.keep(PromptBlocks((h,), 64), t)
    assert cache.keep(PromptBlocks((3,), 64), 100.0) == ([3], [1])


def test_a_request_waits_for_a_busy_agent_holding_its_prefix_when_that_is_sooner() -> None:
    """Done sooner on the busy holder (1 s wait, no prefill) than on the free agent (a 2 s
    prefill): it waits for the holder, though not 1 / WAIT_ADVANTAGE times sooner; without
    the hit it starts at once."""
    speed = SpeedProfile(((1, 50.0),), 500.0)
    request = queued(prompt_tokens=1000, estimate=None, max_tokens=50)
    holder, free = agent("a1", running=1, max_seqs=1, speed=speed), agent("a2", speed=speed)
    placement = make_placement("predicted")
    for cached, expected in ((999, Choice(None, A1)), (0, Choice(A2))):
        candidates = [Candidate(holder, False, 0, 1.0, cached), Candidate(free, True, 1100, 0.0)]
        assert placement.choose(request, candidates, 0) == expected


def test_a_prefix_every_agent_holds_is_no_reason_to_wait_behind_others() -> None:
    """The faster busy agent costs less (1.94 s against 2.74 s, its stall counted) and a request
    ranked ahead already waits for it. Where the free agent holds the same 128-token system
    prompt, the hit is no reason to wait: the request waits only if the busy agent is
    1 / WAIT_ADVANTAGE times sooner, and starts now. Where the busy agent holds more of the
    prompt, or nobody waits for it yet, it waits for it."""
    request = queued(prompt_tokens=1000, estimate=None, max_tokens=50)
    busy = agent("a1", running=1, max_seqs=1, speed=SpeedProfile(((1, 100.0),), 4000.0))
    free = agent("a2", speed=SpeedProfile(((1, 50.0),), 500.0))
    placement = make_placement("predicted")
    for busy_cached, waiting, expected in (
        (128, 1, Choice(A2)),
        (999, 1, Choice(None, A1)),
        (128, 0, Choice(None, A1)),
    ):
        candidates = [
            Candidate(busy, False, 0, 1.0, busy_cached, waiting=waiting),
            Candidate(free, True, 1100, 0.0, 128),
        ]
        assert placement.choose(request, candidates, 0) == expected
    costs = [
        placement_cost_s(request, Candidate(busy, False, 0, 1.0, 128)),
        placement_cost_s(request, Candidate(free, True, 1100, 0.0, 128)),
    ]
    assert costs == pytest.approx([1.936, 2.744])


def test_placement_counts_the_stall_an_uncached_prefill_puts_on_running_streams() -> None:
    """The fast busy agent would finish the request first (3.0 s against 3.5 s on the slow
    idle holder), but prefilling 1,000 tokens there stalls its three running streams 2 s each:
    the request goes to the holder. Where the fast agent holds the prompt, it goes there."""
    request = queued(prompt_tokens=1000, estimate=None, max_tokens=50)
    slow = agent("a1", max_seqs=4, speed=SpeedProfile(((1, 15.0),), 500.0))
    fast = agent("a2", running=3, max_seqs=4, speed=SpeedProfile(((1, 100.0), (4, 200.0)), 500.0))
    placement = make_placement("predicted")
    for slow_cached, fast_cached, expected in ((900, 0, Choice(A1)), (0, 900, Choice(A2))):
        candidates = [
            Candidate(slow, True, 1100, 0.0, slow_cached),
            Candidate(fast, True, 1100, 0.0, fast_cached),
        ]
        assert placement.choose(request, candidates, 0) == expected
    completions = [
        predicted_completion_s(request, Candidate(a, True, 1100, 0.0)) for a in (slow, fast)
    ]
    assert completions[1] < completions[0] - 2.0  # uncached, the fast one is still far sooner
