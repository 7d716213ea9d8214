"""Transfer to distributions the shipped predictor never saw (no adaptation).

    python benchmarks/predictor_transfer.py [--lodo] [--json]

1. The shipped model on alpaca_eval (CC BY-NC, measurement only) against GPT-4-class
   answers and the median over 12 models, without the 80 Vicuna questions (in training).
   alpaca_eval is split by a hash of the prompt: the "dev" half was looked at while choosing
   the design (encoder depth, token budget, head); the "test" half was not.
2. The shipped model on Code Alpaca (text-davinci-003 answers, CC BY-NC, measurement only).
3. --lodo: leave-one-dataset-out over the vendored sources: the recipe's head (with its
   source weights: GPTeacher sets weigh 0) is refit without one source and scored on it
   (needs the train extra; a few minutes).
Prompt length's own tau is shown for scale.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._predictor_common import (
    Embedder,
    machine,
    median_by_prompt,
    records,
    scratch_dir,
    train_predictor_dir,
)
from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.model import LengthPredictor
from orchestrator.predictor.train import DEFAULT_DATA_DIR

ALPACA_EVAL_TARGETS = ("gpt4_1106_preview", "gpt-4o-2024-05-13", "claude-3-opus-20240229")


def half(prompt: str) -> str:
    """'dev' or 'test', fixed by a CRC32 of the prompt text."""
    return "dev" if zlib.crc32(prompt.encode("utf-8")) % 2 == 0 else "test"


def score(predictor: LengthPredictor, prompts: list[str], tokens: np.ndarray) -> dict[str, float]:
    predicted = [p.quantiles[0.5] for p in predictor.predict_batch(prompts)]
    return {
        "n": len(prompts),
        "kendall_tau": kendall_tau_b(predicted, tokens),
        "prompt_length_tau": kendall_tau_b([len(p) for p in prompts], tokens),
    }


def alpaca_eval_scores(predictor: LengthPredictor) -> dict[str, dict[str, float]]:
    vicuna = {r.prompt for r in records("vicuna80.jsonl")}
    rows = [r for r in records("alpaca_eval.jsonl") if r.prompt not in vicuna]
    out = {}
    for part in ("dev", "test"):
        subset = [r for r in rows if half(r.prompt) == part]
        prompts, medians = median_by_prompt(subset)
        out[f"alpaca_eval_{part}:median_of_12"] = score(predictor, prompts, medians)
        for model in ALPACA_EVAL_TARGETS:
            p, y = median_by_prompt([r for r in subset if r.model == model])
            out[f"alpaca_eval_{part}:{model}"] = score(predictor, p, y)
    return out


def lodo_scores() -> dict[str, dict[str, float]]:
    by_source: dict[str, list[LengthRecord]] = defaultdict(list)
    for path in sorted(Path(DEFAULT_DATA_DIR).glob("*.jsonl")):
        for rec in load_records(path):
            by_source[rec.source].append(rec)
    embedder = Embedder()
    out = {}
    for held, rows in sorted(by_source.items()):
        training = [r for s, other in by_source.items() if s != held for r in other]
        predictor = train_predictor_dir(embedder, training, 0, scratch_dir())
        out[f"lodo:{held}"] = score(predictor, *median_by_prompt(rows))
        print(f"lodo {held}: {out[f'lodo:{held}']}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lodo", action="store_true", help="also run leave-one-dataset-out")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shipped = LengthPredictor.load()
    results = alpaca_eval_scores(shipped)
    ca_prompts, ca_tokens = median_by_prompt(records("code_alpaca.jsonl"))
    results["code_alpaca:text-davinci-003"] = score(shipped, ca_prompts, ca_tokens)
    if args.lodo:
        results.update(lodo_scores())
    if args.json:
        print(json.dumps({"machine": machine(), "results": results}))
    else:
        for name, r in results.items():
            print(
                f"{name:45s} n={r['n']:5d}  tau {r['kendall_tau']:.3f}  "
                f"(prompt length {r['prompt_length_tau']:+.3f})"
            )


if __name__ == "__main__":
    main()
