"""Prompts tokenized from kept prefixes equal whole-prompt tokenization with the real default
vocabulary (Gemma 3: a newline is a special token there, and so are runs of them), on chats
growing turn by turn and on texts built from the fragments most likely to break a cut."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.llamalib import llama_cpp, silenced, special_tokens, tokenize
from orchestrator.openai_requests import render_chat
from orchestrator.prompt_pieces import PrefixTokenizer, cuts_for
from orchestrator.tokens import GgufTokenCounter, without_doubled_bos

pytestmark = pytest.mark.e2e

FRAGMENTS = (
    "\n",
    "\n\n",
    "\n\n\n",
    "\r\n",
    "\t",
    " ",
    "   ",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_tur",
    "end_of_turn>",
    "<bos>",
    "<eos>",
    "<mask>",
    "<unused3>",
    "[multimodal]",
    "user",
    "model",
    "naïve café",
    "東京",
    "🙂",
    "```python\n",
    "def f(x):\n    return x\n",
    "<",
    ">",
)
"""Pieces of text around the places a prompt is cut: newline runs (special tokens of their
own), control tokens whole and broken, other special tokens, scripts, code."""
TEMPLATE_CUTS = ("<start_of_turn>", "<end_of_turn>", "\n")


@pytest.fixture(scope="module")
def counter(model_path: Path) -> GgufTokenCounter:
    return GgufTokenCounter(model_path)


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Any]:
    """The vocabulary loaded apart from the counter's, for the whole-prompt reference (held
    while its model lives, here)."""
    with silenced():
        model = llama_cpp().Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    yield llama_cpp().llama_model_get_vocab(model.model)


def whole(vocab: Any, text: str) -> list[int]:
    return tokenize(vocab, text, add_bos=False, special=True)


def random_texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(FRAGMENTS, k=rng.randint(1, 40))) for _ in range(count)]


def test_chats_in_the_plain_format_reuse_their_history_exactly(
    counter: GgufTokenCounter, vocab: Any
) -> None:
    """The default model has no chat template: chats are rendered as plain lines, cut at the
    newlines (``GgufTokenCounter`` does this for ``chat`` prompts)."""
    assert counter.chat_template is None
    rng = random.Random(7)
    turns = random_texts(1, 60)
    for chat in range(6):
        messages: list[tuple[str, str]] = []
        for turn in rng.sample(turns, 10):
            messages.append(("user", turn))
            prompt, _ = render_chat(messages, None)
            expected = without_doubled_bos(
                tokenize(vocab, prompt, add_bos=True, special=True),
                llama_cpp().llama_vocab_bos(vocab),
            )
            assert counter.token_ids(prompt, counter.model_name, chat=True) == expected, chat
            messages.append(("assistant", rng.choice(turns)))
    assert counter.reused_prefix_chars > 0


def test_template_style_chats_and_broken_texts_tokenize_as_whole_prompts(vocab: Any) -> None:
    specials = special_tokens(vocab)
    cuts = cuts_for([s for s in specials if s.text in TEMPLATE_CUTS], specials)
    assert set(cuts) == set(TEMPLATE_CUTS)
    pieces = PrefixTokenizer(lambda text: whole(vocab, text), cuts)
    history = ""
    for turn in random_texts(2, 150):
        history += f"<start_of_turn>user\n{turn}<end_of_turn>\n<start_of_turn>model\n"
        assert pieces(history, keep=True) == whole(vocab, history)
        history += f"{turn[::-1]}<end_of_turn>\n"
    assert pieces.reused_chars > 0
    for text in random_texts(3, 400):
        for keep in (True, False):
            assert pieces(text, keep=keep) == whole(vocab, text), repr(text)


def test_counts_kept_by_text_and_a_chat_prompt_counted_by_the_gateway_are_exact(
    counter: GgufTokenCounter, vocab: Any
) -> None:
    """The gateway counts a chat's earlier answers again every turn (kept by text) and the
    prompt itself as a chat (its history kept for the coordinator's own count)."""
    answers = random_texts(4, 20)
    for answer in [*answers, *answers[::-1]]:
        expected = len(tokenize(vocab, answer, add_bos=True, special=True))
        assert counter.count(answer, counter.model_name) == (expected, True)
        assert counter.count(answer, "another-model")[1] is False  # estimated, not kept
    prompt = "User: " + "\nAssistant: ".join(answers) + "\nAssistant:"
    expected_ids = tokenize(vocab, prompt, add_bos=True, special=True)
    before = counter.reused_prefix_chars
    assert counter.count(prompt, counter.model_name, chat=True) == (len(expected_ids), True)
    assert counter.token_ids(prompt, counter.model_name, chat=True) == expected_ids
    assert counter.reused_prefix_chars > before  # the coordinator's count found the gateway's
