"""Chat prompts tokenized from the kept ids of the history they re-send.

A chat re-sends its whole history every turn, so the coordinator would tokenize the whole
conversation again for each turn (2.2 ms of CPU a ShareGPT chat turn, where what the turn adds,
the last answer and the new message, is a third of it). llama.cpp cuts a prompt at the texts of
its special tokens, longest token first, and tokenizes each stretch of text between them on
its own; a stretch after a special token gets the same SentencePiece space prefix as one at
the start of a prompt. So a prompt's ids are the ids of its text up to a cut, then of the rest,
end to end, when the cut follows an occurrence of a special token that llama.cpp matches there
as such. `PrefixTokenizer` cuts after a few such tokens (the control tokens a chat template
writes, and a newline where the vocabulary makes it special, as Gemma 3's does), but not where
a special token at least as long could match across the cut or end inside the occurrence
(llama.cpp would take that one first, and the cut would fall inside a stretch of text), after a
token that strips the whitespace following it (``RSTRIP``), or after whitespace when some token
strips whitespace around it. Texts are matched as characters where llama.cpp matches bytes:
the same, since UTF-8 is self-synchronising and a vocabulary whose special tokens are not all
valid UTF-8 gets no cuts. The tests compare the result with whole-prompt tokenization.
"""

from __future__ import annotations

import re
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

PREFIX_CACHE_CHARS: Final = 8_000_000
"""Characters of prompt prefixes kept: the latest turns of about 2,400 chats of ShareGPT's mean
length (3,300 characters), 8-32 MB with their ids."""
TOKEN_ID_TYPECODE: Final = "i"


@dataclass(frozen=True, slots=True)
class SpecialToken:
    """A token llama.cpp matches by its text in a prompt (control, user-defined or unknown)."""

    text: str
    control: bool = False
    strips: bool = False
    """Whether it strips whitespace before or after it (``LSTRIP`` or ``RSTRIP``)."""
    rstrip: bool = False


Rivals = tuple[tuple[str, int], ...]
"""(text, start relative to the cut) of special tokens that would overlap the cut there."""


@dataclass(frozen=True, slots=True)
class Cut:
    """A special token a prompt may be cut after, and the rivals to look for at each cut:
    ``across`` by the character after the cut (they reach past it), ``inside`` (they end
    inside the token's occurrence)."""

    across: dict[str, Rivals]
    inside: Rivals


def cuts_for(
    candidates: Sequence[SpecialToken], specials: Sequence[SpecialToken]
) -> dict[str, Cut]:
    """The ``candidates`` a prompt may be cut after, with their rivals among ``specials``
    (all the vocabulary's: llama.cpp matches those at least as long first)."""
    any_strips = any(s.strips for s in specials)
    cuts: dict[str, Cut] = {}
    for token in candidates:
        text = token.text
        if not text or token.rstrip or _overlaps_itself(text):
            continue
        if any_strips and (text[0].isspace() or text[-1].isspace()):
            continue
        across: dict[str, list[tuple[str, int]]] = {}
        inside: list[tuple[str, int]] = []
        for rival in {s.text for s in specials if len(s.text) >= len(text)} - {text}:
            for k in range(1, len(rival)):
                if text.endswith(rival[:k]) or rival[:k].endswith(text):
                    across.setdefault(rival[k], []).append((rival, -k))
                tail = rival[k:]
                if len(tail) < len(text) and text.startswith(tail):
                    inside.append((rival, -len(text) - k))
        # Shortest first: at a cut they would overlap, they are the likeliest to be there.
        cuts[text] = Cut(
            {c: tuple(sorted(r, key=_shortest)) for c, r in across.items()},
            tuple(sorted(inside, key=_shortest)),
        )
    return cuts


def _shortest(rival: tuple[str, int]) -> tuple[int, int, str]:
    return (len(rival[0]), -rival[1], rival[0])


def _overlaps_itself(text: str) -> bool:
    return any(text[:k] == text[-k:] for k in range(1, len(text)))


class PrefixTokenizer:
    """``tokenize(text)`` (no BOS) reusing the ids of the longest kept prefix of ``text`` that
    ends at a cut (``cuts``): a chat's next turn finds its history. Each prompt then keeps its
    own prefix up to its last cut, in place of the one it extended (a conversation holds one
    entry), least recently used out first beyond ``max_chars``. A prompt with no cut costs one
    scan for cuts. Thread-safe: the coordinator tokenizes long prompts on a pool."""

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        cuts: dict[str, Cut],
        max_chars: int = PREFIX_CACHE_CHARS,
    ) -> None:
        self._tokenize = tokenize
        self._cuts = cuts
        ordered = sorted(cuts, key=lambda text: (-len(text), text))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if cuts else None
        self._max_chars = max_chars
        self._prefixes: OrderedDict[str, array[int]] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        """How many kept prefixes have each length: a prompt looks up only its cuts at those."""
        self._chars = 0
        self._lock = threading.Lock()
        self.reused_chars = 0
        """Characters of prompts whose ids came from a kept prefix (for tests and benchmarks)."""

    def __call__(self, text: str, keep: bool) -> list[int]:
        """``text``'s ids; ``keep``: keep its prefix for the prompts that may extend it (a
        chat's next turn), at the cost of a second call into the tokenizer."""
        ends = self.cut_ends(text)
        if not ends:
            return self._tokenize(text)
        start, ids = self._longest_kept(text, ends)
        last = ends[-1]
        if keep and last > start:
            ids.extend(self._tokenize(text[start:last]))
            self._keep(text[:last], ids, replacing=text[:start] if start else None)
            start = last
        if start < len(text):
            ids.extend(self._tokenize(text[start:]))
        return ids

    @property
    def kept_prefixes(self) -> tuple[str, ...]:
        """The prefixes kept, least recently used first."""
        with self._lock:
            return tuple(self._prefixes)

    def cut_ends(self, text: str) -> list[int]:
        """Where ``text`` may be cut: after each occurrence of a cut token no rival overlaps."""
        if self._pattern is None:
            return []
        ends = []
        size = len(text)
        for match in self._pattern.finditer(text):
            end = match.end()
            cut = self._cuts[match.group()]
            rivals = cut.inside + cut.across.get(text[end], ()) if end < size else cut.inside
            if not rivals or not any(
                end + at >= 0 and text.startswith(rival, end + at) for rival, at in rivals
            ):
                ends.append(end)
        return ends

    def _longest_kept(self, text: str, ends: list[int]) -> tuple[int, list[int]]:
        with self._lock:
            for end in reversed(ends):
                if self._lengths[end]:
                    found = self._prefixes.get(text[:end])
                    if found is not None:
                        self._prefixes.move_to_end(text[:end])
                        self.reused_chars += end
                        return end, found.tolist()
        return 0, []

    def _keep(self, prefix: str, ids: list[int], replacing: str | None) -> None:
        if len(prefix) > self._max_chars:
            return
        with self._lock:
            if replacing is not None and self._prefixes.pop(replacing, None) is not None:
                self._forget(replacing)
            if prefix not in self._prefixes:
                self._prefixes[prefix] = array(TOKEN_ID_TYPECODE, ids)
                self._lengths[len(prefix)] += 1
                self._chars += len(prefix)
            while self._chars > self._max_chars:
                evicted, _ = self._prefixes.popitem(last=False)
                self._forget(evicted)

    def _forget(self, prefix: str) -> None:
        size = len(prefix)
        self._lengths[size] -= 1
        if not self._lengths[size]:
            del self._lengths[size]  # a zero count would stay for every length ever seen
        self._chars -= size
