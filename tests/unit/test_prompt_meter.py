"""Long prompts are tokenized off the event loop, beside their prediction; a tokenizer that
fails answers the client with a typed error instead of losing the request."""

from __future__ import annotations

import asyncio
import threading

from orchestrator.coordinator import Coordinator
from orchestrator.core.lifecycle import RequestState
from orchestrator.protocol import (
    Accepted,
    ConversationHint,
    ErrorReply,
    RequestId,
    Submit,
    WireModel,
)
from orchestrator.settings import CoordinatorSettings
from orchestrator.tokens import OFF_LOOP_PROMPT_CHARS
from tests.factories import params

SETTLE_S = 5.0


class ThreadNotingCounter:
    """Counts a token a word, noting the thread each prompt was counted on."""

    def __init__(self, fail: bool = False) -> None:
        self.threads: dict[int, str] = {}
        self.chats: dict[str, bool] = {}
        self.fail = fail

    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        ids = self.token_ids(text, model)
        assert ids is not None
        return len(ids), True

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        if self.fail:
            raise RuntimeError("tokenizer broke")
        self.threads[len(text)] = threading.current_thread().name
        self.chats[text] = chat
        return list(range(1 + len(text.split())))


async def submit_all(
    c: Coordinator, prompts: dict[str, str], chat: ConversationHint | None = None
) -> list[WireModel]:
    replies: list[WireModel] = []
    client = c.connect_local(replies.append)
    for request_id, prompt in prompts.items():
        submit = Submit(request_id=request_id, prompt=prompt, params=params(), conversation=chat)
        c.send_local(client, submit)
    deadline = asyncio.get_running_loop().time() + SETTLE_S
    while len(replies) < len(prompts) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return replies


def test_a_long_prompt_is_counted_on_the_tokenizer_thread_and_a_short_one_at_once() -> None:
    counter = ThreadNotingCounter()
    c = Coordinator(CoordinatorSettings(), token_counter=counter)
    short, long = "a few words", "word " * (OFF_LOOP_PROMPT_CHARS // 5 + 1)

    async def scenario() -> list[WireModel]:
        c.start()
        return await submit_all(c, {"short": short, "long": long})

    replies = asyncio.run(scenario())
    assert counter.threads[len(short)] == threading.main_thread().name
    assert counter.threads[len(long)].startswith("tokenizer")
    assert sorted(r.request_id for r in replies if isinstance(r, Accepted)) == ["long", "short"]
    assert c.table[RequestId("long")].prompt_tokens == 1 + len(long.split())
    assert c.table[RequestId("long")].state is RequestState.QUEUED


def test_a_tokenizer_that_fails_on_a_long_prompt_answers_an_internal_error() -> None:
    c = Coordinator(CoordinatorSettings(), token_counter=ThreadNotingCounter(fail=True))

    async def scenario() -> list[WireModel]:
        c.start()
        return await submit_all(c, {"long": "word " * (OFF_LOOP_PROMPT_CHARS // 5 + 1)})

    (reply,) = asyncio.run(scenario())
    assert isinstance(reply, ErrorReply) and reply.request_id == "long"
    assert reply.error.code == "internal" and "tokenizer broke" in reply.error.message
    assert c.table.get(RequestId("long")) is None and c.waiting() == 0


def test_a_chat_is_measured_as_one_whose_next_turn_will_re_send_it() -> None:
    counter = ThreadNotingCounter()
    c = Coordinator(CoordinatorSettings(), token_counter=counter)
    hint = ConversationHint(last_user="and now?", earlier_answer_tokens=(12,))
    long = "word " * (OFF_LOOP_PROMPT_CHARS // 5 + 1)

    async def scenario() -> None:
        c.start()
        await submit_all(c, {"chat": "User: hi\nAssistant: hello\nUser: and now?"}, hint)
        await submit_all(c, {"long chat": long + "chat"}, hint)
        await submit_all(c, {"plain": "a completion"})

    asyncio.run(scenario())
    assert counter.chats == {
        "User: hi\nAssistant: hello\nUser: and now?": True,
        long + "chat": True,
        "a completion": False,
    }
