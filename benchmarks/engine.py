"""Engine benchmark: continuous batching on the default model, against llama.cpp's own server.

Part 1 (in-process engine): decode tokens/s for 1 and 16 streams; time to first token of a short
request on an idle engine, while 15 streams decode, and while a long prompt is also being
prefilled; the 16-stream decode step time.
Part 2 (served, one after the other): 1 stream and 16 concurrent streams of 128 tokens (EOS
ignored, greedy) through edgeorch (SDK -> coordinator -> agent) and through `llama-server -np 16`,
same model and threads. Aggregate tokens/s = all generated tokens / wall time of the batch.

    .venv/bin/python benchmarks/engine.py [--threads 2] [--llama-server PATH] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.llama.engine import LlamaEngine
from agents.base import Emitted, SequenceSpec
from agents.model import ensure_default_model
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster, free_port
from orchestrator.protocol import GenerationParams

TOKENS = 128
STREAMS = 16
TOPICS = [
    "the ocean",
    "volcanoes",
    "the moon",
    "bread",
    "trains",
    "rivers",
    "bees",
    "glass",
    "chess",
    "rain",
    "mountains",
    "paper",
    "bridges",
    "owls",
    "salt",
    "clocks",
]
PROMPTS = [f"Write a short essay about {topic}." for topic in TOPICS]
LONG_PROMPT_WORDS = 1500


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def run_until_first_token(engine: LlamaEngine, key: tuple[str, int]) -> float:
    started = time.perf_counter()
    while True:
        for event in engine.step():
            if isinstance(event, Emitted) and event.key == key:
                return time.perf_counter() - started


def drain(engine: LlamaEngine) -> None:
    for key in engine.active_keys():
        engine.cancel(key)


def engine_part(model: Path, threads: int) -> dict[str, float]:
    engine = LlamaEngine(
        model,
        n_ctx=2048,
        max_seqs=STREAMS + 1,
        kv_budget_tokens=16384,
        n_gpu_layers=0,
        threads=threads,
    )
    figures: dict[str, float] = {}
    try:
        for streams in (1, STREAMS):
            for i in range(streams):
                engine.add(SequenceSpec(f"d{i}", streams, PROMPTS[i], greedy(TOKENS)))
            engine.step()  # prefill
            started, tokens = time.perf_counter(), 0
            while engine.has_work():
                tokens += sum(e.n_tokens for e in engine.step() if isinstance(e, Emitted))
            figures[f"decode_tps_{streams}"] = tokens / (time.perf_counter() - started)
            progress(f"engine: {streams} stream(s) {figures[f'decode_tps_{streams}']:.1f} tok/s")
        short = SequenceSpec("short", 1, "Hi there, how are you?", greedy(4))
        idle = []
        for attempt in range(3):
            engine.add(SequenceSpec("short", attempt + 1, short.prompt, short.params))
            idle.append(run_until_first_token(engine, ("short", attempt + 1)))
            drain(engine)
        figures["ttft_idle_s"] = statistics.median(idle)
        for i in range(STREAMS - 1):
            engine.add(SequenceSpec(f"bg{i}", 1, PROMPTS[i], greedy(2000)))
        for _ in range(3):
            engine.step()
        step_times = []
        for _ in range(10):
            started = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - started)
        figures["step_s_15_streams"] = statistics.median(step_times)
        engine.add(SequenceSpec("short", 10, short.prompt, short.params))
        figures["ttft_under_15_streams_s"] = run_until_first_token(engine, ("short", 10))
        engine.cancel(("short", 10))
        long_prompt = " ".join(["history"] * LONG_PROMPT_WORDS)
        engine.add(SequenceSpec("long", 1, long_prompt, greedy(4)))
        engine.add(SequenceSpec("short", 11, short.prompt, short.params))
        figures["ttft_under_15_streams_and_long_prompt_s"] = run_until_first_token(
            engine, ("short", 11)
        )
        drain(engine)
        figures["ttft_bound_s"] = figures["ttft_idle_s"] + 2 * figures["step_s_15_streams"]
        progress(
            f"engine: TTFT idle {figures['ttft_idle_s']:.3f} s, under load "
            f"{figures['ttft_under_15_streams_s']:.3f} s, with a long prompt "
            f"{figures['ttft_under_15_streams_and_long_prompt_s']:.3f} s "
            f"(bound {figures['ttft_bound_s']:.3f} s)"
        )
    finally:
        engine.close()
    return figures


async def edgeorch_batch(endpoint: str, streams: int) -> float:
    async with AsyncClient(endpoint, timeout_s=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(
                client.generate(PROMPTS[i], max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
                for i in range(streams)
            )
        )
        elapsed = time.perf_counter() - started
    return sum(r.completion_tokens for r in results) / elapsed


def llama_server_batch(port: int, streams: int) -> float:
    def one(prompt: str) -> int:
        body = json.dumps(
            {
                "prompt": prompt,
                "n_predict": TOKENS,
                "ignore_eos": True,
                "temperature": 0.0,
                "cache_prompt": False,
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            return int(json.load(response)["tokens_predicted"])

    with ThreadPoolExecutor(streams) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(one, PROMPTS[:streams]))
        return tokens / (time.perf_counter() - started)


def start_llama_server(
    binary: Path, model: Path, threads: int, log_dir: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = (log_dir / "llama-server.log").open("wb")
    process = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(model),
            "-np",
            str(STREAMS),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(STREAMS * 512),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("llama-server did not become healthy in 120 s")


def served_part(
    model: Path, threads: int, server: Path | None, rounds: int, log_dir: Path
) -> dict[str, Any]:
    cluster = LocalCluster(log_dir)
    figures: dict[str, list[float]] = {}
    llama_server = None
    try:
        cluster.start_agent(
            "bench",
            "--backend",
            "llama",
            "--threads",
            str(threads),
            "--max-seqs",
            str(STREAMS),
            "--n-ctx",
            "512",
        )
        cluster.wait_for_agents(1, timeout_s=300)
        if server is not None:
            llama_server = start_llama_server(server, model, threads, log_dir)
        for round_number in range(1, rounds + 1):
            for streams in (1, STREAMS):
                runs: dict[str, Callable[[int], float]] = {
                    "edgeorch": lambda n: asyncio.run(edgeorch_batch(cluster.clients_endpoint, n))
                }
                if llama_server is not None:
                    port = llama_server[1]
                    runs["llama_server"] = functools.partial(llama_server_batch, port)
                for name, run in runs.items():
                    rate = run(streams)
                    figures.setdefault(f"{name}_{streams}", []).append(rate)
                    progress(f"round {round_number}: {name} {streams} streams {rate:.1f} tok/s")
    finally:
        cluster.stop()
        if llama_server is not None:
            llama_server[0].terminate()
            llama_server[0].wait()
    medians = {name: round(statistics.median(values), 1) for name, values in figures.items()}
    report: dict[str, Any] = {"tokens_per_s": medians, "all_rounds": figures}
    if server is not None:
        report["ratios"] = {
            "edgeorch_16_vs_llama_server_16": round(
                medians["edgeorch_16"] / medians["llama_server_16"], 3
            ),
            "edgeorch_1_vs_llama_server_1": round(
                medians["edgeorch_1"] / medians["llama_server_1"], 3
            ),
            "edgeorch_16_vs_edgeorch_1": round(medians["edgeorch_16"] / medians["edgeorch_1"], 3),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--llama-server", type=Path, default=None, help="llama-server binary to compare"
    )
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = ensure_default_model(os.environ)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeorch-engine-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "threads": args.threads,
        "tokens_per_request": TOKENS,
        "streams": STREAMS,
    }
    if not args.skip_engine:
        report["engine"] = {k: round(v, 4) for k, v in engine_part(model, args.threads).items()}
    report["served"] = served_part(model, args.threads, args.llama_server, args.rounds, log_dir)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
