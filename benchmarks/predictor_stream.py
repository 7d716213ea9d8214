"""Online adaptation on a real-chat stream: each prediction made before its answer is seen.

    python -m benchmarks.predictor_stream [--every 500] [--data F.jsonl,...] [--keep-repeats]
        [--json] [--out FILE]

The records of the given length files (default: ShareGPT's first turns and single turns,
one answering model, never trained on; each prompt once unless `--keep-repeats`, seeded
shuffle = arrival order; give one model's answers per run, or tau mixes models of different
verbosity) arrive in blocks of `--every`. Each block is predicted by the predictor adapted,
as the coordinator's automatic mode does (`adapt_records`: level, slope, a ridge correction
head over the prompt features when cross-validation keeps it, quantile offsets, a neighbour
memory of the completions), on every completion before it;
then its answers join the history. Reported per block and over the whole stream after the
first block: Kendall tau and MAE of the predicted median, adapted against the shipped model.
Measurement only (ShareGPT has no licence).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

from benchmarks._predictor_common import emit_report, machine, scratch_dir
from benchmarks.realchat_trace import SHUFFLE_SEED, distinct_rows
from orchestrator.predictor.adapt import adapt_records
from orchestrator.predictor.data import LengthRecord, load_records
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.model import LengthPredictor

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
DEFAULT_STREAM = ("sharegpt_1k.jsonl", "sharegpt_1k_turns.jsonl")


def every_row(files: list[Path]) -> list[LengthRecord]:
    """Every record of the files in a seeded shuffle, repeated prompts included."""
    rows = [rec for path in files for rec in load_records(path)]
    random.Random(SHUFFLE_SEED).shuffle(rows)
    return rows


def medians(predictor: LengthPredictor, prompts: list[str]) -> np.ndarray:
    return np.asarray([p.quantile(0.5) for p in predictor.predict_batch(prompts)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=500, help="completions per adaptation")
    parser.add_argument("--data", default=",".join(DEFAULT_STREAM), help="length files")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument(
        "--keep-repeats",
        action="store_true",
        help="every record, a prompt asked again included (as real traffic repeats 'continue')",
    )
    args = parser.parse_args(argv)
    files = [Path(n) if Path(n).is_file() else SHARED / "lengths" / n for n in args.data.split(",")]
    rows = every_row(files) if args.keep_repeats else distinct_rows(files)
    base = LengthPredictor.load()
    prompts = [r.prompt for r in rows]
    actual = np.asarray([r.output_tokens for r in rows], dtype=np.float64)
    shipped = medians(base, prompts)
    adapted = shipped.copy()
    blocks = []
    for start in range(args.every, len(rows), args.every):
        print(f"adapting on {start} completions", file=sys.stderr, flush=True)
        out = scratch_dir()
        summary = adapt_records(rows[:start], out, base)
        block = slice(start, min(start + args.every, len(rows)))
        adapted[block] = medians(LengthPredictor.load(out), prompts[block])
        blocks.append(
            {
                "seen": start,
                "predicted": block.stop - block.start,
                "tau_shipped": kendall_tau_b(shipped[block], actual[block]),
                "tau_adapted": kendall_tau_b(adapted[block], actual[block]),
                "mae_shipped": float(np.mean(np.abs(shipped[block] - actual[block]))),
                "mae_adapted": float(np.mean(np.abs(adapted[block] - actual[block]))),
                "adaptation": summary,
            }
        )
    rest = slice(args.every, len(rows))
    report = {
        "machine": machine(),
        "files": [str(f) for f in files],
        "repeats_kept": args.keep_repeats,
        "records": len(rows),
        "every": args.every,
        "stream_after_first_block": {
            "tau_shipped": kendall_tau_b(shipped[rest], actual[rest]),
            "tau_adapted": kendall_tau_b(adapted[rest], actual[rest]),
            "mae_shipped": float(np.mean(np.abs(shipped[rest] - actual[rest]))),
            "mae_adapted": float(np.mean(np.abs(adapted[rest] - actual[rest]))),
        },
        "blocks": blocks,
    }
    if not emit_report(report, args.out, args.json):
        for b in blocks:
            print(
                f"after {b['seen']:5d}: tau {b['tau_shipped']:.3f} -> {b['tau_adapted']:.3f}, "
                f"MAE {b['mae_shipped']:.0f} -> {b['mae_adapted']:.0f} tokens"
            )
        s = report["stream_after_first_block"]
        print(
            f"stream: tau {s['tau_shipped']:.3f} -> {s['tau_adapted']:.3f}, "
            f"MAE {s['mae_shipped']:.0f} -> {s['mae_adapted']:.0f} tokens"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
