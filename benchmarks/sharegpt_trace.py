"""A long-prompt trace whose lengths no predictor can know: how the policies behave when the
length predictions carry no information.

    python -m benchmarks.sharegpt_trace --out /tmp/sharegpt_azure.jsonl [--requests 2000]

Each of the first N requests of the Azure LLM inference trace 2023 (conversation; CC-BY-4.0)
keeps its arrival time and its generated-token count. Its prompt is a real first-turn ShareGPT
prompt (``../shared/data/sharegpt_mlenergy``), the unused one whose length in the default
model's tokenizer is nearest to the Azure request's context tokens. The prompts are longer
than the mixed trace's (mean about 290 tokens against 35). The pairing is arbitrary:
ShareGPT here has no answers, so a prompt says nothing about its output length.

ShareGPT has no stated license, so the trace is built from the shared data for measurement
and never vendored.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import os
import random
import statistics
from datetime import datetime
from pathlib import Path

from agents.model import ensure_default_model
from orchestrator.tokens import GgufTokenCounter

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
SHAREGPT_FILES = (
    "ShareGPT_V3_filtered_1000.json",
    "ShareGPT_V3_filtered_500.json",
    "sg_90k_part1_html_cleaned_lang_first_sampled_sorted.json",
)
AZURE_CONV = "azure_llm_2023/AzureLLMInferenceTrace_conv.csv"
SHUFFLE_SEED = 0


def first_turn_prompts(folder: Path) -> list[str]:
    """Distinct non-empty first human turns, in a seeded shuffled order."""
    seen: set[str] = set()
    prompts: list[str] = []
    for name in SHAREGPT_FILES:
        for conversation in json.loads((folder / name).read_text()):
            turn = conversation["conversations"][0]
            text = turn["value"]
            if turn["from"] == "human" and text.strip() and text not in seen:
                seen.add(text)
                prompts.append(text)
    random.Random(SHUFFLE_SEED).shuffle(prompts)
    return prompts


def build(requests: int, out: Path) -> None:
    counter = GgufTokenCounter(ensure_default_model(os.environ))
    prompts = first_turn_prompts(SHARED / "sharegpt_mlenergy")
    pool = sorted((counter.count(p, counter.model_name)[0], i) for i, p in enumerate(prompts))
    with (SHARED / AZURE_CONV).open() as f:
        rows = list(csv.reader(f))[1 : requests + 1]
    if len(rows) > len(pool):
        raise SystemExit(f"only {len(pool)} prompts for {len(rows)} requests")
    start = datetime.fromisoformat(rows[0][0][:26])
    prompt_tokens: list[int] = []
    with out.open("w") as f:
        for stamp, context, generated in rows:
            k = bisect.bisect_left(pool, (int(context), -1))
            k = min(
                range(max(0, k - 1), min(len(pool), k + 1)),
                key=lambda j: abs(pool[j][0] - int(context)),
            )
            tokens, index = pool.pop(k)
            prompt_tokens.append(tokens)
            arrival = (datetime.fromisoformat(stamp[:26]) - start).total_seconds()
            row = {
                "arrival_s": round(arrival, 4),
                "prompt": prompts[index],
                "output_tokens": int(generated),
                "source": "sharegpt+azure_conv",
            }
            f.write(json.dumps(row) + "\n")
    print(
        f"wrote {len(rows)} requests to {out}: prompt tokens mean "
        f"{statistics.mean(prompt_tokens):.0f}, median {statistics.median(prompt_tokens):.0f}, "
        f"max {max(prompt_tokens)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    build(args.requests, args.out)


if __name__ == "__main__":
    main()
