"""HTTP gateway overhead: one streaming 256-token greedy request (EOS ignored) over the
OpenAI-compatible HTTP API against the same request through the ZeroMQ SDK, on the same cluster
(a coordinator with ``--http`` and one llama agent on the default model) in the same run. The
two paths alternate, never overlap, and swap order every round; each reports decode tokens/s as a
streaming user sees it (first text to last text) and the time to the first text. Prints medians
and their ratio (the target: HTTP >= 0.95 of the SDK).

    .venv/bin/python benchmarks/gateway_overhead.py [--tokens 256] [--threads 2] [--rounds 5]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.model import ensure_default_model
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster, free_port

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
Run = Callable[[], Awaitable[tuple[float, float]]]


def decode_rate(first_s: float, last_s: float, tokens: int) -> float:
    """Tokens per second from the first text to the last, as a streaming user sees it."""
    return (tokens - 1) / (last_s - first_s)


def over_http(url: str, tokens: int) -> Run:
    body = {
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def once() -> tuple[float, float]:
        stamps: list[float] = []
        completion_tokens = 0
        async with httpx.AsyncClient(timeout=300) as http:
            started = time.perf_counter()
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        stamps.append(time.perf_counter())
                    if chunk.get("usage"):
                        completion_tokens = chunk["usage"]["completion_tokens"]
        assert completion_tokens == tokens, completion_tokens
        return decode_rate(stamps[0], stamps[-1], tokens), stamps[0] - started

    return once


def over_sdk(endpoint: str, tokens: int) -> Run:
    async def once() -> tuple[float, float]:
        async with AsyncClient(endpoint, timeout_s=300) as client:
            started = time.perf_counter()
            stream = await client.generate(
                PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True, stream=True
            )
            stamps = [time.perf_counter() async for text in stream if text]
        assert stream.result is not None and stream.result.completion_tokens == tokens
        return decode_rate(stamps[0], stamps[-1], tokens), stamps[0] - started

    return once


async def measure(paths: dict[str, Run], rounds: int) -> dict[str, list[tuple[float, float]]]:
    for run in paths.values():
        await run()  # warm-up, not counted
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for round_number in range(1, rounds + 1):
        order = list(paths) if round_number % 2 else list(reversed(paths))
        for name in order:
            samples[name].append(await paths[name]())
            rate, ttft = samples[name][-1]
            print(
                f"round {round_number}/{rounds} {name}: {rate:.1f} tok/s, "
                f"first text {ttft * 1000:.0f} ms",
                file=sys.stderr,
            )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_default_model(os.environ)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeorch-gateway-overhead-{os.getpid()}"
    port = free_port()
    cluster = LocalCluster(log_dir, "--http", f"127.0.0.1:{port}")
    try:
        cluster.start_agent(
            "bench",
            "--backend",
            "llama",
            "--threads",
            str(args.threads),
            "--max-seqs",
            "4",
            "--n-ctx",
            "1024",
        )
        cluster.wait_for_agents(1, timeout_s=180)
        paths = {
            "http": over_http(f"http://127.0.0.1:{port}", args.tokens),
            "sdk": over_sdk(cluster.clients_endpoint, args.tokens),
        }
        samples = asyncio.run(measure(paths, args.rounds))
    finally:
        cluster.stop()
    rates = {name: [rate for rate, _ in values] for name, values in samples.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    report = {
        "tokens": args.tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "tokens_per_s": {name: round(value, 1) for name, value in medians.items()},
        "first_text_ms": {
            name: round(1000 * statistics.median(t for _, t in values), 1)
            for name, values in samples.items()
        },
        "all_rounds": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "http_vs_sdk": round(medians["http"] / medians["sdk"], 3),
        # Each round's two runs are adjacent: their ratio cancels slow drifts in machine load.
        "median_round_ratio": round(
            statistics.median(h / s for h, s in zip(rates["http"], rates["sdk"], strict=True)), 3
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
