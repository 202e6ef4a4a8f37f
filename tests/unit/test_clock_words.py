"""A Bind's values read the clock when they spell a clock word ('now', 'today', 'tomorrow',
'yesterday', in any case): `reads_clock` rules most values out by four byte searches before
the pattern, and must agree with the pattern on every value."""

from __future__ import annotations

import random
import struct

from neonpoly.proxy.extended import CLOCK_WORDS, reads_clock


def _values(*texts: bytes) -> bytes:
    """A Bind's values as `reads_clock` gets them: formats, then each value with its length."""
    body = struct.pack("!hh", 0, len(texts))
    for text in texts:
        body += struct.pack("!i", len(text)) + text
    return body + struct.pack("!h", 0)


def test_every_clock_word_in_any_case_reads_the_clock() -> None:
    for word in (b"now", b"today", b"tomorrow", b"yesterday"):
        for spelled in (word, word.upper(), word.capitalize(), word.swapcase(), b" " + word + b" "):
            assert reads_clock(_values(b"1", spelled)), spelled
    assert not reads_clock(_values(b"12345", b"2024-01-01", b"nowhere"))  # a word, not the word


def test_reads_clock_agrees_with_the_pattern_on_any_bytes() -> None:
    rng = random.Random(11)
    alphabet = b"nowtdayrmesNOWTDAYRMES 0123456789\x00-"
    for _ in range(20_000):
        text = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        values = _values(text)
        assert reads_clock(values) is (CLOCK_WORDS.search(values) is not None), text


def test_a_clock_word_spelt_with_quotes_or_backslashes_inside_an_element_reads_the_clock() -> None:
    """Array, range and record input drop them: `{n"o"w}` and `{"n\\ow"}` hold now
    (tests/adversarial/test_47 proves it on a server)."""
    for spelled in (b'{n"o"w}', b'{"n\\ow"}', b"[to\\day,)", b'("yester"day)'):
        assert reads_clock(_values(spelled)), spelled
    assert not reads_clock(_values(b'{"no","w"}', b"{kn\\ow}"))  # two elements; a longer word
