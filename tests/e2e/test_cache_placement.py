"""Cache-aware placement on real processes: two llama agents report the prompt blocks they
park, the coordinator hashes each prompt with the model's own tokenizer, and a conversation's
next turn goes to the agent that holds its history."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from orchestrator.client import AsyncClient, GenerationResult
from orchestrator.local import LocalCluster

pytestmark = pytest.mark.e2e

HEARTBEATS_S = 2.5
"""Long enough for both agents' next heartbeats (1 s apart) to carry what they parked."""


def document(topic: str) -> str:
    return " ".join(
        f"Entry {i} on {topic}: item {i * 13 % 29} weighs {i * 7 % 31} kg and costs "
        f"{i * 11 % 47} euros."
        for i in range(24)
    )


def test_each_conversation_returns_to_the_agent_holding_its_history(
    tmp_path: Path, model_path: Path
) -> None:
    cluster = LocalCluster(tmp_path, "--policy", "fcfs")
    try:
        for name in ("llama-1", "llama-2"):
            cluster.start_agent(
                name,
                *("--backend", "llama", "--model", str(model_path), "--threads", "1"),
                *("--n-ctx", "2048", "--max-seqs", "1"),
            )
        cluster.wait_for_agents(2, timeout_s=120)

        async def conversations() -> list[tuple[GenerationResult, GenerationResult]]:
            async with AsyncClient(cluster.clients_endpoint, timeout_s=120) as client:
                firsts = [f"{document(t)}\nQuestion: what is heaviest?\nAnswer:" for t in "AB"]
                turn1 = await asyncio.gather(  # one slot each: one conversation per agent
                    *(
                        client.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True)
                        for p in firsts
                    )
                )
                await asyncio.sleep(HEARTBEATS_S)
                pairs = []
                for prompt, first in zip(firsts, turn1, strict=True):
                    follow_up = f"{prompt}{first.text}\nQuestion: and the cheapest?\nAnswer:"
                    second = await client.generate(
                        follow_up, max_tokens=8, temperature=0.0, ignore_eos=True
                    )
                    pairs.append((first, second))
                return pairs

        pairs = asyncio.run(conversations())
    finally:
        cluster.stop()
    assert {first.agent for first, _ in pairs} == {"llama-1", "llama-2"}
    assert [second.agent for _, second in pairs] == [first.agent for first, _ in pairs]
