"""Stop strings and incremental UTF-8 decoding of token bytes."""

from __future__ import annotations

from agents.text import StopStringFilter


def stream(pieces: list[bytes], stop: tuple[str, ...]) -> tuple[str, bool]:
    f = StopStringFilter(stop)
    out = "".join(f.feed(p) for p in pieces)
    return out + f.flush(), f.stopped


def test_plain_text_passes_through() -> None:
    assert stream([b"Hello", b" world"], ()) == ("Hello world", False)


def test_stop_string_inside_a_token_cuts_there() -> None:
    assert stream([b"one", b" two\nthree"], ("\n",)) == ("one two", True)


def test_stop_string_spanning_tokens_is_never_emitted() -> None:
    f = StopStringFilter(("END",))
    assert f.feed(b"abc E") == "abc "
    assert f.feed(b"N") == ""
    assert f.feed(b"D more") == ""
    assert f.stopped


def test_false_alarm_prefix_is_released() -> None:
    f = StopStringFilter(("END",))
    assert f.feed(b"E") == ""
    assert f.feed(b"gg") == "Egg"


def test_multibyte_character_split_across_tokens() -> None:
    euro = "€".encode()
    f = StopStringFilter(())
    assert f.feed(euro[:1]) == ""
    assert f.feed(euro[1:]) == "€"


def test_first_of_several_stops_wins() -> None:
    assert stream([b"a.b!c"], ("!", ".")) == ("a", True)
