"""How well can any predictor rank the length of one sampled answer? The data's own ceiling.

    python -m benchmarks.sampling_ceiling [--json OUT]

The Sequence-Scheduling data (``../shared/data/seqsched_alpaca_lengths``, measurement only, not
vendored) holds, for 10,000 Alpaca prompts, the answer length of one model (Vicuna-7B) sampled
at four temperatures. Two samples of the same prompt differ only by sampling, so:

- Kendall tau between two samples is what a predictor that knew one other answer would get;
- tau between the geometric mean of three samples and the fourth is near what a predictor
  that knew the prompt's whole length distribution could get on one sampled answer.

No prompt-only predictor beats the second figure; docs/SCHED_RESULTS.md sets it against the
tau the scheduling targets would need.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np

from orchestrator.lengths import kendall_tau

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
SAMPLES_FILE = "seqsched_alpaca_lengths/alpaca-val-10k-length.json"
TEMPERATURES = ("0.0", "0.3", "0.5", "0.7")


def ceilings(lengths: np.ndarray) -> dict[str, dict[str, float]]:
    """Pairwise tau between temperatures, and tau of the other samples' geometric mean against
    each one; ``lengths`` is prompts x temperatures."""
    pairs = {
        f"T{TEMPERATURES[i]} vs T{TEMPERATURES[j]}": kendall_tau(lengths[:, i], lengths[:, j])
        for i, j in itertools.combinations(range(len(TEMPERATURES)), 2)
    }
    logs = np.log1p(lengths)
    from_others = {}
    for i, temperature in enumerate(TEMPERATURES):
        others = np.delete(logs, i, axis=1).mean(axis=1)
        from_others[f"T{temperature}"] = kendall_tau(others, lengths[:, i])
    return {
        "one_other_sample": {k: round(v, 3) for k, v in pairs.items()},
        "mean_of_three_others": {k: round(v, 3) for k, v in from_others.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = json.loads((SHARED / SAMPLES_FILE).read_text())
    lengths = np.array([[row[f"L_t{t}"] for t in TEMPERATURES] for row in rows], dtype=float)
    result = {"prompts": len(rows), "source": SAMPLES_FILE, **ceilings(lengths)}
    print(f"{len(rows)} prompts, Vicuna-7B answer lengths at temperatures {TEMPERATURES}")
    for group in ("one_other_sample", "mean_of_three_others"):
        print(group.replace("_", " ") + ":")
        for name, tau in result[group].items():
            print(f"  {name:16s} Kendall tau {tau:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
