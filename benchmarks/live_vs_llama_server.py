"""Live trace replay: edgeorch (fcfs and the default policy) against llama.cpp's own
`llama-server -np 16 -t 2`, serving the same requests at the same arrival times on this machine,
one after the other, for several interleaved repetitions; reports medians.

    .venv/bin/python benchmarks/live_vs_llama_server.py --llama-server PATH \
        --trace ../shared/data/traces/azure_conv_x_mixed.jsonl [--repetitions 3] [--json OUT]

Defaults follow issue 5: the first 120 requests, lengths x 0.25 capped at 256, 4.0 requests/s,
one agent with 2 threads and 16 sequences (the same slots and threads as llama-server).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.model import ensure_default_model
from orchestrator.live_bench import LiveCluster, LiveOutcome, live_stats, run_live
from orchestrator.local import free_port
from orchestrator.traces import arrival_scale, load_trace, output_lengths

SLOTS = 16


def start_llama_server(
    binary: Path, model: Path, threads: int, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(binary),
            "-m",
            str(model),
            "-np",
            str(SLOTS),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(SLOTS * 1024),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"llama-server did not start; see {log}")


def replay_llama_server(
    port: int, prompts: list[str], arrivals: list[float], lengths: list[int]
) -> list[LiveOutcome]:
    outcomes: list[LiveOutcome | None] = [None] * len(prompts)
    origin = time.perf_counter()

    def one(index: int) -> None:
        time.sleep(max(0.0, arrivals[index] - (time.perf_counter() - origin)))
        sent = time.perf_counter() - origin
        body = json.dumps(
            {
                "prompt": prompts[index],
                "n_predict": lengths[index],
                "ignore_eos": True,
                "temperature": 0.0,
                "stream": True,
                "cache_prompt": False,
            }
        )
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=900)
        connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        first = None
        produced = 0
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content") and first is None:
                first = time.perf_counter() - origin
            if event.get("stop"):
                produced = int(event.get("tokens_predicted", lengths[index]))
                break
        outcomes[index] = LiveOutcome(sent, first, time.perf_counter() - origin, produced, 1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None]


def report_run(repetition: int, name: str, stats: dict[str, Any]) -> None:
    print(
        f"rep {repetition} {name}: mean JCT {stats['mean_jct_s']:.2f} s, "
        f"p99 {stats['p99_jct_s']:.2f} s",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-server", type=Path, required=True)
    parser.add_argument(
        "--trace", type=Path, default=Path("../shared/data/traces/azure_conv_x_mixed.jsonl")
    )
    parser.add_argument("--policies", default="fcfs,srtf")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--max-requests", type=int, default=120)
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = ensure_default_model(os.environ)
    rows = load_trace(args.trace, args.max_requests)
    lengths = output_lengths(rows, args.length_scale, args.max_output_tokens)
    factor = arrival_scale(rows, lengths, 1.0, None, args.rate)
    arrivals = [(row.arrival_s - rows[0].arrival_s) * factor for row in rows]
    prompts = [row.prompt for row in rows]
    policies = tuple(p for p in args.policies.split(",") if p)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgeorch-vs-server-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    for repetition in range(1, args.repetitions + 1):
        live = run_live(
            trace=args.trace,
            rows=rows,
            lengths=lengths,
            policies=policies,
            placement="predicted",
            load=None,
            rate=args.rate,
            cluster=LiveCluster(
                1, "llama", ("--threads", str(args.threads), "--max-seqs", str(SLOTS))
            ),
            log_dir=log_dir / f"edgeorch-{repetition}",
            max_tokens=args.max_output_tokens,
        )
        for name, stats in live["policies"].items():
            stats.pop("_jct_samples", None)
            runs.setdefault(name, []).append(stats)
            report_run(repetition, name, stats)
        server, port = start_llama_server(
            args.llama_server, model, args.threads, log_dir / f"server-{repetition}.log"
        )
        try:
            stats = live_stats(replay_llama_server(port, prompts, arrivals, lengths))
        finally:
            server.terminate()
            server.wait()
        stats.pop("_jct_samples", None)
        runs.setdefault("llama-server", []).append(stats)
        report_run(repetition, "llama-server", stats)
    medians = {
        name: {
            key: statistics.median(r[key] for r in reps)
            for key in (
                "mean_jct_s",
                "p99_jct_s",
                "mean_ttft_s",
                "p99_ttft_s",
                "throughput_tokens_s",
            )
        }
        for name, reps in runs.items()
    }
    best = policies[-1]
    report = {
        "trace": str(args.trace),
        "requests": len(rows),
        "rate": args.rate,
        "mean_output_tokens": round(statistics.mean(lengths), 1),
        "repetitions": args.repetitions,
        "medians": medians,
        "runs": runs,
        "ratios": {
            f"{best}_vs_fcfs_mean_jct": round(
                medians[best]["mean_jct_s"] / medians["fcfs"]["mean_jct_s"], 3
            ),
            f"{best}_vs_llama_server_mean_jct": round(
                medians[best]["mean_jct_s"] / medians["llama-server"]["mean_jct_s"], 3
            ),
            f"{best}_vs_llama_server_p99_jct": round(
                medians[best]["p99_jct_s"] / medians["llama-server"]["p99_jct_s"], 3
            ),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
