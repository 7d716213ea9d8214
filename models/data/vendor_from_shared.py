"""Rebuild models/data/*.jsonl from the project's shared data folder (provenance record).

    python models/data/vendor_from_shared.py /path/to/shared/data/lengths

Copies only permissively licensed length files; the GPTeacher toolformer set (7,673
near-identical tool-call prompts) is subsampled with a fixed seed to keep the repo small.
Rows whose prompt is also a prompt of a measurement set are dropped, so that the shipped
model is never scored on a prompt it learned from (Vicuna-80 is kept: the measurements
leave its 80 questions out of alpaca_eval instead). Two files are built from raw
conversations, their answers counted with the default model's tokenizer: MT-bench's second
turns (32 models) and Open-Assistant's later user turns (human answers), each prompt being
the user turn alone, as the predictor reads a chat (`ConversationHint`).
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def _rows(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _mtbench_second_turns(shared: Path, count: Callable[[str], int]) -> Iterator[dict[str, object]]:
    root = shared / "mtbench_model_answers"
    questions = {int(q["question_id"]): q["turns"] for q in _rows(root / "question.jsonl")}
    for path in sorted((root / "model_answer").glob("*.jsonl")):
        for answer in _rows(path):
            turns = answer["choices"][0]["turns"]
            yield {
                "prompt": questions[int(answer["question_id"])][1],
                "output_tokens": count(turns[1]),
                "source": "mtbench_turn2",
                "model": answer["model_id"],
            }


def _oasst1_later_turns(shared: Path, count: Callable[[str], int]) -> Iterator[dict[str, object]]:
    for chat in _rows(shared / "conversations" / "oasst1_en.jsonl"):
        turns = chat["turns"]
        for user, reply in zip(turns[2::2], turns[3::2], strict=False):
            if user["role"] == "user" and reply["role"] == "assistant":
                yield {
                    "prompt": user["content"],
                    "output_tokens": count(reply["content"]),
                    "source": "oasst1_turns",
                    "model": "human (oasst1)",
                }


def _answer_tokens() -> Callable[[str], int]:
    """Tokens of an answer in the default model's tokenizer (without the BOS it adds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from agents.model import ensure_default_model
    from orchestrator.tokens import GgufTokenCounter

    counter = GgufTokenCounter(ensure_default_model(os.environ))
    return lambda text: max(0, counter.count(text, counter.model_name)[0] - 1)


#: Files built from raw conversations: (name, builder), both Apache-2.0.
FROM_CONVERSATIONS = {
    "mtbench_turn2.jsonl": _mtbench_second_turns,
    "oasst1_turns.jsonl": _oasst1_later_turns,
}


def main(src: Path, dst: Path) -> None:
    """Copy (and subsample) the permissive length files from src to dst."""
    measured = {
        str(row["prompt"]).strip() for name in MEASUREMENT_SETS for row in _rows(src / name)
    }
    count = _answer_tokens()
    for name, build in FROM_CONVERSATIONS.items():
        built = [r for r in build(src.parent, count) if str(r["prompt"]).strip() not in measured]
        _write(dst / name, built)
    for name in PERMISSIVE:
        rows = _rows(src / name)
        if name == "gpteacher_toolformer.jsonl":
            rows = random.Random(SEED).sample(rows, TOOLFORMER_KEEP)
        if name not in KEEP_MEASURED_PROMPTS:
            rows = [row for row in rows if str(row["prompt"]).strip() not in measured]
        _write(dst / name, rows)


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path.name}: {len(rows)} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
