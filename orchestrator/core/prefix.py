"""Which agent holds which prompt prefix: chained hashes of fixed-size token blocks, and the
coordinator's index of the blocks each agent reports holding.

A block's hash covers its tokens and every block before it (vLLM's prefix caching and
Mooncake's traces key KV blocks so), so two prompts share their first ``k`` hashes exactly when
they share their first ``k`` blocks of tokens, and an agent holding a request's first ``k``
hashes holds the KV of its first ``k`` blocks. The index is advisory: the agent matches the
actual tokens before it reuses anything, so a stale or colliding entry costs a misplaced request,
never a wrong answer. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from orchestrator.protocol import AgentId

PREFIX_BLOCK_TOKENS: Final = 64
"""Tokens a block covers. Smaller blocks match more of a prompt that diverges mid-block, at the
price of more hashes to report and index: 64 tokens is about a sentence or two, and a 4,096-token
context is 64 hashes."""
_ROOT: Final = b"edgeorch-prefix-v1"
_TOKEN_BYTES: Final = array("q").itemsize


@dataclass(frozen=True, slots=True)
class PromptBlocks:
    """A prompt's block hashes (the last block may be partial) and its block size."""

    hashes: tuple[int, ...]
    block_tokens: int

    def tokens_of(self, blocks: int, prompt_tokens: int) -> int:
        """Prompt tokens covered by the first ``blocks`` blocks; never the whole prompt (the
        engine always computes at least the last token)."""
        return max(0, min(blocks * self.block_tokens, prompt_tokens - 1))


def block_hashes(token_ids: Sequence[int], block_tokens: int = PREFIX_BLOCK_TOKENS) -> PromptBlocks:
    """The chained hashes of ``token_ids`` in blocks of ``block_tokens`` (full blocks only: a
    partial last block changes as the conversation grows, so nothing would match it)."""
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    hashes: list[int] = []
    parent = _ROOT
    data = array("q", token_ids).tobytes()
    step = block_tokens * _TOKEN_BYTES
    for start in range(0, len(data) - step + 1, step):
        parent = hashlib.blake2b(parent + data[start : start + step], digest_size=8).digest()
        hashes.append(int.from_bytes(parent, "little", signed=True))
    return PromptBlocks(tuple(hashes), block_tokens)


class PrefixIndex:
    """Block hash -> the agents that reported holding it, kept from their stored and removed
    events and replaced wholesale by a snapshot (resynchronisation after a gap)."""

    def __init__(self) -> None:
        self._holders: dict[int, set[AgentId]] = {}
        self._held: dict[AgentId, set[int]] = {}

    def stored(self, agent_id: AgentId, hashes: Iterable[int]) -> None:
        held = self._held.setdefault(agent_id, set())
        for h in hashes:
            held.add(h)
            self._holders.setdefault(h, set()).add(agent_id)

    def removed(self, agent_id: AgentId, hashes: Iterable[int]) -> None:
        held = self._held.get(agent_id)
        if held is None:
            return
        for h in hashes:
            held.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(agent_id)
                if not holders:
                    del self._holders[h]

    def replace(self, agent_id: AgentId, hashes: Iterable[int]) -> None:
        """Everything ``agent_id`` holds is ``hashes`` (a snapshot)."""
        self.forget(agent_id)
        self.stored(agent_id, hashes)

    def forget(self, agent_id: AgentId) -> None:
        """The agent is gone, or its cache with it."""
        self.removed(agent_id, list(self._held.get(agent_id, ())))
        self._held.pop(agent_id, None)

    def blocks_held(self, agent_id: AgentId) -> int:
        return len(self._held.get(agent_id, ()))

    def matches(self, hashes: Sequence[int]) -> Mapping[AgentId, int]:
        """For each agent holding at least the first block: how many leading blocks it holds.
        Costs the length of the longest match, not the index's size."""
        if not hashes:
            return {}
        first = self._holders.get(hashes[0])
        if not first:
            return {}
        matched = dict.fromkeys(first, 1)
        alive = set(first)
        for depth, h in enumerate(hashes[1:], start=2):
            alive &= self._holders.get(h, set())
            if not alive:
                break
            for agent_id in alive:
                matched[agent_id] = depth
        return matched


def cached_tokens(
    blocks: PromptBlocks | None, prompt_tokens: int, index: PrefixIndex
) -> Mapping[AgentId, int]:
    """Prompt tokens each agent holds of a prompt (only agents holding some)."""
    if blocks is None:
        return {}
    return {
        agent_id: blocks.tokens_of(n, prompt_tokens)
        for agent_id, n in index.matches(blocks.hashes).items()
    }
