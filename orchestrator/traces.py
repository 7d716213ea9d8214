"""Replay traces: reading them, and scaling their lengths and arrivals to a load. Shared by the
simulator bench and the live one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from orchestrator.core.prefix import PromptBlocks
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import ConversationHint
from orchestrator.textio import read_lines


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request. A simulator-only row may give its prompt as a length and prefix blocks
    (``prompt_tokens``, ``prefix_blocks`` hashes of ``block_tokens`` each, as Mooncake's traces
    do) instead of text."""

    arrival_s: float
    prompt: str
    output_tokens: int
    prompt_tokens: int | None = None
    prefix: PromptBlocks | None = None
    follows: int | None = None
    """Simulator only: the index (in the loaded list) of the request whose end this one waits
    for, as an agent's next call waits for its tool's result; it then arrives ``gap_s`` after
    that request ends, and its ``arrival_s`` is only its place in the list."""
    gap_s: float = 0.0
    conversation: ConversationHint | None = None
    """For a turn of a chat: what the length predictor reads instead of the rendered prompt,
    as the OpenAI gateway fills it from ``messages`` (the trace's
    ``{"last_user": str, "earlier_answer_tokens": [int, ...]}``)."""


def _row(raw: dict[str, Any], index: int, rows: Sequence[TraceRow]) -> TraceRow:
    prompt_tokens = raw.get("prompt_tokens")
    hashes = raw.get("prefix_blocks")
    prefix = None
    if hashes is not None:
        if not isinstance(hashes, list) or not all(isinstance(h, int) for h in hashes):
            raise ValueError("prefix_blocks must be a list of integers")
        block_tokens = int(raw["block_tokens"])
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be positive, got {block_tokens}")
        prefix = PromptBlocks(tuple(hashes), block_tokens)
    follows = raw.get("follows")
    gap_s = 0.0
    if follows is not None:
        if not isinstance(follows, int) or not 0 <= follows < index:
            raise ValueError(f"follows must be the index of an earlier row, got {follows!r}")
        gap_s = float(raw["gap_s"])
        if not gap_s >= 0:
            raise ValueError(f"gap_s must be a non-negative number of seconds, got {gap_s}")
    return TraceRow(
        float(raw["arrival_s"]) if follows is None else rows[follows].arrival_s,
        str(raw["prompt"]),
        int(raw["output_tokens"]),
        None if prompt_tokens is None else int(prompt_tokens),
        prefix,
        follows,
        gap_s,
        _conversation(raw.get("conversation")),
    )


def _conversation(raw: Any) -> ConversationHint | None:
    if raw is None:
        return None
    answers = tuple(raw.get("earlier_answer_tokens", ()))
    return ConversationHint.model_validate({**raw, "earlier_answer_tokens": answers})


def load_trace(path: Path, max_requests: int | None = None) -> list[TraceRow]:
    try:
        lines = read_lines(path)
    except OSError as exc:
        raise InvalidRequest(f"cannot read trace {path}: {exc.strerror}", field="trace") from None
    rows: list[TraceRow] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(_row(json.loads(line), len(rows), rows))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest(
                f"trace {path} line {number}: needs arrival_s (or follows and gap_s), prompt, "
                f"output_tokens, and block_tokens with prefix_blocks; conversation, if "
                f"given, last_user and earlier_answer_tokens ({exc!r})",
                field="trace",
            ) from None
        if max_requests is not None and len(rows) >= max_requests:
            break
    if len(rows) < 2:
        raise InvalidRequest(f"trace {path} has {len(rows)} requests; need at least 2")
    return _by_arrival(rows)


def _by_arrival(rows: list[TraceRow]) -> list[TraceRow]:
    """``rows`` sorted by arrival, ``follows`` pointing at the same rows as before. A row that
    follows another takes its arrival and comes later in the file, so the sort (stable) keeps
    it after the row it follows."""
    order = sorted(range(len(rows)), key=lambda i: rows[i].arrival_s)
    moved_to = {old: new for new, old in enumerate(order)}
    moved = []
    for i in order:
        follows = rows[i].follows
        moved.append(rows[i] if follows is None else replace(rows[i], follows=moved_to[follows]))
    return moved


def output_lengths(
    rows: Sequence[TraceRow], length_scale: float, max_output_tokens: int | None
) -> list[int]:
    """Each answer's length times ``length_scale`` (at least 1), capped."""
    lengths = [max(1, round(r.output_tokens * length_scale)) for r in rows]
    if max_output_tokens is not None:
        lengths = [min(n, max_output_tokens) for n in lengths]
    return lengths


def arrival_scale(
    rows: Sequence[TraceRow],
    lengths: Sequence[int],
    capacity_tokens_s: float,
    load: float | None,
    rate: float | None,
    prefill: tuple[Sequence[int], float] | None = None,
) -> float:
    """The factor applied to arrival times (and so divided into inter-arrival gaps). With
    ``prefill`` (each prompt's tokens, the cluster's prompt tokens/s), the load counts the
    prompts' prefill time beside the decode, with nothing cached."""
    span = rows[-1].arrival_s - rows[0].arrival_s
    if span <= 0:
        raise InvalidRequest("trace arrivals span no time; cannot scale them")
    if load is not None:
        offered = sum(lengths) / span
        if prefill is not None:
            prompts, prefill_tokens_s = prefill
            offered += sum(prompts) / span * capacity_tokens_s / prefill_tokens_s
        return offered / (load * capacity_tokens_s)
    assert rate is not None
    return ((len(rows) - 1) / span) / rate


def request_budgets(
    prompt_tokens: Sequence[int], max_tokens: int, context_tokens: int
) -> list[int]:
    """Each request's ``max_tokens``: the shared cap, lowered where prompt + cap would not fit
    the largest context (the answer then stops where the context ends, as llama.cpp's server
    stops it) instead of being refused. It depends on the prompt's length alone, which the
    scheduler knows anyway; a prompt that fills the context keeps the cap and is refused."""
    return [
        min(max_tokens, context_tokens - prompt) if prompt < context_tokens else max_tokens
        for prompt in prompt_tokens
    ]
