"""Inputs of benchmarks/multiturn.py: conversations, real text cut to exact token counts, the
Azure trace's arrivals and sizes, and the SSE stream parser."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

Workload = Literal["conversations", "document", "prompt-heavy"]

WORKLOADS: Final[tuple[Workload, ...]] = ("conversations", "document", "prompt-heavy")


CONTEXT_MARGIN_TOKENS: Final = 16
"""Room left in a sequence's context beyond the prompt and the answer."""

EXACT_CUT_SCAN_CHARS: Final = 64
"""After the binary search, characters tried one by one to reach the exact token count."""

SAME_CHAT_PREFIX_CHARS: Final = 100
"""Conversations whose first user messages share this many leading characters are one chat."""

DOCUMENT_INTRO: Final = "Read this text, then answer my question."


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    user_messages: tuple[str, ...]
    assistant_messages: tuple[str, ...]


def parse_conversation(record: Mapping[str, Any]) -> Conversation:
    turns = record["turns"]
    return Conversation(
        id=str(record["id"]),
        user_messages=tuple(str(t["content"]) for t in turns if t["role"] == "user"),
        assistant_messages=tuple(str(t["content"]) for t in turns if t["role"] == "assistant"),
    )


def load_conversations(path: Path) -> list[Conversation]:
    with path.open(encoding="utf-8") as lines:
        return [parse_conversation(json.loads(line)) for line in lines if line.strip()]


def choose_conversations(
    conversations: Sequence[Conversation], count: int, min_user_turns: int, seed: int
) -> list[Conversation]:
    """``count`` conversations with at least ``min_user_turns`` user turns, drawn with ``seed``
    from those sorted by id; conversations whose first user message starts as an earlier one's
    (one chat answered by two models, as in wildchat50m.jsonl) count once."""
    eligible: dict[str, Conversation] = {}
    for conversation in sorted(conversations, key=lambda c: c.id):
        if len(conversation.user_messages) >= min_user_turns:
            key = conversation.user_messages[0][:SAME_CHAT_PREFIX_CHARS]
            eligible.setdefault(key, conversation)
    if len(eligible) < count:
        most = max((len(c.user_messages) for c in conversations), default=0)
        raise ValueError(
            f"only {len(eligible)} distinct conversations have {min_user_turns} user turns "
            f"(the most any has is {most}); ask for fewer conversations or turns"
        )
    return random.Random(seed).sample(list(eligible.values()), count)


def truncate_message(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a space when there is one in the
    second half."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def render_prompt(
    document: str | None, exchanges: Sequence[tuple[str, str]], next_user: str
) -> str:
    """A base model's plain-text chat: each exchange as ``User: {question}\\n\\nAssistant:{answer}``
    (the answer verbatim, as streamed, so a turn's prompt extends the previous prompt and its
    answer token for token), then ``User: {next_user}\\n\\nAssistant:``. A document goes
    inside the first user message, before it."""
    users = [user for user, _ in exchanges] + [next_user]
    if document is not None:
        users[0] = f"{DOCUMENT_INTRO}\n\n{document}\n\n{users[0]}"
    history = "".join(
        f"User: {user}\n\nAssistant:{answer}\n\n"
        for user, (_, answer) in zip(users, exchanges, strict=False)
    )
    return f"{history}User: {users[-1]}\n\nAssistant:"


def fits_context(prompt_tokens: int, answer_tokens: int, n_ctx: int) -> bool:
    return prompt_tokens + answer_tokens + CONTEXT_MARGIN_TOKENS <= n_ctx


def text_from(texts: Sequence[str], start: int, min_chars: int) -> str:
    """Texts joined by blank lines from ``texts[start]`` on (wrapping around) until the result
    has at least ``min_chars`` characters or every text is used."""
    if not texts:
        raise ValueError("no text to draw from")
    parts: list[str] = []
    length = 0
    for offset in range(len(texts)):
        text = texts[(start + offset) % len(texts)]
        parts.append(text)
        length += len(text) + 2
        if length >= min_chars:
            break
    return "\n\n".join(parts)


def cut_to_tokens(text: str, tokens: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` that ``count`` gives at most ``tokens`` tokens, extended
    character by character to exactly ``tokens`` where that is reachable (a tokenizer's counts
    of prefixes are not strictly monotonic). Raises ValueError when the whole text is shorter."""
    if count(text) < tokens:
        raise ValueError(f"the text has fewer than {tokens} tokens")
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if count(text[:middle]) <= tokens:
            low = middle
        else:
            high = middle - 1
    if count(text[:low]) < tokens:
        for end in range(low + 1, min(len(text), low + EXACT_CUT_SCAN_CHARS) + 1):
            if count(text[:end]) == tokens:
                return text[:end]
    return text[:low]


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp_s: float
    context_tokens: int
    generated_tokens: int


def parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch of ``2023-11-16 18:15:46.6805900`` (7 fractional digits, UTC)."""
    whole, _, fraction = text.strip().partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return moment.timestamp() + (float(f"0.{fraction}") if fraction else 0.0)


def load_azure_trace(path: Path, max_rows: int) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            if len(rows) >= max_rows:
                break
            rows.append(
                TraceRow(
                    parse_azure_timestamp(record["TIMESTAMP"]),
                    int(record["ContextTokens"]),
                    int(record["GeneratedTokens"]),
                )
            )
    return rows


def rescale_arrivals(timestamps: Sequence[float], rate_per_s: float) -> list[float]:
    """Offsets from the first timestamp, scaled so that the mean inter-arrival time is
    ``1 / rate_per_s`` (the trace's burstiness kept)."""
    if rate_per_s <= 0:
        raise ValueError(f"rate must be positive, got {rate_per_s}")
    if len(timestamps) < 2:
        return [0.0] * len(timestamps)
    first, span = timestamps[0], timestamps[-1] - timestamps[0]
    if span <= 0:
        return [0.0] * len(timestamps)
    factor = (len(timestamps) - 1) / rate_per_s / span
    return [(t - first) * factor for t in timestamps]


def sse_events(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects of server-sent ``data:`` lines, until ``data: [DONE]``."""
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        event = json.loads(payload)
        if isinstance(event, dict):
            yield event
