"""Control-plane capacity: requests/s the coordinator sustains for tiny generations.

Two fake agents with effectively free compute (so the coordinator, the sockets and the SDK are
all that is measured) serve N one-token requests from C concurrent in-flight requests, with
and without the length predictor (every request is predicted), and with and without the request
journal (``--journal off``: no fsync per accept batch, no write-ahead of replies).

    .venv/bin/python benchmarks/control_plane.py [--requests 3000] [--concurrency 64]
        [--predictors shipped,none] [--journal on|off|both] [--finish length|stop]
        [--prompts FILE.jsonl | --chats CONVERSATIONS.jsonl] [--harness-nice N] [--json OUT]

``--finish stop`` ends each request after its first token, at a stop string, instead of by
``max_tokens``: a natural end, which the coordinator records in the predictor's completion
history (a capped answer teaches nothing and is not recorded), as real traffic mostly ends.
``--prompts`` takes the prompts from a JSONL file's ``prompt`` fields (cycled; each request's
number appended, so no two are equal) instead of ``tiny request N``, and the fake agents then
advertise the embedded default model's name and its 32k context, so that the coordinator
tokenizes each prompt exactly and hashes its prefix blocks, as for llama agents serving it.
``--chats`` does the same with every user turn of a conversations file (its whole history,
rendered as the gateway renders chats for the default model, sent as a chat), so that each
turn re-sends the one before it as chats do.

The SDK client runs in a child process. ``--harness-nice N`` runs it and the fake agents at
niceness N: on a machine of two cores the benchmark's own client and agents otherwise take
their turns on the cores the coordinator and its predictor need, which clients and agents on
other machines would not.

``coordinator_cpu_us_per_request`` (user + system CPU of the coordinator process over the
measured requests) is steadier than requests/s on a machine shared with other work; the
predictor's worker process (and multiprocessing's resource tracker) are counted apart, in
``predictor_process_cpu_us_per_request``, and the SDK client's in
``client_cpu_us_per_request``, and the two agents' together in ``agents_cpu_us_per_request``.

A run's key is ``predictor_<name>`` with the journal on (the default configuration) and
``predictor_<name>_no_journal`` with it off. With the shipped predictor, a run also gives the
predictor's own batched throughput on the same prompts (one onnxruntime thread, batches of
the coordinator's size, in this process just before and just after the run, while no cluster
runs: the machine's speed drifts) and the run's admission rate as a fraction of their mean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.fake.engine import fake_token_text
from orchestrator.client import AsyncClient
from orchestrator.local import LocalCluster
from orchestrator.openai_requests import render_chat
from orchestrator.protocol import ConversationHint
from orchestrator.textio import read_lines

PROMPT = "tiny request {i}"
WARM_UP_REQUESTS = 200
LONG_PROMPT_CONTEXT = 32_768
"""The fake agents' context with ``--prompts``: every real chat prompt fits (the model's own)."""
AGENTS = ("fast-1", "fast-2")

FREE_COMPUTE = (
    "--backend",
    "fake",
    "--fake-decode-tps",
    "1000000",
    "--fake-prefill-tps",
    "1000000000",
)


Request = tuple[str, ConversationHint | None]
"""A prompt, and the conversation it renders when it is a chat's turn."""


async def hammer(
    endpoint: str, requests: list[Request], concurrency: int, finish: str = "length"
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    async with AsyncClient(endpoint, timeout_s=120) as client:
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            prompt, chat = requests[i]
            stop = (fake_token_text(prompt, 1),) if finish == "stop" else ()
            async with semaphore:
                started = time.perf_counter()
                result = await client.generate(
                    prompt, max_tokens=3 if stop else 1, stop=stop, conversation=chat
                )
                assert (result.completion_tokens, result.finish_reason) == (1, finish)
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(requests))))
        return time.perf_counter() - started, latencies


def client_run(
    endpoint: str, requests: list[Request], concurrency: int, finish: str, nice: int
) -> tuple[float, list[float], float]:
    """``hammer`` in this (child) process at ``nice``: (seconds, latencies, client CPU s)."""
    if nice:
        os.nice(nice)
    started = time.process_time()
    elapsed, latencies = asyncio.run(hammer(endpoint, requests, concurrency, finish))
    return elapsed, latencies, time.process_time() - started


def benchmark_prompts(requests: int, path: Path | None, offset: int = 0) -> list[Request]:
    """``requests`` distinct prompts: tiny ones, or a file's cycled with a number appended."""
    if path is None:
        return [(PROMPT.format(i=offset + i), None) for i in range(requests)]
    texts = [json.loads(line)["prompt"] for line in read_lines(path) if line.strip()]
    return [(f"{texts[i % len(texts)]} ({offset + i})", None) for i in range(requests)]


def chat_requests(requests: int, path: Path, offset: int = 0) -> list[Request]:
    """``requests`` chat turns from the ``offset``-th on: every user turn of a conversations
    file's chats in order, its whole history rendered as the gateway renders it for the
    default model; the chats cycled, each copy marked apart so that no two prompts are equal."""
    chats = [json.loads(line)["turns"] for line in read_lines(path) if line.strip()]
    turns: list[Request] = []
    copy = 0
    while len(turns) < offset + requests:
        messages: list[tuple[str, str]] = []
        for turn in chats[copy % len(chats)]:
            role = "user" if turn["role"] == "user" else "assistant"
            text = turn["content"] if messages else f"[chat {copy}] {turn['content']}"
            messages.append((role, text))
            if role == "user":
                hint = ConversationHint(last_user=text, earlier_answer_tokens=())
                turns.append((render_chat(messages, None)[0], hint))
        copy += 1
    return turns[offset : offset + requests]


def default_model_name() -> str:
    """The name the coordinator's tokenizer (the embedded default model's) answers to."""
    from agents.model import default_model_path
    from orchestrator.tokens import GgufTokenCounter

    return GgufTokenCounter(default_model_path(os.environ)).model_name


def predictor_batched_per_s(requests: list[Request]) -> float:
    """Prompts/s the shipped predictor alone predicts on the benchmark's prompts, batched as the
    coordinator batches them, on one thread as the coordinator runs it."""
    from orchestrator.prediction import MAX_BATCH
    from orchestrator.predictor.model import LengthPredictor

    prompts = [chat.last_user if chat else prompt for prompt, chat in requests]  # what it reads
    predictor = LengthPredictor.load(threads=1)
    predictor.predict_batch(prompts[:MAX_BATCH])
    started = time.perf_counter()
    for start in range(0, len(prompts), MAX_BATCH):
        predictor.predict_batch(prompts[start : start + MAX_BATCH])
    return len(prompts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--predictors", default="shipped,none")
    parser.add_argument("--journal", choices=("on", "off", "both"), default="on")
    parser.add_argument("--finish", choices=("length", "stop"), default="length")
    sources = parser.add_mutually_exclusive_group()
    sources.add_argument("--prompts", type=Path, default=None)
    sources.add_argument("--chats", type=Path, default=None)
    parser.add_argument(
        "--harness-nice",
        type=int,
        default=0,
        help="run the SDK client and the fake agents at this niceness, so that the cores go "
        "first to the coordinator and its predictor, as with clients and agents on other "
        "machines (default 0: all equal)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    journal_modes = {"on": ("on",), "off": ("off",), "both": ("on", "off")}[args.journal]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeorch-control-{os.getpid()}"
    report: dict[str, object] = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "finish": args.finish,
        "prompts": str(args.prompts or args.chats or "tiny"),
        "chats": args.chats is not None,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "harness_nice": args.harness_nice,
    }
    runs = [(p, j) for p in args.predictors.split(",") for j in journal_modes]
    model_args = (
        ("--model-name", default_model_name(), "--n-ctx", str(LONG_PROMPT_CONTEXT))
        if args.prompts or args.chats
        else ()
    )

    def requests(count: int, offset: int = 0) -> list[Request]:
        if args.chats:
            return chat_requests(count, args.chats, offset)
        return benchmark_prompts(count, args.prompts, offset)

    for predictor, journal in runs:
        key = f"predictor_{predictor}" + ("_no_journal" if journal == "off" else "")
        run_dir = log_dir / key
        run_dir.mkdir(parents=True, exist_ok=True)
        journal_args = ("--journal", "off") if journal == "off" else ()
        prompts = requests(args.requests, offset=WARM_UP_REQUESTS)
        alone = [predictor_batched_per_s(prompts)] if predictor == "shipped" else []
        cluster = LocalCluster(run_dir, "--predictor", predictor, *journal_args)
        try:
            for name in AGENTS:
                cluster.start_agent(name, *FREE_COMPUTE, "--max-seqs", "64", *model_args)
            cluster.wait_for_agents(2)
            warm_up = requests(WARM_UP_REQUESTS)
            asyncio.run(hammer(cluster.clients_endpoint, warm_up, args.concurrency, args.finish))
            coordinator = psutil.Process(cluster.processes["coordinator"].pid)
            workers = coordinator.children(recursive=True)
            agents = [psutil.Process(cluster.processes[name].pid) for name in AGENTS]
            for agent in agents:
                agent.nice(args.harness_nice)
            agents_before = sum(sum(a.cpu_times()[:2]) for a in agents)
            cpu_before = sum(coordinator.cpu_times()[:2])
            workers_before = sum(sum(w.cpu_times()[:2]) for w in workers)
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                elapsed, latencies, client_s = pool.submit(
                    client_run,
                    cluster.clients_endpoint,
                    prompts,
                    args.concurrency,
                    args.finish,
                    args.harness_nice,
                ).result()
            cpu_s = sum(coordinator.cpu_times()[:2]) - cpu_before
            workers_s = sum(sum(w.cpu_times()[:2]) for w in workers) - workers_before
            agents_s = sum(sum(a.cpu_times()[:2]) for a in agents) - agents_before
        finally:
            cluster.stop()
        latencies.sort()
        run: dict[str, object] = {
            "requests_per_s": round(args.requests / elapsed, 1),
            "p50_latency_ms": round(1000 * statistics.median(latencies), 2),
            "p99_latency_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
            "coordinator_cpu_us_per_request": round(1e6 * cpu_s / args.requests, 1),
            "predictor_process_cpu_us_per_request": round(1e6 * workers_s / args.requests, 1),
            "client_cpu_us_per_request": round(1e6 * client_s / args.requests, 1),
            "agents_cpu_us_per_request": round(1e6 * agents_s / args.requests, 1),
        }
        if alone:
            alone.append(predictor_batched_per_s(prompts))
            run["predictor_alone_prompts_per_s"] = [round(rate, 1) for rate in alone]
            run["admission_vs_predictor_batched"] = round(
                args.requests / elapsed / statistics.mean(alone), 3
            )
        report[key] = run
        print(f"{key}: {run}", file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
