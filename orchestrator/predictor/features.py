"""Deterministic prompt features: encoder token ids and hand-written task cues.

Both are pure functions of the prompt text, so the same prompt always yields the same
features at training time, at serving time and in the adaptation history.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Encoder input budget in tokens, [CLS] and [SEP] included. 64 keeps one prediction well
#: under the 5 ms p50 target on one core and ranks as well as 128 on held-out data.
MAX_ENCODER_TOKENS = 64
#: Of the budget, tokens kept from the prompt's end: instructions often follow pasted text.
TAIL_TOKENS = 16
#: Characters the cue features read from each end, so a 100 kB prompt costs no more than a
#: 4 kB one.
HEAD_CHARS = 3000
TAIL_CHARS = 1000
#: Characters tokenised from each end: far more than 48 head and 16 tail word-pieces need.
TOKENIZE_HEAD_CHARS = 1200
TOKENIZE_TAIL_CHARS = 400
CLS_ID = 101
SEP_ID = 102
PAD_ID = 0

_NUMBER_WORDS = {
    "a": 1,
    "an": 1,
    "one": 1,
    "single": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
    "thirty": 30,
    "fifty": 50,
    "hundred": 100,
    "few": 3,
    "several": 4,
    "couple": 2,
}
#: Rough answer tokens per requested unit ("3 paragraphs" -> about 3 x 90 tokens).
_UNIT_TOKENS = {
    "word": 1.4,
    "sentence": 25.0,
    "line": 12.0,
    "paragraph": 90.0,
    "item": 25.0,
    "page": 500.0,
    "verse": 40.0,
    "stanza": 40.0,
    "character": 0.3,
}
_UNIT_ALIASES = {
    "words": "word",
    "word": "word",
    "sentences": "sentence",
    "sentence": "sentence",
    "lines": "line",
    "line": "line",
    "paragraphs": "paragraph",
    "paragraph": "paragraph",
    "pages": "page",
    "page": "page",
    "verses": "verse",
    "stanzas": "stanza",
    "characters": "character",
    "chars": "character",
}
_ITEM_NOUNS = (
    "items|ideas|examples|tips|points|bullet points|bullets|steps|reasons|questions|names|"
    "things|ways|suggestions|options|facts|benefits|advantages|disadvantages|strategies|"
    "titles|slogans|taglines|headlines|words to|synonyms|adjectives|activities|places|books|"
    "movies|songs|recipes|methods|features|tweets|jokes|quotes|keywords|hashtags|sentences"
)
_COUNT_RE = re.compile(
    r"\b(\d{1,5}|" + "|".join(_NUMBER_WORDS) + r")[\s-]+(?:(?:short|long|brief|different|"
    r"unique|creative|new|more|key|main|simple|concise|detailed)\s+)?("
    + "|".join(_UNIT_ALIASES)
    + "|"
    + _ITEM_NOUNS
    + r")\b"
)
_RANGE_WORDS_RE = re.compile(r"\b(\d{2,5})\s*(?:-|to)\s*(\d{2,5})\s+words\b")

#: Cue groups: each becomes one 0/1 feature. Lower-case regexes over the prompt text.
CUES: tuple[tuple[str, str], ...] = (
    ("one_word", r"\b(one|single|1)[ -]word\b|\bin a word\b"),
    ("yes_no", r"\byes or no\b|\btrue or false\b|\byes/no\b"),
    ("one_sentence", r"\b(one|single|1|a) sentence\b|\bone line\b|\bone-liner\b"),
    ("brief", r"\b(brief|briefly|short|shortly|concise|concisely|succinct|quick|tl;?dr)\b"),
    (
        "only",
        r"\bjust (the|give|answer|say|output|return)\b|\bonly (the|answer|output|return|respond)\b",
    ),
    (
        "classify",
        r"\b(classify|categori[sz]e|label|identify|detect|determine whether|which of|choose|select|pick)\b",
    ),
    ("sentiment", r"\b(sentiment|positive or negative|tone of)\b"),
    (
        "math",
        r"\b(calculate|compute|solve|evaluate|how much|how many|what is \d|sum of|product of|equation|percent)\b|\d\s*[-+*/^]\s*\d",
    ),
    (
        "rewrite",
        r"\b(rewrite|rephrase|paraphrase|reword|edit|proofread|correct (the|this|my)|fix (the|this|my) grammar|grammar|simplify|shorten)\b",
    ),
    (
        "translate",
        r"\b(translate|translation|in (french|spanish|german|chinese|japanese|italian|korean|russian))\b",
    ),
    (
        "word_task",
        r"\b(synonym|antonym|rhymes? with|spell|plural|past tense|abbreviation|acronym|anagram|fill in the blank)\b",
    ),
    (
        "title",
        r"\b(title|headline|slogan|tagline|name for|hashtag|subject line|catchphrase|motto)\b",
    ),
    ("convert", r"\b(convert|format|sort|arrange|reverse|extract|find the|replace)\b"),
    ("define", r"\b(define|definition|meaning of|what does .{1,30} mean)\b"),
    (
        "fact",
        r"^(who|when|where|which) \b|\bwhat year\b|\bcapital of\b|\bhow (old|tall|far|long ago)\b",
    ),
    (
        "essay",
        r"\b(essay|article|blog post|blog|report|thesis|research paper|white paper|chapter)\b",
    ),
    (
        "story",
        r"\b(story|stories|narrative|fiction|fairy tale|screenplay|script for|scene|dialogue|conversation between)\b",
    ),
    ("poem", r"\b(poem|poetry|haiku|limerick|sonnet|song|lyrics|rap|verse)\b"),
    (
        "letter",
        r"\b(letter|email|e-mail|cover letter|speech|toast|eulogy|announcement|press release|newsletter|memo)\b",
    ),
    (
        "detail",
        r"\b(in detail|detailed|elaborate|in depth|in-depth|thorough|thoroughly|comprehensive|extensive|long|lengthy|at length)\b",
    ),
    (
        "explain",
        r"\b(explain|explanation|describe|discuss|elaborate|analy[sz]e|analysis|why|how does|how do|how can|how to|how would)\b",
    ),
    (
        "step",
        r"\bstep[- ]by[- ]step\b|\bsteps\b|\bguide\b|\btutorial\b|\binstructions\b|\bwalk me through\b",
    ),
    (
        "plan",
        r"\b(plan|itinerary|schedule|outline|curriculum|syllabus|agenda|roadmap|strategy|proposal|business plan|workout|meal plan|recipe)\b",
    ),
    (
        "compare",
        r"\b(compare|comparison|contrast|differences?|versus|vs\.?|pros and cons|advantages and disadvantages)\b",
    ),
    (
        "list",
        r"\b(list|enumerate|bullet|ideas|suggest|suggestions|recommend|recommendations|examples|tips|ways to|options)\b",
    ),
    (
        "code",
        r"\b(code|program|function|script|implement|algorithm|class|python|javascript|java|c\+\+|sql|html|css|regex|bash|api|typescript|rust|golang)\b",
    ),
    ("code_fix", r"\b(debug|bug|error|fix|optimi[sz]e|refactor|what does this code|output of)\b"),
    (
        "create",
        r"^(write|create|generate|compose|draft|design|develop|build|make|produce|come up with)\b|\b(write|create|generate|compose|draft) (a|an|me|some|the)\b",
    ),
    ("summarize", r"\b(summari[sz]e|summary|tl;?dr|key points|main points|in a nutshell|gist)\b"),
    (
        "opinion",
        r"\b(what do you think|your opinion|do you think|would you|should i|is it (good|bad|worth))\b",
    ),
    ("chitchat", r"^(hi|hello|hey|thanks|thank you|good (morning|evening)|how are you)\b"),
    ("roleplay", r"\b(imagine you are|you are a|act as|pretend|role[- ]?play|as an? [a-z]+,)\b"),
    ("continue", r"\b(continue|go on|keep going|more)\b"),
)
_CUE_RES = tuple(re.compile(pattern) for _, pattern in CUES)
_CODE_CHARS_RE = re.compile(r"[{};=<>()\[\]]")
_QUESTION_START_RE = re.compile(
    r"^(what|who|when|where|why|how|is|are|can|could|do|does|did|should|would|will|which)\b"
)

#: Names of the numeric features, in the order `cue_features` returns them.
NUMERIC_FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "question_marks",
    "ends_question",
    "question_start",
    "code_char_ratio",
    "has_code_fence",
    "has_input_block",
    "digit_ratio",
    "requested_log_tokens",
    "has_requested_count",
    "requested_word_count_log",
)
FEATURE_NAMES: tuple[str, ...] = NUMERIC_FEATURES + tuple(f"cue_{name}" for name, _ in CUES)
N_CUE_FEATURES = len(FEATURE_NAMES)


def _clip_text(prompt: str, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> str:
    """The part of a prompt the features read: its head and tail, so cost stays bounded."""
    if len(prompt) <= head + tail:
        return prompt
    return prompt[:head] + "\n" + prompt[-tail:]


def _requested_tokens(text: str) -> tuple[float, float]:
    """Answer size the prompt asks for explicitly, in rough tokens, and the word count asked.

    Returns (0, 0) when the prompt names no count. When it names several, the largest wins:
    "3 paragraphs of 100 words" is bounded by the larger reading.
    """
    best = 0.0
    words_asked = 0.0
    for match in _RANGE_WORDS_RE.finditer(text):
        words = (float(match.group(1)) + float(match.group(2))) / 2.0
        words_asked = max(words_asked, words)
        best = max(best, words * _UNIT_TOKENS["word"])
    for match in _COUNT_RE.finditer(text):
        raw, noun = match.group(1), match.group(2)
        count = float(raw) if raw.isdigit() else float(_NUMBER_WORDS.get(raw, 0))
        if count <= 0 or count > 20000:
            continue
        unit = _UNIT_ALIASES.get(noun, "item")
        if unit == "word":
            words_asked = max(words_asked, count)
        best = max(best, count * _UNIT_TOKENS[unit])
    return best, words_asked


def cue_features(prompt: str) -> np.ndarray:
    """Hand-written features of one prompt, float32 of length N_CUE_FEATURES.

    Why: task-type cues ("one word", "essay", "list 10 ideas") and requested counts carry
    most of the length signal that a general sentence embedding blurs.
    """
    text = _clip_text(prompt).lower().strip()
    n_chars = len(prompt)
    n_words = len(prompt.split())
    n_lines = prompt.count("\n") + 1
    code_chars = len(_CODE_CHARS_RE.findall(text))
    digits = sum(ch.isdigit() for ch in text)
    requested, words_asked = _requested_tokens(text)
    last_line = text.rstrip().rsplit("\n", 1)[-1]
    numeric = [
        math.log1p(n_chars),
        math.log1p(n_words),
        math.log1p(n_lines),
        min(text.count("?"), 5) / 5.0,
        1.0 if text.endswith("?") else 0.0,
        1.0 if _QUESTION_START_RE.match(text) or _QUESTION_START_RE.match(last_line) else 0.0,
        code_chars / max(len(text), 1),
        1.0 if "```" in text else 0.0,
        1.0 if "\n\n" in text.strip() else 0.0,
        digits / max(len(text), 1),
        math.log1p(requested),
        1.0 if requested > 0 else 0.0,
        math.log1p(words_asked),
    ]
    cues = [1.0 if regex.search(text) else 0.0 for regex in _CUE_RES]
    return np.asarray(numeric + cues, dtype=np.float32)


def cue_feature_matrix(prompts: Sequence[str]) -> np.ndarray:
    """`cue_features` for many prompts, stacked into an (n, N_CUE_FEATURES) float32 array."""
    if not prompts:
        return np.zeros((0, N_CUE_FEATURES), dtype=np.float32)
    return np.stack([cue_features(p) for p in prompts])


@dataclass(frozen=True)
class EncoderBatch:
    """Padded encoder inputs: int64 (n, t) ids and attention mask."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class PromptTokenizer:
    """The MiniLM word-piece tokenizer with head-and-tail truncation, no torch needed."""

    def __init__(self, tokenizer_json: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.no_truncation()
        self._tok.no_padding()

    def ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt: [CLS] head ... tail [SEP], at most MAX_ENCODER_TOKENS."""
        clipped = _clip_text(prompt, TOKENIZE_HEAD_CHARS, TOKENIZE_TAIL_CHARS)
        pieces = self._tok.encode(clipped, add_special_tokens=False).ids
        budget = MAX_ENCODER_TOKENS - 2
        if len(pieces) > budget:
            pieces = pieces[: budget - TAIL_TOKENS] + pieces[-TAIL_TOKENS:]
        return [CLS_ID, *pieces, SEP_ID]

    def batch(self, prompts: Sequence[str]) -> EncoderBatch:
        """Right-padded ids and mask for several prompts."""
        rows = [self.ids(p) for p in prompts]
        width = max((len(r) for r in rows), default=2)
        ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return EncoderBatch(ids, mask)
