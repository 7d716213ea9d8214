"""The coordinator's tokenizer CPU a chat turn, whole prompt against kept prefixes.

    python -m benchmarks.chat_tokenize [--json OUT]

Each conversation of ../shared/data/conversations is replayed turn by turn: every user turn's
prompt is the whole history rendered as the gateway renders it for the default model. It is
measured by tokenizing it whole and as the coordinator does for a chat
(``GgufTokenCounter.token_ids(chat=True)``: from the kept prefix of the turn before), in
separate passes over a file, interleaved three times (medians); the ids must be equal. Single
prompts (first turns of the length files, not chats) are measured the same way with
``chat=False``, which keeps nothing. CPU time of this process, per turn or prompt. Needs
EDGEORCH_SHARED_DATA (default ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.model import default_model_path
from benchmarks._predictor_common import emit_report
from orchestrator.llamalib import tokenize
from orchestrator.openai_requests import ModelView, parse_chat, render_chat
from orchestrator.textio import read_lines
from orchestrator.tokens import ChatTemplate, GgufTokenCounter, without_doubled_bos

CONVERSATIONS = (
    "sharegpt_1k_part1.jsonl",
    "sharegpt_1k_part2.jsonl",
    "wildchat50m.jsonl",
    "oasst1_en.jsonl",
)
SINGLE_PROMPTS = ("sharegpt_1k.jsonl", "wildchat50m.jsonl", "alpaca_eval.jsonl")
ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
REPETITIONS = 3
LONG_CONTEXT = 32_768
"""The served context the gateway sees (the default model's): every chat fits."""


def chat_turns(path: Path, template: ChatTemplate | None) -> list[str]:
    """Every user turn's rendered prompt, conversation by conversation, in order."""
    prompts = []
    for line in read_lines(path):
        if not line.strip():
            continue
        messages: list[tuple[str, str]] = []
        for turn in json.loads(line)["turns"]:
            messages.append((ROLES.get(turn["role"], "user"), turn["content"]))
            if turn["role"] == "user":
                prompts.append(render_chat(messages, template)[0])
    return prompts


def measure(model: Path, texts: list[str], chat: bool) -> dict[str, float]:
    """Interleaved passes over ``texts``: whole, then as the coordinator with a fresh counter
    (nothing kept), ``REPETITIONS`` times; the ids compared on every prompt."""
    whole_s: list[float] = []
    kept_s: list[float] = []
    for _ in range(REPETITIONS):
        counter = GgufTokenCounter(model)
        bos = counter._llama.token_bos()
        started = time.process_time()
        expected = [tokenize(counter._vocab, text, add_bos=True, special=True) for text in texts]
        whole_s.append(time.process_time() - started)
        started = time.process_time()
        got = [counter.token_ids(text, counter.model_name, chat=chat) for text in texts]
        kept_s.append(time.process_time() - started)
        for text, ids, reference in zip(texts, got, expected, strict=True):
            if ids != without_doubled_bos(reference, bos):
                raise SystemExit(f"kept-prefix ids differ from whole-prompt ids on {text[:80]!r}")
    whole, kept = statistics.median(whole_s), statistics.median(kept_s)
    return {
        "prompts": len(texts),
        "mean_chars": round(sum(map(len, texts)) / len(texts), 1),
        "whole_us": round(1e6 * whole / len(texts), 1),
        "kept_prefix_us": round(1e6 * kept / len(texts), 1),
        "ratio": round(kept / whole, 3),
    }


def counting(counter: GgufTokenCounter, *, whole: bool) -> Callable[[str, str | None, bool], int]:
    """The gateway's count: every text tokenized whole, or as the coordinator's counter does."""
    if whole:
        vocab = counter._vocab
        return lambda text, name, chat: len(tokenize(vocab, text, add_bos=True, special=True))
    return lambda text, name, chat: counter.count(text, name, chat=chat)[0]


def openai_turns(model: Path, path: Path) -> dict[str, float]:
    """Each user turn as a ``/v1/chat/completions`` request: the gateway's parsing (rendering,
    the prompt's count for the default ``max_tokens``, the earlier answers' counts for the
    predictor's hint) and the coordinator's count, all in the coordinator's process; with
    every text tokenized whole (as before session 21) against as the gateway and coordinator
    do now. Interleaved ``REPETITIONS`` times, fresh counters, medians."""
    requests = []
    for line in read_lines(path):
        if line.strip():
            messages: list[dict[str, str]] = []
            for turn in json.loads(line)["turns"]:
                messages.append(
                    {"role": ROLES.get(turn["role"], "user"), "content": turn["content"]}
                )
                if turn["role"] == "user":
                    requests.append(list(messages))
    timings: dict[str, list[float]] = {"whole_us": [], "kept_us": []}
    for _ in range(REPETITIONS):
        for flow in timings:
            counter = GgufTokenCounter(model)
            served = {counter.model_name: LONG_CONTEXT}
            view = ModelView(served, None, counting(counter, whole=flow == "whole_us"))
            started = time.process_time()
            for messages in requests:
                call = parse_chat({"model": counter.model_name, "messages": messages}, view)
                view.count_tokens(call.prompt, counter.model_name, True)  # the coordinator's
            timings[flow].append(1e6 * (time.process_time() - started) / len(requests))
    whole, kept_us = statistics.median(timings["whole_us"]), statistics.median(timings["kept_us"])
    return {
        "turns": len(requests),
        "whole_us": round(whole, 1),
        "kept_us": round(kept_us, 1),
        "ratio": round(kept_us / whole, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shared = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
    model = default_model_path(os.environ)
    report: dict[str, object] = {
        "model": model.name,
        "chats": {},
        "openai_chat_turns": {},
        "single_prompts": {},
    }
    template = GgufTokenCounter(model).chat_template
    for name in CONVERSATIONS:
        result = measure(model, chat_turns(shared / "conversations" / name, template), True)
        report["chats"][name] = result  # type: ignore[index]
        print(f"chats {name}: {result}", file=sys.stderr)
    for name in CONVERSATIONS[::2]:
        result = openai_turns(model, shared / "conversations" / name)
        report["openai_chat_turns"][name] = result  # type: ignore[index]
        print(f"OpenAI chat turns {name}: {result}", file=sys.stderr)
    for name in SINGLE_PROMPTS:
        rows = [json.loads(line) for line in read_lines(shared / "lengths" / name) if line.strip()]
        texts = sorted({row["prompt"] for row in rows})
        result = measure(model, texts, False)
        report["single_prompts"][name] = result  # type: ignore[index]
        print(f"single prompts {name}: {result}", file=sys.stderr)
    emit_report(report, args.json, as_json=True)


if __name__ == "__main__":
    main()
