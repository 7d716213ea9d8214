"""A real-chat trace of whole conversations: every user turn re-sends the chat so far, as chat
clients do, and arrives when its user has read the answer before it.

    python -m benchmarks.realchat_chats_trace --out /tmp/realchat_chats.jsonl [--requests 2000]
        [--conversations sharegpt_1k_part1.jsonl,sharegpt_1k_part2.jsonl,wildchat50m.jsonl]
        [--seed 0] [--max-prompt-tokens 3072] [--system-prompt FILE]

Conversations (``../shared/data/conversations``, or paths) are taken in a seeded shuffled
order until the turns reach ``--requests``; a chat answered by two models (WildChat) counts
once, one of its versions drawn. Each chat's first turn keeps an arrival of the Azure LLM
inference trace 2023 (conversation; CC-BY-4.0), in order; each later turn ``follows`` the one
before and arrives a think time after that answer ends (``gap_s``): log-normal with the median
and 90th percentile of the gaps between a conversation's turns in Mooncake's conversation
trace (105 s and 375 s, docs/SCHED_RESULTS.md; Apache-2.0). A turn's prompt is the chat so far
rendered with the default model's chat template, as the OpenAI gateway renders it, keeping the
newest exchanges that fit ``--max-prompt-tokens`` (a chat whose next question alone does not
fit ends there); it carries its exact token count, its 64-token prefix blocks (so the
simulator's caches see a chat's history come back) and the gateway's hint for the length
predictor (the latest user message and the earlier answers' lengths). Answer lengths are the
real answers' in the default model's tokens. ShareGPT is measurement only, so the trace is
built from the shared data and never vendored. The simulator replays it (``follows`` rows do
not replay live).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.model import ensure_default_model
from benchmarks.multiturn_data import Conversation, load_conversations
from benchmarks.realchat_trace import AZURE_CONV
from orchestrator.core.prefix import PREFIX_BLOCK_TOKENS, block_hashes
from orchestrator.llamalib import tokenize
from orchestrator.openai_requests import render_chat
from orchestrator.tokens import GgufTokenCounter

SHARED = Path(os.environ.get("EDGEORCH_SHARED_DATA", "../shared/data"))
DEFAULT_CONVERSATIONS: Final = (
    "sharegpt_1k_part1.jsonl",
    "sharegpt_1k_part2.jsonl",
    "wildchat50m.jsonl",
)
THINK_MEDIAN_S: Final = 105.0
THINK_P90_S: Final = 375.0
Z_90: Final = 1.2815515655446004
DEFAULT_MAX_PROMPT_TOKENS: Final = 3072
"""Room for 1,024 answer tokens in the edge clusters' 4,096-token contexts."""
SAME_CHAT_CHARS: Final = 200
"""Two conversations whose first user messages agree this far are one chat, answered twice."""


class ChatTokenizer(Protocol):
    def prompt(self, messages: list[tuple[str, str]]) -> tuple[str, list[int]]:
        """The rendered chat and its token ids."""
        ...

    def answer_tokens(self, text: str) -> int: ...


@dataclass(frozen=True)
class Tokenizer:
    """The default model's tokenizer and chat template, as the gateway and coordinator use them."""

    counter: GgufTokenCounter

    def prompt(self, messages: list[tuple[str, str]]) -> tuple[str, list[int]]:
        text = render_chat(messages, self.counter.chat_template)[0]
        ids = self.counter.token_ids(text, self.counter.model_name, chat=True)
        assert ids is not None
        return text, ids

    def answer_tokens(self, text: str) -> int:
        return len(tokenize(self.counter._vocab, text, add_bos=False, special=False))


def distinct_chats(files: list[Path], seed: int) -> list[Conversation]:
    """Every conversation once (one version of a chat answered by two models), shuffled."""
    rng = random.Random(seed)
    versions: dict[str, list[Conversation]] = {}
    for path in files:
        for chat in load_conversations(path):
            versions.setdefault(chat.user_messages[0][:SAME_CHAT_CHARS], []).append(chat)
    chats = [rng.choice(sorted(found, key=lambda c: c.id)) for _, found in sorted(versions.items())]
    rng.shuffle(chats)
    return chats


def chat_rows(
    chat: Conversation, tokenizer: ChatTokenizer, max_prompt_tokens: int, system: str = ""
) -> list[dict[str, Any]]:
    """One row per user turn that fits (no arrival yet), each with the fields above; a
    ``system`` prompt, if given, opens every chat (and every chat's prompt shares its blocks)."""
    answers = [tokenizer.answer_tokens(a) for a in chat.assistant_messages]
    rows = []
    kept = 0
    for turn, question in enumerate(chat.user_messages[: len(answers)]):
        while True:
            messages = [("system", system)] if system else []
            for user, answer in zip(
                chat.user_messages[kept:turn], chat.assistant_messages[kept:turn], strict=True
            ):
                messages += [("user", user), ("assistant", answer)]
            text, ids = tokenizer.prompt([*messages, ("user", question)])
            if len(ids) <= max_prompt_tokens or kept == turn:
                break
            kept += 1
        if len(ids) > max_prompt_tokens:
            break
        rows.append(
            {
                "prompt": text,
                "output_tokens": max(1, answers[turn]),
                "prompt_tokens": len(ids),
                "prefix_blocks": list(block_hashes(ids).hashes),
                "block_tokens": PREFIX_BLOCK_TOKENS,
                "conversation": {
                    "last_user": question,
                    "earlier_answer_tokens": answers[kept:turn],
                },
                "source": f"{chat.id.split(':')[0]}+azure_conv",
            }
        )
    return rows


def think_s(rng: random.Random) -> float:
    sigma = math.log(THINK_P90_S / THINK_MEDIAN_S) / Z_90
    return THINK_MEDIAN_S * math.exp(rng.gauss(0.0, sigma))


def build(args: argparse.Namespace) -> None:
    files = [
        Path(n) if Path(n).is_file() else SHARED / "conversations" / n
        for n in args.conversations.split(",")
    ]
    tokenizer = Tokenizer(GgufTokenCounter(ensure_default_model(os.environ)))
    rng = random.Random(args.seed)
    system = args.system_prompt.read_text(encoding="utf-8").strip() if args.system_prompt else ""
    with (SHARED / AZURE_CONV).open() as f:
        stamps = [row[0] for row in list(csv.reader(f))[1:]]
    start = datetime.fromisoformat(stamps[0][:26])
    out: list[dict[str, Any]] = []
    chats = 0
    for chat in distinct_chats(files, args.seed):
        if len(out) >= args.requests:
            break
        rows = chat_rows(chat, tokenizer, args.max_prompt_tokens, system)
        if not rows:
            continue
        arrival = (datetime.fromisoformat(stamps[chats][:26]) - start).total_seconds()
        chats += 1
        for turn, row in enumerate(rows):
            if turn == 0:
                out.append({"arrival_s": round(arrival, 4), **row})
            else:
                out.append({"follows": len(out) - 1, "gap_s": round(think_s(rng), 2), **row})
    with args.out.open("w", encoding="utf-8") as f:
        for row in out:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    answers = [r["output_tokens"] for r in out]
    prompts = [r["prompt_tokens"] for r in out]
    print(
        f"wrote {len(out)} turns of {chats} chats to {args.out}: prompt tokens median "
        f"{statistics.median(prompts):.0f}, p90 {statistics.quantiles(prompts, n=10)[-1]:.0f}; "
        f"answer tokens median {statistics.median(answers):.0f}, "
        f"p90 {statistics.quantiles(answers, n=10)[-1]:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000, help="turns, at least")
    parser.add_argument("--seed", type=int, default=0, help="chat order and think times")
    parser.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    parser.add_argument(
        "--system-prompt",
        type=Path,
        help="a text file: its text opens every chat as a system message, as a chat service "
        "configures one (all prompts then share its prefix blocks)",
    )
    parser.add_argument(
        "--conversations",
        default=",".join(DEFAULT_CONVERSATIONS),
        help="comma-separated conversation files: names in the shared conversations/ folder, "
        "or paths",
    )
    build(parser.parse_args())


if __name__ == "__main__":
    main()
