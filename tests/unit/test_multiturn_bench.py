"""The pure parts of benchmarks/multiturn.py: choosing conversations, rendering a chat's prompt,
cutting text to a token count, rescaling arrivals, and the figures, medians and ratios."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from benchmarks.multiturn import (
    conversation_texts,
)
from benchmarks.multiturn_data import (
    Conversation,
    choose_conversations,
    cut_to_tokens,
    fits_context,
    load_azure_trace,
    parse_azure_timestamp,
    parse_conversation,
    render_prompt,
    rescale_arrivals,
    sse_events,
    text_from,
    truncate_message,
)
from benchmarks.multiturn_figures import (
    Outcome,
    config_medians,
    headline_ratios,
    multiturn_figures,
    prompt_heavy_figures,
    request_reuse,
    reused_fraction,
)
from benchmarks.multiturn_servers import (
    Completion,
    RoundRobinServers,
    parse_configs,
    parse_prompt_token_counters,
)


def words(text: str) -> int:
    return len(text.split())


def conversation(ident: str, users: int, first: str | None = None) -> Conversation:
    messages = tuple(first if i == 0 and first else f"{ident} question {i}" for i in range(users))
    return Conversation(ident, messages, tuple(f"{ident} answer {i}" for i in range(users)))


def outcome(group: int, turn: int, sent: float, first: float, end: float, **kw: int) -> Outcome:
    return Outcome(
        group=group,
        turn=turn,
        prompt_tokens=kw.get("prompt_tokens", 100),
        requested_tokens=kw.get("requested", 10),
        sent_s=sent,
        first_s=first,
        end_s=end,
        reported_tokens=kw.get("reported", 10),
    )


# --- conversations ---------------------------------------------------------------------------


def test_parse_conversation_splits_roles() -> None:
    record = {
        "id": "c1",
        "source": "oasst1_en",
        "turns": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"},
        ],
    }
    assert parse_conversation(json.loads(json.dumps(record))) == Conversation(
        "c1", ("Hi", "Bye"), ("Hello", "Goodbye")
    )


def test_choose_conversations_is_deterministic_and_filters_by_turns() -> None:
    pool = [conversation(f"c{i:02d}", 2 + i % 3) for i in range(30)]
    first = choose_conversations(pool, 5, 4, seed=7)
    assert first == choose_conversations(list(reversed(pool)), 5, 4, seed=7)
    assert len({c.id for c in first}) == 5
    assert all(len(c.user_messages) >= 4 for c in first)
    assert choose_conversations(pool, 5, 4, seed=8) != first


def test_choose_conversations_counts_a_chat_answered_twice_once() -> None:
    same = "a long first message " * 10
    pool = [conversation("a-llama", 4, same), conversation("a-qwen", 4, same + " (re-parsed)")]
    with pytest.raises(ValueError, match="only 1 distinct"):
        choose_conversations(pool, 2, 4, seed=0)
    assert [c.id for c in choose_conversations(pool, 1, 4, seed=0)] == ["a-llama"]


def test_choose_conversations_explains_when_too_few_have_the_turns() -> None:
    pool = [conversation(f"c{i}", 3) for i in range(10)]
    with pytest.raises(ValueError, match="the most any has is 3"):
        choose_conversations(pool, 2, 4, seed=0)


def test_truncate_message_cuts_at_a_space() -> None:
    assert truncate_message("short", 10) == "short"
    assert truncate_message("alpha beta gamma delta", 13) == "alpha beta"
    assert truncate_message("x" * 30, 10) == "x" * 10


# --- prompts ---------------------------------------------------------------------------------


def test_render_prompt_plain_chat_format() -> None:
    assert render_prompt(None, [], "Hi?") == "User: Hi?\n\nAssistant:"
    assert render_prompt(None, [("Hi?", " Hello.")], "More?") == (
        "User: Hi?\n\nAssistant: Hello.\n\nUser: More?\n\nAssistant:"
    )


def test_each_turn_extends_the_previous_prompt_and_answer() -> None:
    exchanges: list[tuple[str, str]] = []
    previous = ""
    for turn, answer in enumerate([" one\n\nUser: odd", " two", " three "]):
        prompt = render_prompt("DOC", exchanges, f"q{turn}")
        assert prompt.startswith(previous)
        previous = prompt + answer
        exchanges.append((f"q{turn}", answer))


def test_document_precedes_only_the_first_user_message() -> None:
    prompt = render_prompt("The document.", [("q0", " a0")], "q1")
    assert prompt.startswith("User: Read this text, then answer my question.\n\nThe document.")
    assert prompt.count("The document.") == 1
    assert prompt.index("The document.") < prompt.index("q0") < prompt.index("q1")


def test_fits_context_leaves_room_for_answer_and_margin() -> None:
    assert fits_context(1000, 48, 4096)
    assert not fits_context(4096 - 48, 48, 4096)


# --- text ------------------------------------------------------------------------------------


def test_text_from_starts_where_asked_and_wraps() -> None:
    texts = ["aaaa", "bbbb", "cccc"]
    assert text_from(texts, 1, 1) == "bbbb"
    assert text_from(texts, 2, 9) == "cccc\n\naaaa"
    assert text_from(texts, 0, 10_000) == "aaaa\n\nbbbb\n\ncccc"


def test_conversation_texts_assistant_only_or_all() -> None:
    pool = [conversation("b", 2), conversation("a", 1)]
    assert conversation_texts(pool, assistant_only=True) == [
        "a answer 0",
        "b answer 0\n\nb answer 1",
    ]
    assert conversation_texts(pool, assistant_only=False)[0] == "a question 0\n\na answer 0"


@pytest.mark.parametrize("tokens", [1, 2, 5, 17])
def test_cut_to_tokens_gives_exactly_that_many(tokens: int) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    cut = cut_to_tokens(text, tokens, words)
    assert words(cut) == tokens
    assert text.startswith(cut)


def test_cut_to_tokens_reaches_an_exact_count_past_a_dip() -> None:
    # Counts of prefixes that are not monotonic: a trailing "x" costs three tokens, so the
    # binary search stops at "ab" (2) and the scan goes on to "abxc" (4).
    def count(text: str) -> int:
        return len(text) + (2 if text.endswith("x") else 0)

    assert cut_to_tokens("abxcd", 4, count) == "abxc"


def test_cut_to_tokens_refuses_short_text() -> None:
    with pytest.raises(ValueError, match="fewer than 10"):
        cut_to_tokens("only three words", 10, words)


# --- arrivals --------------------------------------------------------------------------------


def test_parse_azure_timestamp_keeps_seven_fraction_digits() -> None:
    a = parse_azure_timestamp("2023-11-16 18:15:46.6805900")
    b = parse_azure_timestamp("2023-11-16 18:15:50.9951690")
    assert b - a == pytest.approx(4.314579, abs=1e-6)
    assert parse_azure_timestamp("2023-11-16 18:15:47") - a == pytest.approx(0.31941, abs=1e-6)


def test_rescale_arrivals_hits_the_mean_rate_and_keeps_the_shape() -> None:
    times = [100.0, 101.0, 101.5, 104.0, 110.0]
    arrivals = rescale_arrivals(times, 0.5)
    assert arrivals[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert statistics.mean(gaps) == pytest.approx(2.0)
    assert gaps[0] / gaps[1] == pytest.approx(2.0)


def test_rescale_arrivals_edge_cases() -> None:
    assert rescale_arrivals([], 1.0) == []
    assert rescale_arrivals([5.0], 1.0) == [0.0]
    assert rescale_arrivals([5.0, 5.0], 1.0) == [0.0, 0.0]
    with pytest.raises(ValueError):
        rescale_arrivals([1.0, 2.0], 0.0)


def test_load_azure_trace_reads_the_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
    )
    rows = load_azure_trace(path, 2)
    assert [(r.context_tokens, r.generated_tokens) for r in rows] == [(374, 44), (396, 109)]


# --- streams ---------------------------------------------------------------------------------


def test_sse_events_reads_data_lines_until_done() -> None:
    lines = [b'data: {"a": 1}\n', b"\n", b": comment\n", b'data:{"b": 2}\n', b"data: [DONE]\n"]
    lines.append(b'data: {"c": 3}\n')
    assert list(sse_events(lines)) == [{"a": 1}, {"b": 2}]


def test_parse_prompt_token_counters_sums_agents() -> None:
    page = "\n".join(
        [
            "# HELP edgeorch_agent_prompt_tokens_total Prompt tokens",
            'edgeorch_agent_prompt_tokens_total{agent="a",model="m",source="computed"} 120.0',
            'edgeorch_agent_prompt_tokens_total{agent="a",model="m",source="reused"} 30.0',
            'edgeorch_agent_prompt_tokens_total{agent="b",model="m",source="reused"} 10.0',
            'edgeorch_agent_prompt_tokens_created{agent="a",model="m",source="reused"} 1.7e9',
        ]
    )
    assert parse_prompt_token_counters(page) == (40, 120)
    assert parse_prompt_token_counters("edgeorch_requests_waiting 0.0") is None


def test_reuse_fractions() -> None:
    assert reused_fraction(25, 75) == 0.25
    assert reused_fraction(None, 10) is None
    assert reused_fraction(0, 0) is None
    with_reuse = Outcome(0, 0, 100, 10, 0.0, 0.1, 1.0, 10, reused_tokens=60, computed_tokens=40)
    assert request_reuse([with_reuse, with_reuse]) == (120, 80)
    assert request_reuse([with_reuse, outcome(0, 1, 0.0, 0.1, 1.0)]) == (None, None)


# --- figures ---------------------------------------------------------------------------------


def test_multiturn_figures_split_first_and_later_turns() -> None:
    outcomes = [
        outcome(0, 0, sent=0.0, first=1.0, end=2.0),
        outcome(0, 1, sent=3.0, first=3.2, end=4.0),
        outcome(1, 0, sent=2.0, first=2.6, end=3.0),
        outcome(1, 1, sent=4.0, first=4.4, end=6.0),
        outcome(1, 2, sent=7.0, first=7.3, end=8.0, reported=9),
    ]
    figures = multiturn_figures(outcomes, stopped_early=1, reused_prompt_fraction=0.5)
    assert figures["turns"] == 5
    assert figures["failures"] == 1
    assert figures["unchecked_lengths"] == 0
    assert figures["stopped_early"] == 1
    assert figures["mean_ttft_first_turn_s"] == pytest.approx(0.8)
    assert figures["mean_ttft_later_turns_s"] == pytest.approx(0.3)
    assert figures["mean_turn_s"] == pytest.approx((2.0 + 1.0 + 1.0 + 2.0) / 4)
    assert figures["wall_s"] == pytest.approx(8.0)
    assert figures["output_tokens_per_s"] == pytest.approx(40 / 8.0)
    assert figures["ttft_by_turn_s"] == pytest.approx([0.8, 0.3])
    assert figures["reused_prompt_fraction"] == 0.5


def test_a_failed_request_is_not_timed() -> None:
    failed = Outcome(0, 0, 100, 10, 0.0, None, 5.0, error="HTTP 503: busy")
    figures = multiturn_figures([failed], stopped_early=0, reused_prompt_fraction=None)
    assert figures["failures"] == 1
    assert figures["mean_turn_s"] is None
    assert figures["ttft_by_turn_s"] == []


def test_prompt_heavy_figures() -> None:
    outcomes = [
        outcome(0, 0, sent=0.0, first=0.5, end=2.0, prompt_tokens=300, requested=20, reported=20),
        outcome(1, 0, sent=1.0, first=2.0, end=4.0, prompt_tokens=100, requested=20, reported=20),
    ]
    unreported = Outcome(2, 0, 50, 20, 5.0, 5.5, 6.0)
    figures = prompt_heavy_figures(outcomes, reused_prompt_fraction=None)
    assert prompt_heavy_figures([unreported], None)["unchecked_lengths"] == 1
    assert figures["failures"] == 0
    assert figures["mean_ttft_s"] == pytest.approx(0.75)
    assert figures["p50_ttft_s"] == pytest.approx(0.75)
    assert figures["mean_jct_s"] == pytest.approx(2.5)
    assert figures["wall_s"] == pytest.approx(4.0)
    assert figures["output_tokens_per_s"] == pytest.approx(10.0)
    assert figures["total_tokens_per_s"] == pytest.approx(110.0)


def test_medians_and_ratios() -> None:
    runs: dict[str, list[dict[str, Any]]] = {
        "edgeorch-cache": [
            {"mean_turn_s": 1.0, "mean_ttft_later_turns_s": 0.2, "ttft_by_turn_s": [0.5, 0.2]},
            {"mean_turn_s": 3.0, "mean_ttft_later_turns_s": None, "ttft_by_turn_s": [0.7]},
            {"mean_turn_s": 2.0, "mean_ttft_later_turns_s": 0.4, "ttft_by_turn_s": [0.6, 0.3]},
        ],
        "edgeorch-nocache": [{"mean_turn_s": 4.0, "mean_ttft_later_turns_s": 0.6}],
        "llama-server-cache": [{"mean_turn_s": 2.5, "mean_ttft_later_turns_s": 0.3}],
    }
    medians = config_medians(runs)
    assert config_medians({"a": [{"turns": 4}, {"turns": 5}, {"turns": 4}]}) == {"a": {"turns": 4}}
    assert config_medians({"a": [{"turns": 4}, {"turns": 5}]}) == {"a": {"turns": 4.5}}
    assert medians["edgeorch-cache"] == {
        "mean_turn_s": 2.0,
        "mean_ttft_later_turns_s": pytest.approx(0.3),
        "ttft_by_turn_s": [0.6, pytest.approx(0.25)],
    }
    ratios = headline_ratios(medians, "conversations")
    assert ratios["edgeorch_vs_llama_server_mean_turn"] == 0.8
    assert ratios["edgeorch_vs_llama_server_ttft_later_turns"] == 1.0
    assert ratios["edgeorch_cache_vs_nocache_mean_turn"] == 0.5
    assert ratios["llama_server_cache_vs_nocache_mean_turn"] is None


def test_prompt_heavy_ratios() -> None:
    medians = {
        "edgeorch-cache": {"output_tokens_per_s": 90.0, "mean_ttft_s": 1.0, "mean_jct_s": 3.0},
        "llama-server-cache": {"output_tokens_per_s": 100.0, "mean_ttft_s": 2.0, "mean_jct_s": 3.0},
    }
    assert headline_ratios(medians, "prompt-heavy") == {
        "edgeorch_vs_llama_server_throughput": 0.9,
        "edgeorch_vs_llama_server_mean_ttft": 0.5,
        "edgeorch_vs_llama_server_mean_jct": 1.0,
    }


def test_parse_configs() -> None:
    configs = parse_configs("edgeorch-nocache,llama-server-cache,edgeorch-nocache")
    assert [(c.name, c.server, c.cache_prompt) for c in configs] == [
        ("edgeorch-nocache", "edgeorch", False),
        ("llama-server-cache", "llama-server", True),
    ]
    with pytest.raises(ValueError, match="unknown"):
        parse_configs("vllm")


class Recorder:
    def __init__(self, name: str, log: list[tuple[str, str]]) -> None:
        self.name, self.log, self.stopped = name, log, False

    def complete(self, prompt: str, max_tokens: int, cache_prompt: bool) -> Completion:
        self.log.append((self.name, prompt))
        return Completion(0.0, 0.0, 0.0, "")

    def prompt_cache_tokens(self) -> tuple[int, int] | None:
        return None

    def stop(self) -> None:
        self.stopped = True


def test_round_robin_sends_each_request_to_the_next_server_and_stops_them_all() -> None:
    log: list[tuple[str, str]] = []
    servers = [Recorder("a", log), Recorder("b", log)]
    balancer = RoundRobinServers(servers)
    for prompt in ("1", "2", "3"):
        balancer.complete(prompt, 4, True)
    assert log == [("a", "1"), ("b", "2"), ("a", "3")]
    balancer.stop()
    assert all(server.stopped for server in servers)
