"""In-distribution, grouped: the issue's alpaca_eval measurement (never shipped).

    python benchmarks/predictor_grouped.py [--seeds 0 1 2 3 4] [--json]

alpaca_eval's prompts minus the 80 Vicuna questions are split 80/20 by prompt (every
model's answers to a held-out prompt stay out of training). The recipe's head is trained as
the recipe trains it (mean log length over the answering models, sources at equal shares,
penalty by cross-validation) on the 80% plus the recipe's own vendored data except
Vicuna-80, and Kendall tau-b against the median length over the 12 models is measured on the
20% through the ONNX runtime. A TF-IDF ridge baseline (80% only) is shown for scale.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks._predictor_common import (
    Embedder,
    machine,
    median_by_prompt,
    records,
    scratch_dir,
    train_predictor_dir,
)
from orchestrator.predictor.data import load_records
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.train import DEFAULT_DATA_DIR

HOLDOUT_SHARE = 0.2


def tfidf_ridge_tau(
    train_p: list[str], train_y: np.ndarray, test_p: list[str], test_y: np.ndarray
) -> float:
    """Baseline: word 1-2-gram TF-IDF + ridge on log tokens."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    model = Ridge(alpha=1.0).fit(vec.fit_transform(train_p), np.log1p(train_y))
    return kendall_tau_b(model.predict(vec.transform(test_p)), test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    vicuna = {r.prompt for r in records("vicuna80.jsonl")}
    alpaca_eval = [r for r in records("alpaca_eval.jsonl") if r.prompt not in vicuna]
    prompts, medians = median_by_prompt(alpaca_eval)
    recipe_data = [
        r
        for path in sorted(DEFAULT_DATA_DIR.glob("*.jsonl"))
        for r in load_records(path)
        if r.source != "vicuna80" and r.prompt not in vicuna
    ]
    embedder = Embedder()
    rows = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(prompts))
        n_test = round(HOLDOUT_SHARE * len(prompts))
        test, train = order[:n_test], order[n_test:]
        train_p = [prompts[i] for i in train]
        test_p = [prompts[i] for i in test]
        held_out = set(test_p)
        training = [r for r in alpaca_eval if r.prompt not in held_out] + recipe_data
        predictor = train_predictor_dir(embedder, training, seed, scratch_dir())
        predicted = [p.quantiles[0.5] for p in predictor.predict_batch(test_p)]
        tau = kendall_tau_b(predicted, medians[test])
        base = tfidf_ridge_tau(train_p, medians[train], test_p, medians[test])
        rows.append(
            {
                "seed": seed,
                "n_train": len(train),
                "n_test": len(test),
                "kendall_tau": tau,
                "tfidf_ridge_tau": base,
            }
        )
        if not args.json:
            print(
                f"seed {seed}: train {len(train)} test {len(test)}  tau {tau:.3f}  "
                f"(TF-IDF ridge {base:.3f})",
                flush=True,
            )
    taus = np.asarray([r["kendall_tau"] for r in rows])
    base = np.asarray([r["tfidf_ridge_tau"] for r in rows])
    summary = {
        "machine": machine(),
        "prompts": len(prompts),
        "kendall_tau_mean": float(taus.mean()),
        "kendall_tau_sd": float(taus.std(ddof=1)) if len(taus) > 1 else 0.0,
        "tfidf_ridge_tau_mean": float(base.mean()),
        "splits": rows,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"mean Kendall tau {taus.mean():.3f} +- {summary['kendall_tau_sd']:.3f} over "
            f"{len(rows)} splits; TF-IDF ridge {base.mean():.3f}"
        )


if __name__ == "__main__":
    main()
