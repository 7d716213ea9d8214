"""Offline replay of the prompt-heavy trace through the llama engine alone: how the prompt-chunk
rule (agents/backends/llama/stepcost.py) splits the engine's time between prefill-only, mixed
and decode-only steps, and what that does to time to first token. No coordinator, no sockets:
requests are admitted first come first served, ``--max-seqs`` at a time, at their arrival
times, and every ``llama_decode`` is timed.

    .venv/bin/python benchmarks/prefill_replay.py --requests 40 --rate 1.0 \\
        --variant 1.0:256:pool --variant 1.0:256:streams --json out/prefill-replay.json

Each ``--variant BOUND_S:MIN_CHUNK[:LAYOUT]`` is one replay with that decode-stall bound and
smallest mixed chunk, and the KV layout: ``streams`` (one per sequence, the default) or ``pool``
(one pool all sequences share); variants run back to back on the same requests (the machine
drifts, so compare within one run). The requests are the multi-turn benchmark's prompt-heavy
ones (Azure 2023 conversation arrivals and lengths, prompts cut from real text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.llama.engine import LlamaEngine
from agents.backends.llama.stepcost import StepCosts
from agents.base import Completed, Emitted, SequenceSpec
from agents.model import ensure_default_model
from benchmarks.multiturn import LockedCounter, SingleRequest, single_requests
from benchmarks.multiturn import parse_args as multiturn_args
from orchestrator.protocol import GenerationParams

IDLE_POLL_S: Final = 0.005
KV_BUDGET_TOKENS: Final = 16384
AVAILABLE_MEMORY_BYTES: Final = 8 << 30


def replay(engine: LlamaEngine, requests: list[SingleRequest], max_seqs: int) -> dict[str, Any]:
    """Run every request to its length (greedy, EOS ignored); step times by kind, and TTFT."""
    origin = time.perf_counter()
    waiting: deque[int] = deque()
    arrived = active = done = 0
    first: dict[str, float] = {}
    kinds = {kind: [0, 0, 0.0] for kind in ("prefill", "mixed", "decode")}
    while done < len(requests):
        now = time.perf_counter() - origin
        while arrived < len(requests) and requests[arrived].arrival_s <= now:
            waiting.append(arrived)
            arrived += 1
        while waiting and active < max_seqs:
            index = waiting.popleft()
            request = requests[index]
            params = GenerationParams(
                max_tokens=request.output_tokens, temperature=0.0, ignore_eos=True
            )
            rejected = engine.add(SequenceSpec(str(index), 1, request.prompt, params))
            if rejected:
                raise RuntimeError(f"request {index} refused: {rejected}")
            active += 1
        if not engine.has_work():
            time.sleep(IDLE_POLL_S)
            continue
        computed = engine.cache_stats().computed_tokens
        decoding = sum(1 for s in engine._active.values() if s.next_token is not None)
        started = time.perf_counter()
        events = engine.step()
        seconds = time.perf_counter() - started
        prompt = engine.cache_stats().computed_tokens - computed
        kind = "decode" if prompt == 0 else "prefill" if decoding == 0 else "mixed"
        tally = kinds[kind]
        tally[0] += 1
        tally[1] += prompt
        tally[2] += seconds
        for event in events:
            if isinstance(event, Completed):
                active -= 1
                done += 1
            elif isinstance(event, Emitted) and event.key[0] not in first:
                first[event.key[0]] = time.perf_counter() - origin
    ttft = [first[str(i)] - r.arrival_s for i, r in enumerate(requests)]
    return {
        "wall_s": round(time.perf_counter() - origin, 2),
        "step_s": round(sum(t[2] for t in kinds.values()), 2),
        "mean_ttft_s": round(sum(ttft) / len(ttft), 3),
        "steps": {
            kind: {
                "steps": count,
                "prompt_tokens": tokens,
                "seconds": round(seconds, 2),
                "ms_per_prompt_token": round(seconds / tokens * 1e3, 2) if tokens else None,
            }
            for kind, (count, tokens, seconds) in kinds.items()
        },
    }


LAYOUTS: Final = ("streams", "pool")


def parse_variant(text: str) -> tuple[float, int, str]:
    bound, _, rest = text.partition(":")
    chunk, _, layout = rest.partition(":")
    layout = layout or LAYOUTS[0]
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"layout {layout!r}: choose {' or '.join(LAYOUTS)}")
    return float(bound), int(chunk), layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (1.0 keeps it busy)")
    parser.add_argument("--variant", action="append", type=parse_variant, default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seqs", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    variants = args.variant or [parse_variant("1.0:256")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    model = ensure_default_model(os.environ)
    heavy = multiturn_args(
        [
            "--workload",
            "prompt-heavy",
            "--max-requests",
            str(args.requests),
            "--configs",
            "edgeorch-cache",
            "--rate",
            str(args.rate),
        ]
    )
    requests = single_requests(heavy, LockedCounter(model))
    results = []
    for bound_s, min_chunk, layout in variants:
        engine = LlamaEngine(
            model,
            n_ctx=4096,
            max_seqs=args.max_seqs,
            kv_budget_tokens=KV_BUDGET_TOKENS,
            n_gpu_layers=0,
            threads=args.threads,
            model_name=None,
            available_memory_bytes=AVAILABLE_MEMORY_BYTES,
            kv_streams=layout == "streams",
        )
        engine.step_costs = StepCosts(stall_bound_s=bound_s, min_chunk_tokens=min_chunk)
        try:
            result: dict[str, Any] = {
                "stall_bound_s": bound_s,
                "min_chunk_tokens": min_chunk,
                "layout": layout,
            }
            result.update(replay(engine, requests, args.max_seqs))
        finally:
            engine.close()
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    report = {
        "requests": len(requests),
        "mean_prompt_tokens": round(sum(r.prompt_tokens for r in requests) / len(requests), 1),
        "rate": args.rate,
        "threads": args.threads,
        "max_seqs": args.max_seqs,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "variants": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
