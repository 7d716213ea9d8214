"""Live prefix reports: an engine's prompt cache knows its blocks, the agent's heartbeats report
them as numbered changes and snapshots, and the coordinator indexes them, hashes each admitted
prompt the same way and places it on the agent holding its prefix."""

from __future__ import annotations

import asyncio
from typing import Any

from agents.kvcache import PromptCache
from agents.prefix_report import SNAPSHOT_EVERY_REPORTS, PrefixReporter
from orchestrator.coordinator import Coordinator
from orchestrator.core.prefix import PREFIX_BLOCK_TOKENS, block_hashes
from orchestrator.protocol import (
    AgentId,
    Dispatch,
    GenerationParams,
    Heartbeat,
    PrefixReport,
    Register,
    Submit,
    WireModel,
    encode,
)
from orchestrator.settings import CoordinatorSettings
from tests.factories import profile

B = PREFIX_BLOCK_TOKENS


def test_the_first_report_is_a_snapshot_then_only_changes_are_sent() -> None:
    reporter = PrefixReporter(B)
    first = reporter.report(frozenset({1, 2}))
    assert first == PrefixReport(seq=0, block_tokens=B, snapshot=True, stored=(1, 2))
    assert reporter.report(frozenset({1, 2})) is None  # nothing changed: nothing numbered
    assert reporter.report(frozenset({2, 3})) == PrefixReport(
        seq=1, block_tokens=B, stored=(3,), removed=(1,)
    )
    reporter.restart()  # a new connection
    again = reporter.report(frozenset({2, 3}))
    assert again is not None and again.snapshot and again.seq == 0


def test_a_snapshot_is_due_every_so_many_reports() -> None:
    reporter = PrefixReporter(B)
    reports = [reporter.report(frozenset({n})) for n in range(2 * SNAPSHOT_EVERY_REPORTS + 1)]
    snapshots = [r.seq for r in reports if r is not None and r.snapshot]
    assert snapshots == [0, SNAPSHOT_EVERY_REPORTS, 2 * SNAPSHOT_EVERY_REPORTS]


def test_the_prompt_cache_holds_the_blocks_of_its_entries_only() -> None:
    cache = PromptCache(capacity_bytes=300)
    first = list(range(2 * B + 5))
    cache.park(first, None, 100)
    assert cache.held_blocks() == frozenset(block_hashes(first).hashes)
    longer = first + list(range(1000, 1000 + B))  # extends the first: replaces it
    cache.park(longer, None, 100)
    assert cache.held_blocks() == frozenset(block_hashes(longer).hashes)
    other = list(range(5000, 5000 + 2 * B))
    cache.park(other, None, 150)
    cache.park(list(range(9000, 9000 + B)), None, 150)  # over capacity: the oldest goes
    assert not cache.held_blocks() & frozenset(block_hashes(longer).hashes)
    cache.clear()
    assert cache.held_blocks() == frozenset()


class WordIds:
    """A tokenizer for model "m": one id per word (BOS 1 first)."""

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        return [1] + [hash(word) % 50_000 for word in text.split()] if model == "m" else None

    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        return 1 + len(text.split()), False


def two_agents() -> tuple[Coordinator, list[tuple[bytes, WireModel]]]:
    sent: list[tuple[bytes, WireModel]] = []
    c = Coordinator(
        CoordinatorSettings(policy="fcfs", placement="predicted"),
        token_counter=WordIds(),
        agent_sink=lambda identity, message: sent.append((identity, message)),
    )
    for name in ("a1", "a2"):
        agent = profile(model_name="m", max_seqs=4, decode_tps=50.0)
        c.on_agent_frame(name.encode(), encode(Register(name=name, profile=agent)), None)
    return c, sent


def heartbeat(c: Coordinator, name: str, report: PrefixReport) -> None:
    c.on_agent_frame(name.encode(), encode(Heartbeat(kv_used_tokens=0, prefixes=report)), None)


def placed(c: Coordinator, sent: list[tuple[bytes, WireModel]], prompt: str, **p: Any) -> bytes:
    async def submit() -> None:
        client = c.connect_local(lambda message: None)
        c.send_local(client, Submit(request_id="r", prompt=prompt, params=GenerationParams(**p)))
        c.schedule(now=c.now() + 1.0)

    asyncio.run(submit())
    return next(identity for identity, m in sent if isinstance(m, Dispatch))


DOCUMENT = " ".join(f"w{i}" for i in range(3 * B))


def test_a_prompt_goes_to_the_agent_that_reported_its_prefix() -> None:
    held = block_hashes(WordIds().token_ids(DOCUMENT, "m") or []).hashes
    for holder in ("a1", "a2"):
        c, sent = two_agents()
        heartbeat(c, holder, PrefixReport(seq=0, block_tokens=B, snapshot=True, stored=held))
        assert placed(c, sent, DOCUMENT + " and a question") == holder.encode()
        assert b'edgeorch_placements_total{prefix="prefix_here"} 1.0' in c.metrics.exposition()


def test_a_request_that_opts_out_of_the_cache_is_placed_as_if_nothing_were_held() -> None:
    held = block_hashes(WordIds().token_ids(DOCUMENT, "m") or []).hashes
    c, sent = two_agents()
    heartbeat(c, "a2", PrefixReport(seq=0, block_tokens=B, snapshot=True, stored=held))
    assert placed(c, sent, DOCUMENT, cache_prompt=False) == b"a1"
    assert b'edgeorch_placements_total{prefix="no_prefix"} 1.0' in c.metrics.exposition()


def test_reports_apply_in_order_and_a_gap_waits_for_the_next_snapshot() -> None:
    c, _ = two_agents()
    a2 = AgentId("a2")
    heartbeat(c, "a2", PrefixReport(seq=0, block_tokens=B, snapshot=True, stored=(1, 2)))
    heartbeat(c, "a2", PrefixReport(seq=1, block_tokens=B, stored=(3,), removed=(1,)))
    assert c.driver.prefixes.matches([2, 3]) == {a2: 2}
    assert c.driver.prefixes.matches([1, 2]) == {}
    heartbeat(c, "a2", PrefixReport(seq=3, block_tokens=B, stored=(4,)))  # 2 was missed
    assert c.driver.prefixes.blocks_held(a2) == 0
    heartbeat(c, "a2", PrefixReport(seq=4, block_tokens=B, stored=(5,)))  # still no snapshot
    assert c.driver.prefixes.blocks_held(a2) == 0
    heartbeat(c, "a2", PrefixReport(seq=30, block_tokens=B, snapshot=True, stored=(4, 5)))
    assert c.driver.prefixes.matches([4]) == {a2: 1}


def test_blocks_of_another_size_are_ignored() -> None:
    c, _ = two_agents()
    heartbeat(c, "a1", PrefixReport(seq=0, block_tokens=B + 1, snapshot=True, stored=(1,)))
    assert c.driver.prefixes.blocks_held(AgentId("a1")) == 0
