"""Step costs of the llama engine's context: how long one llama_decode takes with d decoding
sequences and a prompt chunk of p tokens, on the default model. The prompt-chunk rule in
agents/backends/llama/stepcost.py is set from these figures (docs/BENCHMARKS.md, "Prefill and decode
interleaving").

    .venv/bin/python benchmarks/step_costs.py [--threads 2] [--json OUT]

Each figure is the median of ``--repetitions`` timed steps after one warm-up step; the decoding
sequences hold ``--context`` tokens each, as mid-conversation streams do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.llama.engine import LlamaEngine
from agents.model import ensure_default_model

DECODE_ROWS = (0, 1, 4, 8)
PREFILL_TOKENS = (0, 32, 64, 128, 256, 512, 1024)
PREFILL_SEQ = 15
"""Sequence id of the prompt being prefilled (the decoding ones are 0..d-1)."""


def measure(engine: LlamaEngine, context: int, repetitions: int) -> list[dict[str, Any]]:
    """Timed raw steps on the engine's own context and batch (the engine holds no sequence)."""
    lib = engine._lib
    memory = lib.llama_get_memory(engine._ctx)
    positions = {}
    for seq in range(max(DECODE_ROWS)):
        for start in range(0, context, 512):
            size = min(512, context - start)
            for j in range(size):
                engine._put(j, 1000 + (7 * (start + j) + seq) % 5000, start + j, seq, False)
            engine._batch.n_tokens = size
            assert lib.llama_decode(engine._ctx, engine._batch) == 0
        positions[seq] = context

    def step(rows: int, tokens: int) -> float:
        n = 0
        for seq in range(rows):
            engine._put(n, 2000 + seq, positions[seq], seq, True)
            positions[seq] += 1
            n += 1
        for j in range(tokens):
            engine._put(n, 3000 + j % 3000, j, PREFILL_SEQ, j == tokens - 1)
            n += 1
        engine._batch.n_tokens = n
        started = time.perf_counter()
        assert lib.llama_decode(engine._ctx, engine._batch) == 0
        return time.perf_counter() - started

    rows_out = []
    for rows in DECODE_ROWS:
        for tokens in PREFILL_TOKENS:
            if rows == tokens == 0:
                continue
            times = []
            for _ in range(repetitions + 1):
                lib.llama_memory_seq_rm(memory, PREFILL_SEQ, -1, -1)
                times.append(step(rows, tokens))
            seconds = statistics.median(times[1:])
            row = {
                "decode_rows": rows,
                "prefill_tokens": tokens,
                "step_ms": round(seconds * 1e3, 1),
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows_out.append(row)
    for seq in range(max(DECODE_ROWS)):
        lib.llama_memory_seq_rm(memory, seq, -1, -1)
    return rows_out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per prompt token: the step's time less a decode-only step's with the same rows."""
    decode = {r["decode_rows"]: r["step_ms"] for r in rows if r["prefill_tokens"] == 0}
    decode[0] = 0.0
    return {
        f"d{r['decode_rows']}_p{r['prefill_tokens']}": round(
            (r["step_ms"] - decode[r["decode_rows"]]) / r["prefill_tokens"], 3
        )
        for r in rows
        if r["prefill_tokens"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine = LlamaEngine(
        ensure_default_model(os.environ),
        n_ctx=4096,
        max_seqs=16,
        kv_budget_tokens=16384,
        n_gpu_layers=0,
        threads=args.threads,
    )
    try:
        rows = measure(engine, args.context, args.repetitions)
    finally:
        engine.close()
    report = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "threads": args.threads,
        "context_tokens": args.context,
        "steps": rows,
        "ms_per_prompt_token": summarise(rows),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
