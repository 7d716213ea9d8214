"""A real-chat trace: real users' prompts with their own answers' lengths on real arrivals.

    python -m benchmarks.realchat_trace --out /tmp/realchat_azure.jsonl [--requests 2000] \
        [--lengths sharegpt_1k.jsonl,sharegpt_1k_turns.jsonl,wildchat50m.jsonl] [--seed 0]

Each of the first N requests of the Azure LLM inference trace 2023 (conversation; CC-BY-4.0)
keeps its arrival time; its prompt and output length are one row of the given length files
(``../shared/data/lengths``, or paths), each distinct prompt once, in a seeded shuffled order.
Unlike the ShareGPT trace, a prompt here comes with the length of its own answer, so a
predictor's ranking on real chat shows in the schedule. The default sources are the real-user
chat sets the shipped predictor never trained on (ShareGPT: measurement only, so the trace is
built from the shared data and never vendored). For long answers run the bench with
``--length-scale`` (the default sources' median answer is about 260 tokens).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
from datetime import datetime
from pathlib import Path

from orchestrator.predictor.data import LengthRecord, load_records

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
AZURE_CONV = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
DEFAULT_LENGTHS = ("sharegpt_1k.jsonl", "sharegpt_1k_turns.jsonl", "wildchat50m.jsonl")
SHUFFLE_SEED = 0


def distinct_rows(files: list[Path], seed: int = SHUFFLE_SEED) -> list[LengthRecord]:
    """One row per distinct prompt (its first answer in file order), seeded shuffle."""
    seen: set[str] = set()
    rows = []
    for path in files:
        for rec in load_records(path):
            if rec.prompt.strip() not in seen:
                seen.add(rec.prompt.strip())
                rows.append(rec)
    random.Random(seed).shuffle(rows)
    return rows


def build(requests: int, files: list[Path], out: Path, seed: int = SHUFFLE_SEED) -> None:
    pool = distinct_rows(files, seed)
    with (SHARED / AZURE_CONV).open() as f:
        arrivals = list(csv.reader(f))[1 : requests + 1]
    if len(arrivals) > len(pool):
        raise SystemExit(f"only {len(pool)} distinct prompts in {files} for {requests} requests")
    start = datetime.fromisoformat(arrivals[0][0][:26])
    with out.open("w") as f:
        for (stamp, _, _), rec in zip(arrivals, pool, strict=False):
            arrival = (datetime.fromisoformat(stamp[:26]) - start).total_seconds()
            row = {
                "arrival_s": round(arrival, 4),
                "prompt": rec.prompt,
                "output_tokens": rec.output_tokens,
                "source": f"{rec.source}+azure_conv",
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    lengths = [rec.output_tokens for rec in pool[: len(arrivals)]]
    print(
        f"wrote {len(arrivals)} requests to {out}: answer tokens median "
        f"{statistics.median(lengths):.0f}, mean {statistics.mean(lengths):.0f}, "
        f"p90 {statistics.quantiles(lengths, n=10)[-1]:.0f}, max {max(lengths)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=SHUFFLE_SEED, help="prompt order (default 0)")
    parser.add_argument(
        "--lengths",
        default=",".join(DEFAULT_LENGTHS),
        help="comma-separated length files: names in the shared lengths/ folder, or paths",
    )
    args = parser.parse_args()
    files = [
        Path(name) if Path(name).is_file() else SHARED / "lengths" / name
        for name in args.lengths.split(",")
    ]
    build(args.requests, files, args.out, args.seed)


if __name__ == "__main__":
    main()
