"""Add tool calls to a conversation trace: user turns become agent loops whose calls wait for
their tools, so that parked prefixes see both kinds of gap (a user thinking, a tool running).

The input is a simulator trace of conversations with prefix blocks (``mooncake_trace.py``'s
output: real arrivals, real think times between a conversation's turns, real prefix sharing).
A share of its user turns (``--tool-turn-share``) becomes a chain: the turn's call answers with
a tool call (``TOOL_CALL_TOKENS``), the tool runs, and the next call arrives when it returns
(``follows`` and ``gap_s``: the simulator releases it then), its prompt the previous one plus
that call and the tool's result (``TOOL_RESULT_TOKENS``), so it shares every whole block of
the previous prompt; the chain's last call gives the turn's original answer.

What the tools cost is an assumption, not a measurement of ours: a mixture of three kinds
after the spread InferCept (Abhyankar et al., ICML 2024) reports for augmented LLMs, from
well under a second (arithmetic, a step in a virtual environment) through about a second
(retrieval, web APIs) to tens of seconds (image or speech generation): ``TOOL_KINDS``, each
log-normal around its median, scaled as a whole by ``--tool-time-scale``. Chains stop early
where the prompt would pass ``--max-prompt-tokens``. Simplification: a chain's own blocks
(tool calls and results) are not part of its conversation's later user turns, which keep the
prompts of the original trace.

    .venv/bin/python benchmarks/mooncake_trace.py \\
        --mooncake ../shared/data/mooncake_fast25/conversation_trace.jsonl --out mc.jsonl
    .venv/bin/python benchmarks/agentic_trace.py --trace mc.jsonl --out agentic.jsonl
    .venv/bin/edgeorch bench --sim --cluster configs/cluster-edge.toml --trace agentic.jsonl \\
        --load 0.9 --load-basis work --prefix-eviction idle ...
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.mooncake_trace import DEFAULT_MAX_PROMPT_TOKENS, write_rows
from orchestrator.textio import read_lines


@dataclass(frozen=True)
class LogNormal:
    median: float
    sigma: float

    def draw(self, rng: random.Random) -> float:
        return self.median * math.exp(rng.gauss(0.0, self.sigma))


TOOL_KINDS: Final = (
    (0.4, LogNormal(median=0.1, sigma=1.0)),  # arithmetic, code snippets, environment steps
    (0.4, LogNormal(median=1.0, sigma=0.6)),  # retrieval, web and service APIs
    (0.2, LogNormal(median=15.0, sigma=0.5)),  # image or speech generation, a slow model
)
"""(share of tool calls, seconds the tool takes)."""
TOOL_CALL_TOKENS: Final = LogNormal(median=40, sigma=0.5)
"""A call that asks for a tool answers with a short structured message."""
TOOL_RESULT_TOKENS: Final = LogNormal(median=120, sigma=1.0)
MAX_TOOL_RESULT_TOKENS: Final = 1024
DEFAULT_TOOL_TURN_SHARE: Final = 0.5
DEFAULT_MEAN_TOOL_CALLS: Final = 2.0
"""Tool calls in a chain: 1 + a geometric count, so this is their mean."""
MAX_TOOL_CALLS: Final = 8
FRESH_HASHES_FROM: Final = 1 << 40
"""Hashes for the blocks of tool calls and results, far from any hash in the input."""


@dataclass(frozen=True)
class Options:
    tool_turn_share: float = DEFAULT_TOOL_TURN_SHARE
    mean_tool_calls: float = DEFAULT_MEAN_TOOL_CALLS
    tool_time_scale: float = 1.0
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    seed: int = 0


def tool_seconds(rng: random.Random, scale: float) -> float:
    pick = rng.random()
    for share, seconds in TOOL_KINDS:
        pick -= share
        if pick < 0:
            return scale * seconds.draw(rng)
    return scale * TOOL_KINDS[-1][1].draw(rng)


def tool_calls(rng: random.Random, mean: float) -> int:
    """1 + a geometric count with mean ``mean - 1``, at most ``MAX_TOOL_CALLS``."""
    calls = 1
    stop = 1.0 / mean
    while calls < MAX_TOOL_CALLS and rng.random() > stop:
        calls += 1
    return calls


def add_tool_calls(rows: list[dict[str, Any]], options: Options) -> list[dict[str, Any]]:
    """The rows of ``rows`` (in order), each tool-using turn followed by the calls of its chain;
    ``follows`` indexes the output list."""
    rng = random.Random(options.seed)
    fresh = iter(range(FRESH_HASHES_FROM, 1 << 62))
    out: list[dict[str, Any]] = []
    for row in rows:
        if "prefix_blocks" not in row:
            raise ValueError("every row needs prefix_blocks and block_tokens (mooncake_trace.py)")
        if rng.random() >= options.tool_turn_share:
            out.append(dict(row))
            continue
        out.extend(
            _chain(row, len(out), tool_calls(rng, options.mean_tool_calls), rng, fresh, options)
        )
    return out


def _chain(
    row: dict[str, Any],
    first_index: int,
    calls: int,
    rng: random.Random,
    fresh: Iterator[int],
    options: Options,
) -> list[dict[str, Any]]:
    block = int(row["block_tokens"])
    current = dict(row, output_tokens=max(1, round(TOOL_CALL_TOKENS.draw(rng))))
    chain = [current]
    for _ in range(calls):
        result = min(MAX_TOOL_RESULT_TOKENS, max(1, round(TOOL_RESULT_TOKENS.draw(rng))))
        prompt = current["prompt_tokens"] + current["output_tokens"] + result
        if prompt > options.max_prompt_tokens:
            break
        whole = current["prompt_tokens"] // block
        blocks = current["prefix_blocks"][:whole]
        blocks += [next(fresh) for _ in range(math.ceil(prompt / block) - whole)]
        current = {
            "prompt": "",
            "prompt_tokens": prompt,
            "output_tokens": max(1, round(TOOL_CALL_TOKENS.draw(rng))),
            "prefix_blocks": blocks,
            "block_tokens": block,
            "follows": first_index + len(chain) - 1,
            "gap_s": round(tool_seconds(rng, options.tool_time_scale), 4),
        }
        chain.append(current)
    chain[-1]["output_tokens"] = row["output_tokens"]
    return chain


def describe(rows: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = [r["gap_s"] for r in rows if "follows" in r]
    return {
        "requests": len(rows),
        "user_turns": sum("follows" not in r for r in rows),
        "tool_calls": len(gaps),
        "tool_seconds_p50": round(statistics.median(gaps), 3) if gaps else None,
        "tool_seconds_mean": round(statistics.fmean(gaps), 3) if gaps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tool-turn-share", type=float, default=DEFAULT_TOOL_TURN_SHARE)
    parser.add_argument("--mean-tool-calls", type=float, default=DEFAULT_MEAN_TOOL_CALLS)
    parser.add_argument("--tool-time-scale", type=float, default=1.0)
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", type=Path, required=True, help="trace with prefix blocks")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0 <= args.tool_turn_share <= 1 or args.mean_tool_calls < 1 or args.tool_time_scale < 0:
        parser.error("need 0 <= --tool-turn-share <= 1, --mean-tool-calls >= 1, a scale >= 0")
    rows = [json.loads(line) for line in read_lines(args.trace) if line.strip()]
    rows.sort(key=lambda r: r["arrival_s"])
    options = Options(
        args.tool_turn_share,
        args.mean_tool_calls,
        args.tool_time_scale,
        args.max_prompt_tokens,
        args.seed,
    )
    out = add_tool_calls(rows, options)
    write_rows(args.out, out)
    print(json.dumps(describe(out)), file=sys.stderr)


if __name__ == "__main__":
    main()
