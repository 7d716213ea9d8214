"""Rebuild models/data/*.jsonl from the project's shared data folder (provenance record).

    python models/data/vendor_from_shared.py /path/to/shared/data/lengths

Copies only permissively licensed length files; the GPTeacher toolformer set (7,673
near-identical tool-call prompts) is subsampled with a fixed seed to keep the repo small.
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
}
TOOLFORMER_KEEP = 1500
SEED = 0


def main(src: Path, dst: Path) -> None:
    """Copy (and subsample) the permissive length files from src to dst."""
    for name in PERMISSIVE:
        lines = (src / name).read_text(encoding="utf-8").splitlines()
        rows = [json.loads(line) for line in lines if line.strip()]
        if name == "gpteacher_toolformer.jsonl":
            rows = random.Random(SEED).sample(rows, TOOLFORMER_KEEP)
        with open(dst / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
