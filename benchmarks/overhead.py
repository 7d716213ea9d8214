"""Streaming overhead: one 256-token greedy request through client -> coordinator -> llama agent,
against llama-cpp-python called directly (high-level create_completion and a low-level batch
loop) on the same model and thread count. Runs each path one after the other, never
concurrently, for several interleaved rounds, and reports medians.

    .venv/bin/python benchmarks/overhead.py [--tokens 256] [--threads 2] [--rounds 3] [--json OUT]
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.llama.engine import llama_cpp
from agents.model import ensure_default_model
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def decode_rate(first_s: float, last_s: float, tokens: int) -> float:
    """Tokens per second from the first token to the last, as a streaming user sees it."""
    return (tokens - 1) / (last_s - first_s)


def direct_high_level(model: Path, tokens: int, threads: int) -> Callable[[], float]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    lib = llama_cpp()
    vocab = lib.llama_model_get_vocab(llm.model)
    eog = [t for t in range(llm.n_vocab()) if lib.llama_vocab_is_eog(vocab, t)]

    def run() -> float:
        stamps = []
        for _ in llm.create_completion(
            PROMPT,
            max_tokens=tokens,
            temperature=0.0,
            stream=True,
            logit_bias={t: -1e9 for t in eog},
        ):
            stamps.append(time.perf_counter())
        llm.reset()
        return decode_rate(stamps[0], stamps[-1], len(stamps))

    return run


def direct_low_level(model: Path, tokens: int, threads: int) -> Callable[[], float]:
    lib = llama_cpp()
    mparams = lib.llama_model_default_params()
    mparams.n_gpu_layers = 0
    handle = lib.llama_model_load_from_file(str(model).encode(), mparams)
    vocab = lib.llama_model_get_vocab(handle)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    eog = np.array([t for t in range(n_vocab) if lib.llama_vocab_is_eog(vocab, t)])
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch = 1024, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lib.llama_init_from_model(handle, cparams)
    memory = lib.llama_get_memory(ctx)
    data = PROMPT.encode()
    buf = (lib.llama_token * (len(data) + 2))()
    n_prompt = lib.llama_tokenize(vocab, data, len(data), buf, len(data) + 2, True, False)
    prompt = list(buf[:n_prompt])
    batch = lib.llama_batch_init(512, 0, 1)

    def put(row: int, token: int, pos: int, logits: bool) -> None:
        batch.token[row], batch.pos[row], batch.n_seq_id[row] = token, pos, 1
        batch.seq_id[row][0], batch.logits[row] = 0, logits

    def run() -> float:
        lib.llama_memory_clear(memory, True)
        for i, token in enumerate(prompt):
            put(i, token, i, i == len(prompt) - 1)
        batch.n_tokens = len(prompt)
        lib.llama_decode(ctx, batch)
        row, pos, stamps = len(prompt) - 1, len(prompt), []
        for _ in range(tokens):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
            logits[eog] = -np.inf
            token = int(logits.argmax())
            stamps.append(time.perf_counter())
            put(0, token, pos, True)
            batch.n_tokens, row, pos = 1, 0, pos + 1
            lib.llama_decode(ctx, batch)
        return decode_rate(stamps[0], stamps[-1], len(stamps))

    return run


def through_edgeorch(cluster: LocalCluster, tokens: int) -> Callable[[], float]:
    async def once() -> float:
        async with AsyncClient(cluster.clients_endpoint, timeout_s=300) as client:
            stream = await client.generate(
                PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True, stream=True
            )
            stamps = [time.perf_counter() async for _ in stream]
            assert stream.result is not None and stream.result.completion_tokens == tokens
            return decode_rate(stamps[0], stamps[-1], tokens)

    return lambda: asyncio.run(once())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = ensure_default_model(os.environ)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeorch-overhead-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(log_dir)
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
            "llama_cpp_high_level": direct_high_level(model, args.tokens, args.threads),
            "llama_cpp_low_level": direct_low_level(model, args.tokens, args.threads),
            "edgeorch": through_edgeorch(cluster, args.tokens),
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_number in range(1, args.rounds + 1):
            for name, run in paths.items():
                rates[name].append(run())
                print(
                    f"round {round_number}/{args.rounds} {name}: {rates[name][-1]:.1f} tok/s",
                    file=sys.stderr,
                )
    finally:
        cluster.stop()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    best_direct = max(medians["llama_cpp_high_level"], medians["llama_cpp_low_level"])
    report = {
        "tokens": args.tokens,
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "tokens_per_s": {name: round(value, 1) for name, value in medians.items()},
        "all_rounds": {name: [round(v, 1) for v in values] for name, values in rates.items()},
        "edgeorch_vs_best_direct": round(medians["edgeorch"] / best_direct, 3),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
