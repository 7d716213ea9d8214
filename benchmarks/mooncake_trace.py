"""Turn a Mooncake trace (FAST'25 release: ``timestamp`` ms, ``input_length``,
``output_length``, ``hash_ids`` of shared 512-token prefix blocks) into an edgeorch simulator
trace whose prompts are given as lengths and prefix blocks.

Mooncake's prompts (12,035 tokens on average in the conversation trace) are sized for datacenter
contexts; the edge clusters hold 4,096 tokens a sequence. Every prompt length and the block size
are multiplied by ``--scale`` (1/8 by default: 64-token blocks, a median prompt of 864 tokens,
close to the Azure conversation trace's 1,020), so the sharing structure stays exact: two
requests share their first k blocks exactly when they did. Prompts still longer than
``--max-prompt-tokens`` are cut there, with the blocks past the cut dropped (the few longest
documents lose their tails, never their shared heads). Answer lengths are kept; cap them at
replay with ``edgeorch bench --max-output-tokens``.

    .venv/bin/python benchmarks/mooncake_trace.py \\
        --mooncake ../shared/data/mooncake_fast25/conversation_trace.jsonl \\
        --out /tmp/mooncake-conversation-edge.jsonl
    .venv/bin/edgeorch bench --sim --cluster configs/cluster-edge.toml \\
        --trace /tmp/mooncake-conversation-edge.jsonl --load 0.9 --load-basis work ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.textio import read_lines

MOONCAKE_BLOCK_TOKENS: Final = 512
DEFAULT_SCALE: Final = Fraction(1, 8)
DEFAULT_MAX_PROMPT_TOKENS: Final = 3072
"""Room for 1,024 answer tokens in a 4,096-token context."""


def convert(
    rows: list[dict[str, Any]], scale: Fraction, max_prompt_tokens: int
) -> list[dict[str, Any]]:
    """The edgeorch trace rows for Mooncake ``rows`` (see the module docstring)."""
    block = MOONCAKE_BLOCK_TOKENS * scale
    if block.denominator != 1 or block < 1:
        raise ValueError(f"scale {scale} does not give whole blocks of {MOONCAKE_BLOCK_TOKENS}")
    block_tokens = int(block)
    out = []
    for row in rows:
        prompt = max(1, min(max_prompt_tokens, round(row["input_length"] * scale)))
        hashes = list(row["hash_ids"])[: math.ceil(prompt / block_tokens)]
        out.append(
            {
                "arrival_s": row["timestamp"] / 1000.0,
                "prompt": "",
                "prompt_tokens": prompt,
                "output_tokens": max(1, int(row["output_length"])),
                "prefix_blocks": hashes,
                "block_tokens": block_tokens,
            }
        )
    return out


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mooncake", type=Path, required=True, help="Mooncake trace JSONL")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", type=Fraction, default=DEFAULT_SCALE)
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    args = parser.parse_args()
    rows = [json.loads(line) for line in read_lines(args.mooncake) if line.strip()]
    converted = convert(rows, args.scale, args.max_prompt_tokens)
    write_rows(args.out, converted)
    cut = sum(round(r["input_length"] * args.scale) > args.max_prompt_tokens for r in rows)
    print(
        f"{len(converted)} requests to {args.out}: blocks of "
        f"{MOONCAKE_BLOCK_TOKENS * args.scale} tokens, {cut} prompts cut to "
        f"{args.max_prompt_tokens} tokens",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
