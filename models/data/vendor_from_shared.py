"""Rebuild models/data/*.jsonl from the project's shared data folder (provenance record).

    python models/data/vendor_from_shared.py /path/to/shared/data/lengths

Copies only permissively licensed length files; the GPTeacher toolformer set (7,673
near-identical tool-call prompts) is subsampled with a fixed seed to keep the repo small.
Rows whose prompt is also a prompt of a measurement set are dropped, so that the shipped
model is never scored on a prompt it learned from (Vicuna-80 is kept: the measurements
leave its 80 questions out of alpaca_eval instead).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

#: (file in shared lengths/, licence) of every source the shipped model may learn from.
PERMISSIVE = {
    "gpteacher_codegen.jsonl": "MIT",
    "gpteacher_roleplay.jsonl": "MIT",
    "gpteacher_toolformer.jsonl": "MIT",
    "alpaca_en_demo.jsonl": "Apache-2.0",
    "vicuna80.jsonl": "Apache-2.0",
    "oasst_lottery.jsonl": "Apache-2.0",
    "oasst_1k_prompts.jsonl": "Apache-2.0",
    "oasst1_human.jsonl": "Apache-2.0",
    "mtbench_answers.jsonl": "Apache-2.0",
}
#: Length files used only to measure the model (non-commercial or unlicensed, or kept unseen).
MEASUREMENT_SETS = (
    "alpaca_eval.jsonl",
    "code_alpaca.jsonl",
    "sharegpt_1k.jsonl",
    "sharegpt_1k_turns.jsonl",
    "wildchat50m.jsonl",
)
KEEP_MEASURED_PROMPTS = frozenset({"vicuna80.jsonl"})
TOOLFORMER_KEEP = 1500
SEED = 0


def _rows(path: Path) -> list[dict[str, object]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def main(src: Path, dst: Path) -> None:
    """Copy (and subsample) the permissive length files from src to dst."""
    measured = {str(row["prompt"]).strip() for name in MEASUREMENT_SETS for row in _rows(src / name)}
    for name in PERMISSIVE:
        rows = _rows(src / name)
        if name == "gpteacher_toolformer.jsonl":
            rows = random.Random(SEED).sample(rows, TOOLFORMER_KEEP)
        if name not in KEEP_MEASURED_PROMPTS:
            rows = [row for row in rows if str(row["prompt"]).strip() not in measured]
        with open(dst / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
