"""Whole conversations as a simulator trace: the rows' predictor hint, the simulator's real
predictor reading it as the coordinator does, and the builder of such traces."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from benchmarks.multiturn_data import Conversation
from benchmarks.realchat_chats_trace import chat_rows, distinct_chats
from orchestrator.errors import InvalidRequest
from orchestrator.protocol import ConversationHint
from orchestrator.traces import load_trace
from tests.factories import jsonl


def test_a_turn_carries_the_hint_the_gateway_would_send(tmp_path: Path) -> None:
    rows = [
        {"arrival_s": 0, "prompt": "User: hi\nAssistant:", "output_tokens": 5},
        {
            "follows": 0,
            "gap_s": 3,
            "prompt": "User: hi\nAssistant: hello\nUser: more?\nAssistant:",
            "output_tokens": 9,
            "conversation": {"last_user": "more?", "earlier_answer_tokens": [5]},
        },
    ]
    first, second = load_trace(jsonl(tmp_path / "t.jsonl", rows))
    assert first.conversation is None
    assert second.conversation == ConversationHint(last_user="more?", earlier_answer_tokens=(5,))


@pytest.mark.parametrize(
    "hint",
    [
        {"earlier_answer_tokens": [5]},  # no question
        {"last_user": "", "earlier_answer_tokens": []},
        {"last_user": "q", "earlier_answer_tokens": [-1]},
        {"last_user": "q", "earlier_answer_tokens": [1.5]},
        {"last_user": "q", "answers": [1]},  # a field the hint does not have
        "q",
    ],
)
def test_a_malformed_hint_is_refused_with_its_line(tmp_path: Path, hint: object) -> None:
    rows = [
        {"arrival_s": 0, "prompt": "a", "output_tokens": 1},
        {"arrival_s": 1, "prompt": "b", "output_tokens": 1, "conversation": hint},
    ]
    with pytest.raises(InvalidRequest, match="line 2"):
        load_trace(jsonl(tmp_path / "t.jsonl", rows))


def test_the_simulated_predictor_reads_a_chat_as_the_coordinator_does() -> None:
    """The latest question instead of the rendered chat, moved towards the earlier answers."""
    from orchestrator.lengths import RealEstimates
    from orchestrator.predictor.model import LengthPredictor

    question = "Write a detailed essay on the history of the printing press."
    rendered = f"User: Hi there.\nAssistant: Hello!\nUser: {question}\nAssistant:"

    def hint(*answers: int) -> ConversationHint:
        return ConversationHint(last_user=question, earlier_answer_tokens=answers)

    ids = ["r0", "r1", "r2", "r3"]
    real = RealEstimates(
        [rendered] * 4,
        ids,
        scale=1.0,
        adapt_every=0,
        conversations=[None, hint(), hint(5), hint(2000)],
    )
    plain, alone, short, long = (real.on_arrival(i).quantile(0.5) for i in ids)
    direct = LengthPredictor.load().predict(question).quantile(0.5)
    assert alone == pytest.approx(direct, rel=1e-6)
    assert plain != pytest.approx(alone)
    assert short < alone < long


class WordTokenizer:
    """One token a word, the chat rendered as 'role: text' lines."""

    def prompt(self, messages: list[tuple[str, str]]) -> tuple[str, list[int]]:
        text = "\n".join(f"{role}: {content}" for role, content in messages)
        return text, [hash(word) % 1000 for word in text.split()]

    def answer_tokens(self, text: str) -> int:
        return len(text.split())


def chat(*exchanges: tuple[str, str]) -> Conversation:
    return Conversation("sharegpt:abc_0", *map(tuple, zip(*exchanges, strict=True)))


def test_each_turn_resends_the_chat_so_far_with_its_hint() -> None:
    words = " ".join(["w"] * 70)
    rows = chat_rows(
        chat((words, "a " * 40), ("next " + words, "b " * 7), ("last", "c")),
        WordTokenizer(),
        10_000,
    )
    assert [r["output_tokens"] for r in rows] == [40, 7, 1]
    assert [r["conversation"]["earlier_answer_tokens"] for r in rows] == [[], [40], [40, 7]]
    assert rows[2]["conversation"]["last_user"] == "last"
    for before, after in itertools.pairwise(rows):
        assert after["prompt"].startswith(before["prompt"])
        assert after["prefix_blocks"][: len(before["prefix_blocks"])] == before["prefix_blocks"]
    assert rows[0]["prompt_tokens"] == 71 and len(rows[0]["prefix_blocks"]) == 1


def test_a_system_prompt_opens_every_chat_and_its_blocks_are_shared() -> None:
    """Two different chats under one 70-word system prompt share its first 64-token block, and
    dropping old exchanges to fit keeps it."""
    system = " ".join(["rule"] * 70)
    first, second = (
        chat_rows(chat((q, "a " * 30), ("more", "b")), WordTokenizer(), 100, system)
        for q in ("why is the sky blue", "write a poem")
    )
    assert all(r["prompt"].startswith("system: rule") for r in first + second)
    assert first[0]["prefix_blocks"][0] == second[0]["prefix_blocks"][0]
    assert first[1]["conversation"]["earlier_answer_tokens"] == []  # the first exchange dropped
    assert first[1]["prefix_blocks"][0] == first[0]["prefix_blocks"][0]


def test_a_long_chat_drops_its_oldest_exchanges_and_ends_at_a_question_too_long() -> None:
    rows = chat_rows(
        chat(("one two", "x " * 30), ("three", "y " * 30), ("four", "z"), ("w " * 99, "end")),
        WordTokenizer(),
        40,
    )
    assert len(rows) == 3  # the fourth question alone is over 40 tokens
    assert rows[2]["conversation"]["earlier_answer_tokens"] == [30]  # the first exchange dropped
    assert "one two" not in rows[2]["prompt"] and rows[2]["prompt_tokens"] <= 40


def test_a_chat_answered_by_two_models_counts_once(tmp_path: Path) -> None:
    def line(cid: str, first: str) -> str:
        turns = [{"role": "user", "content": first}, {"role": "assistant", "content": "a"}]
        return json.dumps({"id": cid, "source": "s", "turns": turns * 2}) + "\n"

    path = tmp_path / "c.jsonl"
    path.write_text(line("w:1-llama", "same") + line("w:1-qwen", "same") + line("w:2", "other"))
    chats = distinct_chats([path], seed=0)
    assert len(chats) == 2 and {c.user_messages[0] for c in chats} == {"same", "other"}
