"""Placement on unequal devices, on real processes: a coordinator and two fake agents whose
engines run at different speeds (each measures its own speed at startup, as a real agent
does), the same arrivals replayed under each placement. Reports each agent's share of the
generated tokens and the mean JCT per placement; the faster agent should get proportionally
more work under ``predicted`` placement, and the mean JCT should beat ``least-loaded``.

    .venv/bin/python benchmarks/unequal_agents.py --requests 80 --repetitions 2 \\
        --json docs/results/unequal-agents.json

Placements run interleaved (the machine drifts). Requests ask for exactly their trace length
(``ignore_eos``), so each ends with a result that names the agent that served it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.client import AsyncClient
from orchestrator.live_bench import capacity_tokens_s
from orchestrator.local import LocalCluster
from orchestrator.traces import arrival_scale, load_trace, output_lengths

DEFAULT_TRACE: Final = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "azure_conv_x_mixed.jsonl"
)
PLACEMENTS: Final = ("predicted", "least-loaded")
REQUEST_TIMEOUT_S: Final = 600.0
AGENT_START_TIMEOUT_S: Final = 60.0


async def replay(
    endpoint: str, prompts: list[str], arrivals: list[float], lengths: list[int]
) -> list[tuple[float, str, int]]:
    """(JCT, serving agent, tokens) of each request sent at its arrival offset."""
    async with AsyncClient(endpoint, timeout_s=REQUEST_TIMEOUT_S) as client:
        origin = time.perf_counter()

        async def one(index: int) -> tuple[float, str, int]:
            await asyncio.sleep(max(0.0, arrivals[index] - (time.perf_counter() - origin)))
            sent = time.perf_counter()
            result = await client.generate(
                prompts[index], max_tokens=lengths[index], ignore_eos=True, temperature=0.0
            )
            return time.perf_counter() - sent, result.agent, result.completion_tokens

        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--max-output-tokens", type=int, default=256)
    parser.add_argument("--load", type=float, default=0.8, help="x the agents' summed capacity")
    parser.add_argument("--slow-tps", type=float, default=30.0)
    parser.add_argument("--fast-tps", type=float, default=120.0)
    parser.add_argument("--max-seqs", type=int, default=4)
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = load_trace(args.trace, args.requests)
    lengths = output_lengths(rows, 1.0, args.max_output_tokens)
    folder = Path(tempfile.mkdtemp(prefix="edgeorch-unequal-"))
    local = LocalCluster(folder, "--policy", "fcfs", "--placement", PLACEMENTS[0])
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in PLACEMENTS}
    try:
        for name, tps in (("slow", args.slow_tps), ("fast", args.fast_tps)):
            local.start_agent(
                name,
                "--backend",
                "fake",
                "--fake-decode-tps",
                str(tps),
                "--max-seqs",
                str(args.max_seqs),
            )
        local.wait_for_agents(2, timeout_s=AGENT_START_TIMEOUT_S)
        capacity, _ = capacity_tokens_s(local.clients_endpoint)
        factor = arrival_scale(rows, lengths, capacity, args.load, None)
        arrivals = [(row.arrival_s - rows[0].arrival_s) * factor for row in rows]
        for repetition in range(1, args.repetitions + 1):
            for placement in PLACEMENTS:
                local.stop_process("coordinator")
                journal = str(folder / f"journal-{repetition}-{placement}.sqlite3")
                local.start_coordinator("--placement", placement, "--journal", journal)
                local.wait_for_agents(2, timeout_s=AGENT_START_TIMEOUT_S)
                outcomes = asyncio.run(
                    replay(local.clients_endpoint, [r.prompt for r in rows], arrivals, lengths)
                )
                tokens = Counter[str]()
                for _, agent, produced in outcomes:
                    tokens[agent] += produced
                total = sum(tokens.values())
                figures = {
                    "mean_jct_s": round(statistics.fmean(j for j, _, _ in outcomes), 3),
                    "token_share": {a: round(n / total, 3) for a, n in sorted(tokens.items())},
                }
                runs[placement].append(figures)
                print(f"rep {repetition} {placement}: {json.dumps(figures)}", file=sys.stderr)
    finally:
        local.stop()
    medians = {
        p: {
            "mean_jct_s": statistics.median(r["mean_jct_s"] for r in runs[p]),
            "fast_token_share": statistics.median(
                r["token_share"].get("fast", 0.0) for r in runs[p]
            ),
        }
        for p in PLACEMENTS
    }
    speed_share = args.fast_tps / (args.fast_tps + args.slow_tps)
    report = {
        "requests": len(rows),
        "load": args.load,
        "capacity_tokens_s": round(capacity, 1),
        "agents": {"slow": args.slow_tps, "fast": args.fast_tps, "max_seqs": args.max_seqs},
        "fast_speed_share": round(speed_share, 3),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "medians": medians,
        "predicted_vs_least_loaded_mean_jct": round(
            medians["predicted"]["mean_jct_s"] / medians["least-loaded"]["mean_jct_s"], 3
        ),
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
