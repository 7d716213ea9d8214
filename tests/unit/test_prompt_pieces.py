"""Which special tokens a prompt may be cut after, and how kept prefixes are found, replaced
and evicted (a character-per-id tokenizer here; the real vocabulary's equality with whole-prompt
tokenization is tests/e2e/test_llama_engine.py's)."""

from __future__ import annotations

from orchestrator.prompt_pieces import PrefixTokenizer, SpecialToken, cuts_for

TURN_END = SpecialToken("<end>", control=True)
NEWLINE = SpecialToken("\n")


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


class CountingTokenizer:
    """A character a token, noting every text it was asked to tokenize."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, text: str) -> list[int]:
        self.calls.append(text)
        return chars(text)


def test_tokens_that_strip_or_overlap_themselves_are_no_cuts() -> None:
    stripping = SpecialToken("<s>", control=True, strips=True, rstrip=True)
    bordered = SpecialToken("<a<a", control=True)
    assert set(cuts_for([TURN_END, stripping, bordered], [TURN_END, stripping, bordered])) == {
        "<end>"
    }


def test_whitespace_is_no_cut_where_some_token_strips_whitespace() -> None:
    lstrip = SpecialToken("<mask>", strips=True)
    assert "\n" in cuts_for([NEWLINE], [NEWLINE])
    assert cuts_for([NEWLINE], [NEWLINE, lstrip]) == {}


def test_longer_tokens_that_could_overlap_a_cut_are_its_rivals() -> None:
    runs = [SpecialToken("\n" * n) for n in (2, 3)]
    ending_inside = SpecialToken("xy<en")
    holding = SpecialToken("<end>!")
    cuts = cuts_for([NEWLINE, TURN_END], [NEWLINE, TURN_END, *runs, ending_inside, holding])
    assert cuts["\n"].across == {"\n": (("\n\n", -1), ("\n\n\n", -1), ("\n\n\n", -2))}
    assert cuts["\n"].inside == ()
    assert cuts["<end>"].across == {"!": (("<end>!", -5),)}
    assert cuts["<end>"].inside == (("xy<en", -7),)


def test_a_prompt_is_cut_only_where_no_rival_overlaps() -> None:
    runs = [SpecialToken("\n\n"), SpecialToken("xy<en"), SpecialToken("<end>!")]
    tokenizer = CountingTokenizer()
    pieces = PrefixTokenizer(tokenizer, cuts_for([NEWLINE, TURN_END], [NEWLINE, TURN_END, *runs]))
    text = "a\nb\n\nc<end>!d<end>e xy<end>f\n"
    assert pieces(text, keep=True) == chars(text)
    assert tokenizer.calls == [text]  # the last cut is its end: one piece, kept whole
    # Not inside "\n\n" (one token) but after it; after "<end>" only where neither "<end>!"
    # nor "xy<en" would claim it.
    assert pieces.cut_ends(text) == [2, 5, 18, len(text)]


def test_a_chats_next_turn_tokenizes_only_what_it_adds() -> None:
    tokenizer = CountingTokenizer()
    pieces = PrefixTokenizer(tokenizer, cuts_for([TURN_END], [TURN_END]))
    first = "user: hi<end>model:"
    second = first + " hello<end>user: more<end>model:"
    assert pieces(first, keep=True) == chars(first)
    assert pieces(second, keep=True) == chars(second)
    assert tokenizer.calls == [
        "user: hi<end>",
        "model:",
        "model: hello<end>user: more<end>",  # after the first turn's kept prefix
        "model:",
    ]
    assert pieces.reused_chars == len("user: hi<end>")
    assert pieces.kept_prefixes == (second[: second.rindex("<end>") + 5],)  # replaced


def test_a_prompt_not_kept_still_finds_a_kept_prefix_in_one_call() -> None:
    tokenizer = CountingTokenizer()
    pieces = PrefixTokenizer(tokenizer, cuts_for([TURN_END], [TURN_END]))
    pieces("a<end>b", keep=True)
    assert pieces("a<end>c<end>d", keep=False) == chars("a<end>c<end>d")
    assert tokenizer.calls[-1] == "c<end>d"
    assert pieces("plain text", keep=True) == chars("plain text")
    assert tokenizer.calls[-1] == "plain text"
    assert pieces.kept_prefixes == ("a<end>",)


def test_kept_prefixes_are_bounded_least_recently_used_first() -> None:
    pieces = PrefixTokenizer(chars, cuts_for([TURN_END], [TURN_END]), max_chars=20)
    for name in ("aaaa", "bbbb"):
        pieces(f"{name}<end>x", keep=True)
    pieces("aaaa<end>y", keep=False)  # "aaaa<end>" used again
    pieces("cccc<end>x", keep=True)
    assert pieces.kept_prefixes == ("aaaa<end>", "cccc<end>")
    pieces("e" * 30 + "<end>", keep=True)  # longer than the bound: not kept
    assert pieces.kept_prefixes == ("aaaa<end>", "cccc<end>")
