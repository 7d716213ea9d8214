"""Length prediction on later turns of real chats: what the predictor reads matters.

    python -m benchmarks.predictor_conversations [--predictor DIR] [--json] [--out FILE]

For every user turn after the first of the shared `conversations/` files (ShareGPT, WildChat,
Open-Assistant) and MT-bench's second turns (32 models' answers), Kendall tau-b between a
prediction and the length of the assistant's answer to that turn, in the default model's
tokens, for what the predictor reads:
- `rendered`: the whole chat so far in the plain chat format (what the coordinator read
  before it took a `ConversationHint`);
- `last_user`: the latest user message alone;
- `earlier_answers`: the recency-weighted mean log length of the earlier answers alone;
- `hint`: the latest user message shifted by the earlier answers (what it reads now).
MT-bench is scored per answering model and reported as the median over models. Needs
EDGEORCH_SHARED_DATA (default ../shared/data); ShareGPT is measurement only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._predictor_common import emit_report, machine
from orchestrator.openai_requests import render_chat
from orchestrator.predictor.conversation import earlier_answers_level
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.model import LengthPredictor, shipped_model_dir

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
CONVERSATION_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ShareGPT (ChatGPT)", ("sharegpt_1k_part1.jsonl", "sharegpt_1k_part2.jsonl")),
    ("WildChat (Llama-3.3-70B, Qwen2.5-72B)", ("wildchat50m.jsonl",)),
    ("Open-Assistant (human answers)", ("oasst1_en.jsonl",)),
)
READERS = ("rendered", "last_user", "earlier_answers", "hint")


@dataclass(frozen=True)
class Turn:
    """One later user turn: the chat before it, and the length of the answer it got."""

    messages: tuple[tuple[str, str], ...]  # (role, text) up to and including the user turn
    earlier_answer_tokens: tuple[int, ...]
    answer_tokens: int


def turns_of(chat: Sequence[tuple[str, str]], count: Callable[[str], int]) -> list[Turn]:
    """Every user turn after the first that has an answer, with its history."""
    out = []
    answers: list[int] = []
    for i, (role, text) in enumerate(chat):
        if role == "assistant":
            answers.append(count(text))
        elif role == "user" and answers and i + 1 < len(chat) and chat[i + 1][0] == "assistant":
            out.append(Turn(tuple(chat[: i + 1]), tuple(answers), count(chat[i + 1][1])))
    return out


def score(predictor: LengthPredictor, turns: list[Turn]) -> dict[str, float]:
    """Tau of each reader on the turns."""
    actual = [t.answer_tokens for t in turns]
    rendered = [render_chat(t.messages, None)[0] for t in turns]
    last = [t.messages[-1][1] for t in turns]
    median = {
        "rendered": [p.quantile(0.5) for p in predictor.predict_batch(rendered)],
        "last_user": [p.quantile(0.5) for p in predictor.predict_batch(last)],
        "earlier_answers": [earlier_answers_level(t.earlier_answer_tokens)[0] for t in turns],
        "hint": [
            p.quantile(0.5)
            for p in predictor.predict_with_features(
                last, None, [t.earlier_answer_tokens for t in turns]
            )[0]
        ],
    }
    return {reader: kendall_tau_b(median[reader], actual) for reader in READERS}


def conversation_turns(files: Sequence[str], count: Callable[[str], int]) -> list[Turn]:
    turns = []
    for name in files:
        for line in (SHARED / "conversations" / name).read_text(encoding="utf-8").splitlines():
            chat = json.loads(line)
            turns += turns_of([(t["role"], t["content"]) for t in chat["turns"]], count)
    return turns


def mtbench_turns(count: Callable[[str], int]) -> dict[str, list[Turn]]:
    """Second turns of MT-bench, per answering model."""
    root = SHARED / "mtbench_model_answers"
    questions = {
        q["question_id"]: q["turns"]
        for q in map(json.loads, (root / "question.jsonl").read_text().splitlines())
    }
    out = {}
    for path in sorted((root / "model_answer").glob("*.jsonl")):
        turns = []
        for answer in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            q1, q2 = questions[answer["question_id"]][:2]
            a1, a2 = answer["choices"][0]["turns"][:2]
            chat = [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2)]
            turns += turns_of(chat, count)
        out[path.stem] = turns
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictor", type=Path, default=None, metavar="DIR")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    from agents.model import ensure_default_model
    from orchestrator.tokens import GgufTokenCounter

    counter = GgufTokenCounter(ensure_default_model(os.environ))

    def count(text: str) -> int:
        return counter.count(text, counter.model_name)[0] if text else 0

    predictor = LengthPredictor.load(args.predictor)
    results: dict[str, dict[str, object]] = {}
    for label, files in CONVERSATION_SETS:
        print(f"scoring {label}", file=sys.stderr, flush=True)
        turns = conversation_turns(files, count)
        results[label] = {"turns": len(turns), **score(predictor, turns)}
    print("scoring MT-bench second turns", file=sys.stderr, flush=True)
    by_model = mtbench_turns(count)
    per_model = {m: score(predictor, t) for m, t in by_model.items()}
    results["MT-bench second turns (32 models, median)"] = {
        "turns": sum(len(t) for t in by_model.values()),
        **{r: float(np.median([s[r] for s in per_model.values()])) for r in READERS},
    }
    report = {
        "predictor": str(args.predictor or shipped_model_dir()),
        "machine": machine(),
        "sets": results,
    }
    if not emit_report(report, args.out, args.json):
        print(f"{'set':45s} {'turns':>6s} " + " ".join(f"{r:>15s}" for r in READERS))
        for label, row in results.items():
            taus = " ".join(f"{float(row[r]):15.3f}" for r in READERS)  # type: ignore[arg-type]
            print(f"{label:45s} {row['turns']:6d} {taus}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
