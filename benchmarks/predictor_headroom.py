"""How far in-distribution real-chat data takes first-turn ranking: the shipped predictor
adapted on N completions of the same population (other conversations, same users and
answering model) and scored on first turns it never saw.

    python -m benchmarks.predictor_headroom [--sizes 250,500,1000,0] [--seeds 3] [--json]
        [--out FILE]

ShareGPT's conversations (ChatGPT's answers) are split in two halves by conversation, with a
seeded coin per conversation; the adaptation (`adapt_records`, what the coordinator's
automatic mode runs: level, slope, a ridge correction head over the prompt features when
cross-validation keeps it, a neighbour memory) learns from N user turns of one half, each
read alone as the predictor reads a chat's latest message (0 = all of them), and Kendall
tau-b is taken on the other half's first turns, against the shipped model on the same
prompts. Both halves serve once as the test, for each seed. This is a deployment that has
served a thousand or more of its own users' chats, so it bounds what more training data of
this kind could do for the shipped model. Measurement only (ShareGPT has no licence).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._predictor_common import emit_report, machine, scratch_dir
from orchestrator.predictor.adapt import adapt_records
from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.model import LengthPredictor

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
FIRST_TURNS = "lengths/sharegpt_1k.jsonl"
EVERY_TURN = "lengths/sharegpt_1k_turns.jsonl"
CONVERSATIONS = ("conversations/sharegpt_1k_part1.jsonl", "conversations/sharegpt_1k_part2.jsonl")


def conversation_of(paths: list[Path]) -> dict[str, str]:
    """Each user turn's text -> its conversation (segment ids `NAME_K` share `NAME`)."""
    found: dict[str, str] = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            chat = json.loads(line)
            name = chat["id"].rsplit("_", 1)[0]
            for turn in chat["turns"]:
                if turn["role"] == "user":
                    found.setdefault(turn["content"], name)
    return found


def medians(predictor: LengthPredictor, prompts: list[str]) -> np.ndarray:
    return np.asarray([p.quantile(0.5) for p in predictor.predict_batch(prompts)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250,500,1000,0", help="completions adapted on")
    parser.add_argument("--seeds", type=int, default=3, help="seeded splits into halves")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    chats = conversation_of([SHARED / p for p in CONVERSATIONS])
    firsts = load_records(SHARED / FIRST_TURNS)
    turns = load_records(SHARED / EVERY_TURN)
    first_prompts = sorted({r.prompt for r in firsts})
    answer = {r.prompt: r.output_tokens for r in firsts}

    def chat(prompt: str) -> str:
        return chats.get(prompt, "alone:" + prompt)

    base = LengthPredictor.load()
    shipped = dict(zip(first_prompts, medians(base, first_prompts), strict=True))
    names = sorted({chat(r.prompt) for r in [*firsts, *turns]})
    runs: dict[int, list[dict[str, float]]] = defaultdict(list)
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        half = dict(zip(names, rng.integers(2, size=len(names)).tolist(), strict=True))
        for test_half in (0, 1):
            tested = [p for p in first_prompts if half[chat(p)] == test_half]
            pool = _distinct([r for r in turns if half[chat(r.prompt)] != test_half])
            actual = [answer[p] for p in tested]
            for size in sizes:
                n = len(pool) if size <= 0 else min(size, len(pool))
                chosen = [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
                print(f"seed {seed} half {test_half}: adapting on {n}", file=sys.stderr)
                out = scratch_dir()
                adapt_records(chosen, out, base)
                adapted = medians(LengthPredictor.load(out), tested)
                runs[size].append(
                    {
                        "adapted_on": n,
                        "tested": len(tested),
                        "tau_shipped": kendall_tau_b([shipped[p] for p in tested], actual),
                        "tau_adapted": kendall_tau_b(adapted, actual),
                    }
                )
    report = {
        "machine": machine(),
        "seeds": args.seeds,
        "by_size": {str(size): _summary(rows) for size, rows in runs.items()},
    }
    if not emit_report(report, args.out, args.json):
        for size, s in report["by_size"].items():
            print(
                f"adapted on {size:>5} ({s['adapted_on_mean']:.0f}): first-turn tau "
                f"{s['tau_shipped_mean']:.3f} -> {s['tau_adapted_mean']:.3f} "
                f"(+-{s['tau_adapted_sd']:.3f} over {s['runs']} halves)"
            )
    return 0


def _distinct(rows: list[LengthRecord]) -> list[LengthRecord]:
    """One record per prompt (the first), in file order."""
    seen: set[str] = set()
    kept = []
    for r in rows:
        if r.prompt not in seen:
            seen.add(r.prompt)
            kept.append(r)
    return kept


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    adapted = np.asarray([r["tau_adapted"] for r in rows])
    return {
        "runs": len(rows),
        "adapted_on_mean": float(np.mean([r["adapted_on"] for r in rows])),
        "tested_mean": float(np.mean([r["tested"] for r in rows])),
        "tau_shipped_mean": float(np.mean([r["tau_shipped"] for r in rows])),
        "tau_adapted_mean": float(adapted.mean()),
        "tau_adapted_sd": float(adapted.std()),
        "tau_adapted_min": float(adapted.min()),
        "tau_adapted_max": float(adapted.max()),
    }


if __name__ == "__main__":
    raise SystemExit(main())
