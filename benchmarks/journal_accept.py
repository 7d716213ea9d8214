"""Cost of the request journal: microseconds per accepted request with fsync on.

Writes through ``orchestrator.journal.Journal`` exactly as the coordinator does: an accept
commits with ``synchronous=FULL`` (WAL fsynced before the ``Accepted`` reply may leave), a
progress op (a streamed chunk) with ``synchronous=NORMAL`` (no fsync). ``single`` is one
request per commit (an idle coordinator); ``batched`` is ``--batch`` accepts per commit (a
burst, which the coordinator groups into one commit per event-loop pass).

    .venv/bin/python benchmarks/journal_accept.py [--requests 2000] [--batch 64] [--dir D]

The folder must be on the disk the coordinator's state lives on (tmpfs makes fsync free).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.journal import AcceptOp, ChunkOp, Journal
from orchestrator.protocol import GenerationParams, RequestId
from tests.factories import record

PROMPT = "Explain, in a short paragraph, why the sky is blue on a clear afternoon."


def micros(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": round(1e6 * statistics.median(ordered), 1),
        "p99_us": round(1e6 * ordered[int(0.99 * (len(ordered) - 1))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        journal = Journal(Path(folder) / "journal.sqlite3")
        params = GenerationParams(max_tokens=256)

        def op(name: str) -> AcceptOp:
            return AcceptOp(record(name, prompt=PROMPT, params=params), time.time())

        single: list[float] = []
        for i in range(args.requests):
            started = time.perf_counter()
            journal.write([op(f"single-{i}")])
            single.append(time.perf_counter() - started)
        chunks: list[float] = []
        for i in range(args.requests):
            chunk = ChunkOp(RequestId(f"single-{i}"), " token", 1, (1234,), "gemma")
            started = time.perf_counter()
            journal.write([chunk])
            chunks.append(time.perf_counter() - started)
        batched: list[float] = []
        for b in range(max(1, args.requests // args.batch)):
            ops = [op(f"batch-{b}-{i}") for i in range(args.batch)]
            started = time.perf_counter()
            journal.write(ops)
            batched.append((time.perf_counter() - started) / args.batch)
        journal.close()
    report = {
        "requests": args.requests,
        "batch": args.batch,
        "filesystem_dir": str(args.dir or tempfile.gettempdir()),
        "machine": f"{os.uname().machine} {os.cpu_count()} cpus",
        "accept_fsync_single": micros(single),
        "accept_fsync_batched_per_request": micros(batched),
        "chunk_no_fsync_single": micros(chunks),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
