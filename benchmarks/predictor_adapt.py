"""Adaptation on shifted distributions (measurement only; data CC BY-NC, never shipped).

    python benchmarks/predictor_adapt.py [--fit 300] [--seed 0] [--json]

For each scenario, `--fit` random completions of one served model are given to
`adapt_records` (as the coordinator's history would be), and the mean absolute error of the
predicted median is measured on the rest of that model's completions, before and after.
Scenarios: Code Alpaca (text-davinci-003, terse code answers) and three alpaca_eval models
with very different verbosity (text-davinci-003, GPT-4 turbo, Llama-2-70B-chat).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks._predictor_common import machine, records, scratch_dir
from orchestrator.predictor.adapt import adapt_records
from orchestrator.predictor.data import LengthRecord
from orchestrator.predictor.evaluate import evaluate_records
from orchestrator.predictor.model import LengthPredictor

SCENARIOS: tuple[tuple[str, str | None], ...] = (
    ("code_alpaca.jsonl", None),
    ("alpaca_eval.jsonl", "text_davinci_003"),
    ("alpaca_eval.jsonl", "gpt4_1106_preview"),
    ("alpaca_eval.jsonl", "llama-2-70b-chat-hf"),
)


def scenario(
    base: LengthPredictor, rows: list[LengthRecord], n_fit: int, seed: int
) -> dict[str, float]:
    """MAE before/after adapting on n_fit rows, measured on the others."""
    order = np.random.default_rng(seed).permutation(len(rows))
    fit = [rows[i] for i in order[:n_fit]]
    held = [rows[i] for i in order[n_fit:]]
    before = evaluate_records(base, held, latency_samples=0)
    out = scratch_dir()
    adapt_records(fit, out, base)
    after = evaluate_records(LengthPredictor.load(out), held, latency_samples=0)
    return {
        "n_fit": len(fit),
        "n_eval": len(held),
        "mae_before": before.mae_tokens,
        "mae_after": after.mae_tokens,
        "mae_reduction": 1.0 - after.mae_tokens / before.mae_tokens,
        "kendall_tau_before": before.kendall_tau,
        "kendall_tau_after": after.kendall_tau,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=int, default=300, help="completions adapted on (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = LengthPredictor.load()
    results = {}
    for name, model in SCENARIOS:
        rows = [r for r in records(name) if model is None or r.model == model]
        label = f"{name.removesuffix('.jsonl')}:{model or rows[0].model}"
        results[label] = scenario(base, rows, args.fit, args.seed)
        if not args.json:
            r = results[label]
            print(
                f"{label:40s} fit {r['n_fit']} eval {r['n_eval']}  MAE {r['mae_before']:.1f} -> "
                f"{r['mae_after']:.1f} tokens ({100 * r['mae_reduction']:.0f}% lower)  "
                f"tau {r['kendall_tau_before']:.3f} -> {r['kendall_tau_after']:.3f}",
                flush=True,
            )
    if args.json:
        print(json.dumps({"machine": machine(), "seed": args.seed, "scenarios": results}))


if __name__ == "__main__":
    main()
