"""The coordinator's own CPU a one-token request, without sockets: the control-plane benchmark's
traffic fed to a ``Coordinator`` in this process.

``benchmarks/control_plane.py`` measures the coordinator process over real sockets, where the
figure also holds ZeroMQ's I/O thread, the kernel and the cores the benchmark's own client and
agents take, and moves by 10-15% with the hour on a shared VM. This drives the same coordinator
code (admission, the cluster driver, the write-ahead outbox, replies) with pre-encoded
``Submit`` and ``RunFinished`` frames, ``concurrency`` requests in flight over two agents, and
reports the main thread's CPU a request: the Python part of that figure. Its absolute value
drifts too (about 5% over an hour on the development VM), but runs of two versions interleaved
compare to a microsecond or two, which is what judging a change to the request path needs.

    .venv/bin/python benchmarks/coordinator_inprocess.py [--requests 20000] [--concurrency 64]
        [--max-seqs 8] [--journal] [--repetitions 3] [--json OUT]

Replies go to an in-process client (as the HTTP gateway's do), so they are not encoded; agents'
frames go to a sink. The collector is tuned as ``edgeorch coordinator`` tunes it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cli import GC_YOUNG_THRESHOLD
from orchestrator.coordinator import Coordinator
from orchestrator.journal import Journal
from orchestrator.protocol import (
    AgentId,
    DeviceProfile,
    Dispatch,
    GenerationParams,
    Result,
    RunFinished,
    Submit,
    WireModel,
    encode,
)
from orchestrator.sessions import AgentSession
from orchestrator.settings import CoordinatorSettings

AGENTS = ("fast-1", "fast-2")


def agent_profile(max_seqs: int) -> DeviceProfile:
    return DeviceProfile(
        hostname="bench",
        backend="fake",
        cpu_cores=2,
        threads=1,
        memory_total_bytes=8 << 30,
        memory_available_bytes=4 << 30,
        gpu_offload_supported=False,
        n_gpu_layers=0,
        model_name="fake",
        n_ctx=4096,
        kv_budget_tokens=1 << 20,
        max_seqs=max_seqs,
    )


def request_id(i: int) -> str:
    return f"req-{i:08d}"


async def one_run(
    requests: int, concurrency: int, max_seqs: int, journal_dir: Path | None
) -> float:
    """Thread CPU seconds a request, after frames are built."""
    dispatched: list[tuple[bytes, WireModel]] = []
    journal = Journal(journal_dir / "journal.db") if journal_dir is not None else None
    coordinator = Coordinator(
        CoordinatorSettings(),
        journal=journal,
        agent_sink=lambda identity, message: dispatched.append((identity, message)),
    )
    coordinator.start()
    results = 0

    def deliver(reply: WireModel) -> None:
        nonlocal results
        results += isinstance(reply, Result)

    client = coordinator.connect_local(deliver)
    for name in AGENTS:
        now = time.monotonic()
        session = AgentSession(
            agent_id=AgentId(name),
            identity=name.encode(),
            name=name,
            profile=agent_profile(max_seqs),
            last_seen_s=now,
        )
        coordinator.add_agent(session, now)
    submits = [
        encode(
            Submit(
                request_id=request_id(i),
                prompt=f"tiny request {i}",
                params=GenerationParams(max_tokens=1),
            )
        )
        for i in range(requests)
    ]
    ends = {
        request_id(i): encode(
            RunFinished(
                request_id=request_id(i),
                attempt=1,
                prompt_tokens=5,
                completion_tokens=1,
                finish_reason="length",
                prefill_s=0.0,
                decode_s=0.0,
                text=" x",
                n_tokens=1,
            )
        )
        for i in range(requests)
    }
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    sent = done = 0
    started = time.thread_time()
    while done < requests:
        while sent < requests and sent - done < concurrency:
            coordinator.on_client_frame(client, submits[sent])
            sent += 1
        coordinator.schedule(time.monotonic())
        await asyncio.sleep(0)  # the outbox flushes: dispatches reach the sink
        batch = dispatched[:]
        dispatched.clear()
        if not any(isinstance(message, Dispatch) for _, message in batch):
            raise RuntimeError(f"the coordinator dispatched nothing with {sent - done} in flight")
        for identity, message in batch:
            if isinstance(message, Dispatch):
                coordinator.on_agent_frame(identity, ends[message.request_id], None)
                done += 1
        await asyncio.sleep(0)  # results leave
    cpu_s = time.thread_time() - started
    if results != requests:
        raise RuntimeError(f"{results} results for {requests} requests")
    gc.unfreeze()
    if journal is not None:
        journal.close()
    return cpu_s / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seqs", type=int, default=8, help="each agent's sequences")
    parser.add_argument("--journal", action="store_true", help="journal to a temporary file")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs_us = []
    for repetition in range(args.repetitions):
        with tempfile.TemporaryDirectory() as tmp:
            journal_dir = Path(tmp) if args.journal else None
            per_request_s = asyncio.run(
                one_run(args.requests, args.concurrency, args.max_seqs, journal_dir)
            )
        runs_us.append(round(per_request_s * 1e6, 1))
        print(f"run {repetition + 1}/{args.repetitions}: {runs_us[-1]} us a request", flush=True)
    report = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_seqs": args.max_seqs,
        "journal": args.journal,
        "machine": f"{platform.machine()} {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "coordinator_thread_cpu_us_per_request": runs_us,
        "median_us": statistics.median(runs_us),
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
