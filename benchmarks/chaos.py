"""Throughput under chaos: the same seeded request set through the same local cluster of fake
agents, once undisturbed and once with one agent killed (-9) and restarted every
``--kill-interval`` seconds; prints requests/s and tokens/s of both and their ratio, and checks
every answer (one complete, seamless output per request, nothing answered twice).

The kill run lifts the attempt limit (``--max-attempts 1000``): random kills are not the
requests' fault, and the limit is the poison-request guard, measured elsewhere.

    .venv/bin/python benchmarks/chaos.py [--requests 300] [--agents 4] [--rate 40]
        [--kill-interval 2] [--seed 6] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.backends.fake.engine import fake_completion
from orchestrator.chaos import ChaosReport, ChaosRequest, run_chaos
from orchestrator.local import LocalCluster
from orchestrator.protocol import GenerationParams

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()  # noqa: SIM905
AGENT_ARGS = (
    "--backend",
    "fake",
    "--fake-decode-tps",
    "100",
    "--fake-prefill-tps",
    "20000",
    "--max-seqs",
    "4",
)


def requests(count: int, seed: int) -> list[ChaosRequest]:
    rng = random.Random(seed)
    return [
        ChaosRequest(
            f"chaos-{i}",
            f"chaos {i} " + " ".join(rng.choices(WORDS, k=rng.randint(2, 8))),
            rng.randint(8, 48),
        )
        for i in range(count)
    ]


def greedy(request: ChaosRequest) -> GenerationParams:
    return GenerationParams(max_tokens=request.max_tokens, temperature=0.0)


def run_once(args: argparse.Namespace, kill_interval_s: float | None) -> ChaosReport:
    with tempfile.TemporaryDirectory(prefix="edgeorch-chaos-") as logs:
        cluster = LocalCluster(Path(logs), "--predictor", "none", "--max-attempts", "1000")
        names = [f"chaos-{i}" for i in range(args.agents)]
        try:
            for name in names:
                cluster.start_agent(name, *AGENT_ARGS)
            cluster.wait_for_agents(len(names))
            return asyncio.run(
                run_chaos(
                    cluster,
                    requests(args.requests, args.seed),
                    params=greedy,
                    rate_per_s=args.rate,
                    timeout_s=600.0,
                    agents=names,
                    restart=lambda name: cluster.start_agent(name, *AGENT_ARGS),
                    kill_interval_s=kill_interval_s,
                    seed=args.seed,
                )
            )
        finally:
            cluster.stop()


def summary(report: ChaosReport) -> dict[str, Any]:
    problems = [
        p
        for o in report.observed.values()
        for p in o.problems(fake_completion(o.request.prompt, o.request.max_tokens))
    ]
    attempts = Counter(o.results[0].attempts for o in report.observed.values() if o.results)
    return {
        "requests": len(report.observed),
        "finished": report.finished,
        "problems": len(problems),
        "first_problems": problems[:5],
        "kills": len(report.kills),
        "attempts": {str(k): v for k, v in sorted(attempts.items())},
        "wall_s": round(report.wall_s, 2),
        "requests_per_s": round(report.requests_per_s, 2),
        "tokens_per_s": round(report.tokens_per_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--rate", type=float, default=40.0, help="submissions per second")
    parser.add_argument("--kill-interval", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    calm = summary(run_once(args, None))
    chaos = summary(run_once(args, args.kill_interval))
    ratio = chaos["tokens_per_s"] / calm["tokens_per_s"]
    for label, s in (("no kills", calm), (f"kill -9 every {args.kill_interval:g} s", chaos)):
        print(
            f"{label:22s} {s['requests']} requests in {s['wall_s']:6.2f} s: "
            f"{s['requests_per_s']:6.2f} req/s, {s['tokens_per_s']:7.1f} tok/s, "
            f"{s['kills']} kills, attempts {s['attempts']}, problems {s['problems']}"
        )
    print(f"throughput under chaos / undisturbed: {ratio:.3f}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": platform.platform(),
                    "args": vars(args) | {"json": str(args.json)},
                    "no_kills": calm,
                    "kills": chaos,
                    "throughput_ratio": round(ratio, 3),
                },
                indent=2,
            )
            + "\n"
        )
    if calm["problems"] or chaos["problems"] or not (calm["finished"] and chaos["finished"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
