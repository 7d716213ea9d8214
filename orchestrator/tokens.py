"""Prompt token counts before dispatch.

The coordinator needs a prompt's length in tokens for context checks and KV reservations before
any agent sees it. With the served model's GGUF at hand it loads only the vocabulary (about 0.6 s
once, then tens of microseconds a prompt) and counts exactly; otherwise it estimates from UTF-8
bytes and leaves the exact check to the agent, which answers a typed ``context_overflow``.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from orchestrator.core.prefix import PromptBlocks, block_hashes
from orchestrator.prompt_pieces import PrefixTokenizer, cuts_for
from orchestrator.protocol import Submit

OFF_LOOP_PROMPT_CHARS: Final = 2_000
"""Prompts at least this long are tokenized on `PromptMeter`'s threads: llama.cpp's tokenizer takes
1.4-3.6 us a Gemma 3 token on the development VM, so a 4,000-token prompt would stall every other
request's frames on the event loop for 6-15 ms (the call releases the interpreter lock)."""

TOKENIZER_THREADS_MAX: Final = 4
"""Long prompts tokenize in parallel on up to this many threads (at most one a core): on one
thread they queue behind each other while short prompts pass them (WildChat first turns at 64
in flight on two cores: p99 400 ms with one thread, 250 ms with two)."""

COUNT_CACHE_CHARS: Final = 2_000_000
"""Characters of texts whose counts ``GgufTokenCounter.count`` keeps, least recently used out
first: the last answers of some hundreds of chats."""

BYTES_PER_TOKEN_ESTIMATE: Final = 3.5
"""UTF-8 bytes per Gemma 3 token on English prose and code; deliberately on the low side so the
estimate errs towards more tokens (a larger KV reservation) rather than fewer."""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A GGUF's Jinja chat template (``tokenizer.chat_template``) and the texts of the special
    tokens templates refer to as ``bos_token`` and ``eos_token``."""

    model_name: str
    source: str
    bos_token: str
    eos_token: str


class TokenCounter(Protocol):
    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        """Tokens in ``text`` (BOS included) in ``model``'s tokenizer, and whether the count is
        exact; ``model`` None means the model is unknown, which can only be estimated.
        ``chat``: as for ``token_ids``."""
        ...

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        """``text``'s token ids as ``model``'s agents tokenize a prompt, or None where this
        counter does not have that tokenizer. ``chat``: a chat's rendering, whose next turn
        will re-send it (a counter may keep it to tokenize only what that turn adds)."""
        ...


class EstimatedTokenCounter:
    """A byte-length estimate, used when no tokenizer of the served model is available."""

    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        return 1 + math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE), False

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        return None


class GgufTokenCounter:
    """Exact counts with a GGUF's own tokenizer for requests that target its model."""

    def __init__(self, model_path: Path) -> None:
        from orchestrator.llamalib import llama_cpp, silenced

        library = llama_cpp()
        with silenced():
            self._llama = library.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self._vocab = library.llama_model_get_vocab(self._llama.model)
        self.model_name = str(self._llama.metadata.get("general.name", model_path.stem))
        self._fallback = EstimatedTokenCounter()
        adds_bos = library.llama_vocab_get_add_bos(self._vocab)
        self._bos = [self._llama.token_bos()] if adds_bos and self._llama.token_bos() >= 0 else []
        """What ``tokenize`` puts before a prompt's own tokens when asked to add a BOS."""
        template = self._llama.metadata.get("tokenizer.chat_template")
        self.chat_template = (
            ChatTemplate(
                self.model_name,
                str(template),
                bos_token=self._token_text(self._llama.token_bos()),
                eos_token=self._token_text(self._llama.token_eos()),
            )
            if template
            else None
        )
        self._prefixes = self._prefix_tokenizer()
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._counted_chars = 0
        self._counts_lock = threading.Lock()

    def _prefix_tokenizer(self) -> PrefixTokenizer | None:
        """Chat prompts tokenized from their kept history (``orchestrator.prompt_pieces``), cut
        after the control tokens the chat template writes or after newlines where those are
        special tokens (a chat in the plain format), if the vocabulary allows it."""
        from orchestrator.llamalib import special_tokens, tokenize, tokenizes_pieces_alone

        if not tokenizes_pieces_alone(self._vocab):
            return None
        try:
            specials = special_tokens(self._vocab)
        except UnicodeDecodeError:
            return None  # matched as bytes by llama.cpp, maybe inside a character
        source = self.chat_template.source if self.chat_template is not None else ""
        candidates = [s for s in specials if (s.control and s.text in source) or s.text == "\n"]
        cuts = cuts_for(candidates, specials)
        if not cuts:
            return None
        vocab = self._vocab
        return PrefixTokenizer(
            lambda text: tokenize(vocab, text, add_bos=False, special=True), cuts
        )

    @property
    def reused_prefix_chars(self) -> int:
        """Characters of chat prompts whose ids came from a kept prefix (0 when none is kept)."""
        return self._prefixes.reused_chars if self._prefixes is not None else 0

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text: bytes = self._llama.detokenize([token], special=True)
        return text.decode("utf-8", errors="replace")

    def count(self, text: str, model: str | None, *, chat: bool = False) -> tuple[int, bool]:
        """Counts of texts that are not chats are kept by text: a chat's request counts its
        earlier answers again every turn for the length predictor's hint."""
        if model != self.model_name:
            return self._fallback.count(text, model)
        if not chat:
            with self._counts_lock:
                found = self._counts.get(text)
                if found is not None:
                    self._counts.move_to_end(text)
                    return found, True
        ids = self.token_ids(text, model, chat=chat)
        assert ids is not None
        if not chat and len(text) <= COUNT_CACHE_CHARS:
            with self._counts_lock:
                if text not in self._counts:
                    self._counts[text] = len(ids)
                    self._counted_chars += len(text)
                while self._counted_chars > COUNT_CACHE_CHARS:
                    self._counted_chars -= len(self._counts.popitem(last=False)[0])
        return len(ids), True

    def token_ids(self, text: str, model: str | None, *, chat: bool = False) -> list[int] | None:
        if model != self.model_name:
            return None
        from orchestrator.llamalib import tokenize

        if self._prefixes is None:
            tokens = tokenize(self._vocab, text, add_bos=True, special=True)
        else:
            tokens = [*self._bos, *self._prefixes(text, keep=chat)]
        return without_doubled_bos(tokens, self._llama.token_bos())


Measured = tuple[int, bool, PromptBlocks | None]
"""A prompt's token count, whether it is exact, and its prefix blocks (when known)."""


def measure_prompt(
    counter: TokenCounter, text: str, model: str | None, cache_prompt: bool, chat: bool = False
) -> Measured:
    """A prompt's token count, whether it is exact, and (when its token ids are known and it
    may reuse a cache) its prefix blocks, from one tokenization (``chat``: see ``token_ids``)."""
    ids = counter.token_ids(text, model, chat=chat)
    if ids is None:
        return *counter.count(text, model), None
    return len(ids), True, block_hashes(ids) if cache_prompt else None


class PromptMeter:
    """`measure_prompt` for the coordinator: at once for short prompts, on threads of their own
    for long ones (`OFF_LOOP_PROMPT_CHARS`), so that tokenizing a long prompt neither stalls
    the event loop nor waits for the length prediction that runs beside it. llama.cpp keeps
    tokenizing one vocabulary from several threads safe (its test-tokenizer-parallel)."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self._threads: ThreadPoolExecutor | None = None

    def measure(self, message: Submit, model: str | None) -> Measured:
        """``message``'s prompt measured for ``model`` (a chat's kept for its next turn)."""
        return measure_prompt(self.counter, *_measure_args(message, model))

    @staticmethod
    def off_loop(text: str) -> bool:
        return len(text) >= OFF_LOOP_PROMPT_CHARS

    def measure_off_loop(
        self, message: Submit, model: str | None
    ) -> asyncio.Future[Measured] | None:
        """The measurement on the thread when the prompt is long, else None (measure at once)."""
        if not self.off_loop(message.prompt):
            return None
        if self._threads is None:
            threads = min(TOKENIZER_THREADS_MAX, os.cpu_count() or 1)
            self._threads = ThreadPoolExecutor(threads, "tokenizer")
        return asyncio.get_running_loop().run_in_executor(
            self._threads, measure_prompt, self.counter, *_measure_args(message, model)
        )

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=True)


def _measure_args(message: Submit, model: str | None) -> tuple[str, str | None, bool, bool]:
    chat = message.conversation is not None
    return message.prompt, model, message.params.cache_prompt, chat


def without_doubled_bos(tokens: list[int], bos: int) -> list[int]:
    """Drop the BOS the tokenizer added when the text began with its own (a chat template
    rendering ``{{ bos_token }}``): agents and the coordinator count prompts the same way."""
    if bos >= 0 and len(tokens) >= 2 and tokens[0] == tokens[1] == bos:
        return tokens[1:]
    return tokens
