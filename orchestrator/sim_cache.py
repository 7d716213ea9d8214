"""The simulated devices' prefix caches: the blocks of prompts a device has run, kept for reuse
up to its ``prefix_cache_tokens``, and two ways to choose what to drop when it is full.

- ``lru``: least recently used first.
- ``idle``: the block expected to stay idle longest first (LAMPS/MARS rank KV held during API
  calls by memory x time; every block holds the same cells here, so the time decides). A block
  that came back before is expected again after its usual gap (a smoothed mean of its own gaps,
  so a conversation's block waits about as long as its user thinks, an agent's as long as its
  tool runs) until it is overdue: one idle longer than half its gap is expected to stay idle
  as long again as it has been (a conversation that ended never comes back, and gaps are heavy
  tailed), so overdue blocks go least recently used first. A block never reused yet is
  expected back after the device's mean gap divided by the share of its blocks that ever came
  back (most blocks of one-off prompts never do).

A block is reachable only through every block before it, so a prompt's blocks are refreshed
last to first: its tail is always older than its head and goes first (vLLM frees a request's
blocks in reverse order for the same reason).

A device may also spill to disk (``SpillingPrefixCache``, as the llama agent's
``--prompt-cache-disk-bytes``): blocks evicted from memory move there, least recently used out
first, and a hit on them costs their read back (``disk_restore_tps``) instead of their prefill.
Pure: time comes in as arguments.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from orchestrator.core.prefix import PromptBlocks

GAP_SMOOTHING: Final = 0.5
"""Weight of the newest gap in a block's smoothed gap."""


class DevicePrefixCache(Protocol):
    def held(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        """Prompt tokens of the longest leading run of ``blocks`` held here."""
        ...

    def holds(self, h: int) -> bool: ...

    def restored(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        """Of the tokens ``held`` counts, those to be read back from disk first."""
        ...

    def keep(self, blocks: PromptBlocks, now: float) -> tuple[list[int], list[int]]:
        """Keep (or refresh) a started prompt's blocks; returns the hashes newly stored and
        those evicted."""
        ...


def _leading(blocks: PromptBlocks, holds: Callable[[int], bool]) -> int:
    matched = 0
    for h in blocks.hashes:
        if not holds(h):
            break
        matched += 1
    return matched


def _net(stored: list[int], evicted: list[int]) -> tuple[list[int], list[int]]:
    """A block stored and evicted by the same call is neither."""
    gone, new = set(evicted), set(stored)
    return [h for h in stored if h not in gone], [h for h in evicted if h not in new]


class LruPrefixCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._blocks: OrderedDict[int, int] = OrderedDict()
        self._held_tokens = 0

    def held(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        return blocks.tokens_of(_leading(blocks, self._blocks.__contains__), prompt_tokens)

    def holds(self, h: int) -> bool:
        return h in self._blocks

    def restored(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        return 0

    def discard(self, hashes: Iterable[int]) -> None:
        for h in hashes:
            tokens = self._blocks.pop(h, None)
            if tokens is not None:
                self._held_tokens -= tokens

    def keep(self, blocks: PromptBlocks, now: float) -> tuple[list[int], list[int]]:
        stored: list[int] = []
        for h in reversed(blocks.hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
            elif blocks.block_tokens <= self.capacity_tokens:
                self._blocks[h] = blocks.block_tokens
                self._held_tokens += blocks.block_tokens
                stored.append(h)
        evicted: list[int] = []
        while self._held_tokens > self.capacity_tokens:
            h, tokens = self._blocks.popitem(last=False)
            self._held_tokens -= tokens
            evicted.append(h)
        return _net(stored, evicted)


@dataclass(slots=True)
class _Block:
    tokens: int
    last_used_s: float
    gap_s: float | None = None
    """Smoothed time between uses; None until the block is used a second time."""
    version: int = 0


class IdleAwarePrefixCache:
    """Evicts the block expected to stay idle longest (see the module docstring). Blocks never
    reused wait in recency order (tail first); blocks with a gap history in a heap by when they
    are due back and in recency order too. A returning block's expected idle time left is
    max(gap - idle, idle), so the longest is either the latest due (the heap's top) or the
    least recently used (overdue the longest); an eviction compares that with the oldest block
    never reused."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._blocks: dict[int, _Block] = {}
        self._fresh: OrderedDict[int, None] = OrderedDict()
        self._returning: list[tuple[float, int, int]] = []
        """(-time due back, hash, version): a max-heap, stale entries skipped."""
        self._returning_order: OrderedDict[int, None] = OrderedDict()
        """Blocks with a gap history, least recently used first."""
        self._held_tokens = 0
        self._stored = 0
        self._returned = 0
        """Blocks used at least twice."""
        self._gaps = 0
        self._gap_total_s = 0.0

    def held(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        return blocks.tokens_of(_leading(blocks, self._blocks.__contains__), prompt_tokens)

    def holds(self, h: int) -> bool:
        return h in self._blocks

    def restored(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        return 0

    def keep(self, blocks: PromptBlocks, now: float) -> tuple[list[int], list[int]]:
        stored: list[int] = []
        for h in reversed(blocks.hashes):
            block = self._blocks.get(h)
            if block is not None:
                self._used_again(h, block, now)
            elif blocks.block_tokens <= self.capacity_tokens:
                self._blocks[h] = _Block(blocks.block_tokens, now)
                self._fresh[h] = None
                self._held_tokens += blocks.block_tokens
                self._stored += 1
                stored.append(h)
        evicted = list(self._evict(now))
        return _net(stored, evicted)

    def _used_again(self, h: int, block: _Block, now: float) -> None:
        gap = now - block.last_used_s
        if block.gap_s is None:
            del self._fresh[h]
            self._returned += 1
            block.gap_s = gap
        else:
            block.gap_s = GAP_SMOOTHING * gap + (1 - GAP_SMOOTHING) * block.gap_s
        self._returning_order[h] = None
        self._returning_order.move_to_end(h)
        self._gaps += 1
        self._gap_total_s += gap
        block.last_used_s = now
        block.version += 1
        heapq.heappush(self._returning, (-(now + block.gap_s), h, block.version))

    def _fresh_wait_s(self) -> float:
        """When a block never reused is expected back, after its last use."""
        if not self._returned:
            return float("inf")
        mean_gap = self._gap_total_s / self._gaps
        return mean_gap * self._stored / self._returned

    def _evict(self, now: float) -> Iterable[int]:
        while self._held_tokens > self.capacity_tokens:
            fresh = next(iter(self._fresh), None)
            returning = self._latest_returning(now)
            if fresh is not None and (
                returning is None or self._back_s(fresh, self._fresh_wait_s(), now) >= returning[0]
            ):
                del self._fresh[fresh]
                victim = fresh
            else:
                assert returning is not None
                victim = returning[1]
                del self._returning_order[victim]
            self._held_tokens -= self._blocks.pop(victim).tokens
            yield victim

    def _back_s(self, h: int, gap_s: float, now: float) -> float:
        """When block ``h``, usually idle ``gap_s``, is expected back: after its gap, or once
        overdue after as long again as it has been idle."""
        last_s = self._blocks[h].last_used_s
        return max(last_s + gap_s, 2 * now - last_s)

    def _latest_returning(self, now: float) -> tuple[float, int] | None:
        """(expected time back, hash) of the block with a gap history expected back last."""
        while self._returning:
            _, h, version = self._returning[0]
            block = self._blocks.get(h)
            if block is not None and block.version == version:
                break
            heapq.heappop(self._returning)
        if not self._returning:
            return None
        due_s, due = -self._returning[0][0], self._returning[0][1]
        overdue = next(iter(self._returning_order))
        overdue_back_s = 2 * now - self._blocks[overdue].last_used_s
        return (overdue_back_s, overdue) if overdue_back_s > due_s else (due_s, due)


class SpillingPrefixCache:
    """``memory`` (either eviction) with a disk behind it of ``disk_tokens``, least recently
    used first out. A block counts as held in either; one read from disk moves back to
    memory. Reports name a block stored when neither held it, evicted when neither does."""

    def __init__(self, memory: DevicePrefixCache, disk_tokens: int) -> None:
        self.memory = memory
        self.disk = LruPrefixCache(disk_tokens)

    def holds(self, h: int) -> bool:
        return self.memory.holds(h) or self.disk.holds(h)

    def held(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        return blocks.tokens_of(_leading(blocks, self.holds), prompt_tokens)

    def restored(self, blocks: PromptBlocks, prompt_tokens: int) -> int:
        leading = _leading(blocks, self.holds)
        on_disk = sum(1 for h in blocks.hashes[:leading] if not self.memory.holds(h))
        if not on_disk:
            return 0
        held = blocks.tokens_of(leading, prompt_tokens)
        return min(held, on_disk * blocks.block_tokens)

    def keep(self, blocks: PromptBlocks, now: float) -> tuple[list[int], list[int]]:
        back = {h for h in blocks.hashes if self.disk.holds(h) and not self.memory.holds(h)}
        self.disk.discard(back)
        stored, evicted = self.memory.keep(blocks, now)
        dropped: list[int] = []
        if evicted:
            spilled = PromptBlocks(tuple(reversed(evicted)), blocks.block_tokens)
            _, dropped = self.disk.keep(spilled, now)  # the first evicted is the oldest there
        gone = [h for h in (*evicted, *back) if not self.holds(h) and h not in dropped]
        return [h for h in stored if h not in back], dropped + gone


EVICTIONS: Final[dict[str, Callable[[int], DevicePrefixCache]]] = {
    "lru": LruPrefixCache,
    "idle": IdleAwarePrefixCache,
}


def infinite_cache_reuse(prompts: Iterable[tuple[PromptBlocks | None, int]]) -> int:
    """Prompt tokens one cache of unbounded size could reuse, seeing every prompt (its blocks
    and its tokens, in arrival order): the upper bound any placement and eviction can reach."""
    seen: set[int] = set()
    reused = 0
    for blocks, prompt_tokens in prompts:
        if blocks is None:
            continue
        reused += blocks.tokens_of(_leading(blocks, seen.__contains__), prompt_tokens)
        seen.update(blocks.hashes)
    return reused
