"""Rank quality on real users' chat prompts, per source and answering model (no adaptation).

    python -m benchmarks.predictor_real_chat [--predictor DIR] [--json] [--out FILE]

Each length file of the shared data is split by its records' `model` field; Kendall tau-b
between the predicted median and that model's answer lengths is taken per model (models
with fewer than MIN_ANSWERS answers are skipped), then the median and range over models.
Prompts the model trained on (the records of the sources its metadata names, from the
recipe's data folder or `--training DIR`) are left out of every set, so a set fully in
training reports 0 prompts; `--unseen-by DIR` (repeatable) also leaves out what another
predictor trained on, to compare two models on the same prompts.
Real-chat sources come first. Needs EDGEORCH_SHARED_DATA (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks._predictor_common import emit_report, machine, records
from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.model import METADATA_FILE, LengthPredictor, shipped_model_dir
from orchestrator.predictor.train import DEFAULT_DATA_DIR

#: (file, what it is), real users' prompts first.
SETS: tuple[tuple[str, str], ...] = (
    ("sharegpt_1k.jsonl", "ShareGPT first turns (ChatGPT, 2023)"),
    ("sharegpt_1k_turns.jsonl", "ShareGPT, every user turn alone (ChatGPT)"),
    ("wildchat50m.jsonl", "WildChat first turns (Llama-3.3-70B, Qwen2.5-72B)"),
    ("oasst_1k_prompts.jsonl", "Open-Assistant 1k prompts (OA fine-tunes)"),
    ("oasst_lottery.jsonl", "Open-Assistant prompt lottery (8 models)"),
    ("oasst1_human.jsonl", "Open-Assistant first turns (human replies)"),
    ("mtbench_answers.jsonl", "MT-bench first turns (32 models)"),
    ("vicuna80.jsonl", "Vicuna-80 (7 models)"),
    ("alpaca_eval.jsonl", "alpaca_eval (12 models)"),
    ("code_alpaca.jsonl", "Code Alpaca (text-davinci-003)"),
)
MIN_ANSWERS = 30


def training_prompts(predictor_dir: Path, data_dir: Path) -> set[str]:
    """Prompts of the sources the model's metadata says it was trained on."""
    metadata = json.loads((predictor_dir / METADATA_FILE).read_text(encoding="utf-8"))
    sources = set(metadata["training"]["by_source"])
    rows = [r for f in sorted(data_dir.glob("*.jsonl")) for r in load_records(f)]
    return {r.prompt.strip() for r in rows if (r.source or "unknown") in sources}


def score_set(
    predictor: LengthPredictor, rows: list[LengthRecord], seen: set[str]
) -> dict[str, object]:
    """Per-model tau on the rows whose prompt is not in `seen`."""
    unseen = [r for r in rows if r.prompt.strip() not in seen]
    prompts = sorted({r.prompt for r in unseen})
    predicted = dict(
        zip(prompts, (p.quantiles[0.5] for p in predictor.predict_batch(prompts)), strict=True)
    )
    by_model: dict[str, list[LengthRecord]] = defaultdict(list)
    for r in unseen:
        by_model[r.model or "unknown"].append(r)
    taus = {
        model: kendall_tau_b([predicted[r.prompt] for r in rs], [r.output_tokens for r in rs])
        for model, rs in sorted(by_model.items())
        if len(rs) >= MIN_ANSWERS
    }
    values = list(taus.values())
    return {
        "prompts": len(prompts),
        "left_out_as_trained": len({r.prompt for r in rows}) - len(prompts),
        "models": len(taus),
        "tau_median": float(np.median(values)) if values else None,
        "tau_min": min(values) if values else None,
        "tau_max": max(values) if values else None,
        "tau_by_model": taus,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, default=None, metavar="DIR")
    parser.add_argument("--training", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR")
    parser.add_argument(
        "--unseen-by",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also leave out the training prompts of this predictor folder",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    predictor_dir = args.predictor or shipped_model_dir()
    predictor = LengthPredictor.load(predictor_dir)
    seen = training_prompts(predictor_dir, args.training).union(
        *(training_prompts(other, args.training) for other in args.unseen_by)
    )
    results = {}
    for name, label in SETS:
        print(f"scoring {name}", file=sys.stderr, flush=True)
        results[name] = {"label": label, **score_set(predictor, records(name), seen)}
    report = {
        "predictor": str(predictor_dir),
        "training": str(args.training),
        "unseen_by": [str(other) for other in args.unseen_by],
        "machine": machine(),
        "sets": results,
    }
    if not emit_report(report, args.out, args.json):
        print(f"{'set':55s} {'prompts':>7s} {'models':>6s} {'tau':>6s}  range")
        for result in results.values():
            tau = result["tau_median"]
            span = (
                f"{result['tau_min']:.3f}-{result['tau_max']:.3f}" if result["models"] > 1 else ""
            )
            shown = f"{tau:6.3f}" if tau is not None else "   n/a"
            counts = f"{result['prompts']:7d} {result['models']:6d}"
            print(f"{result['label']:55s} {counts} {shown}  {span}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
