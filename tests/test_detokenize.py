"""Incremental detokenization: settled text only, stop strings cut the output before them."""

from __future__ import annotations

from tetris.runtime.detokenize import Detokenizer


def chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def feed(d: Detokenizer, text: str) -> list[str]:
    return [d.add([ord(c)]) for c in text]


def test_without_stop_strings_each_token_is_released_at_once() -> None:
    """No stop strings: every character comes out with its token."""
    assert feed(Detokenizer(chars), "abc") == ["a", "b", "c"]


def test_text_that_may_start_a_stop_string_is_held_back() -> None:
    """Stop "END": up to 2 characters wait; "helloEND" releases "hello" and stops."""
    d = Detokenizer(chars, stop=["END"])
    out = feed(d, "helloEND")
    assert "".join(out) == "hello" and d.stopped
    assert out[:3] == ["", "", "h"]


def test_final_releases_the_held_tail() -> None:
    """At the last token (max_tokens) the held-back tail comes out."""
    d = Detokenizer(chars, stop=["XYZ"])
    assert "".join(feed(d, "ab")) == ""
    assert d.add([ord("X")], final=True) == "abX"


def test_incomplete_character_waits_for_the_next_token() -> None:
    """A decode ending in U+FFFD (half a UTF-8 character) is not released yet."""
    table = {1: "a", 2: "\ufffd", 3: "é"}

    def decode(ids: list[int]) -> str:
        # Token 2 followed by 3 decodes as "é" (the two halves of one character).
        text = "".join(table[i] for i in ids)
        return text.replace("\ufffdé", "é")

    d = Detokenizer(decode)
    assert d.add([1]) == "a"
    assert d.add([2]) == ""
    assert d.add([3]) == "é"
