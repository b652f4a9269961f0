"""The XFCC field splitter against the plain reading of its rule (a reference written as a loop over
characters): the same parts, or the same refusal, for any text over the characters that matter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aegis.errors import AegisError
from aegis.pki.forwarded import _split


def reference(value: str, sep: str) -> list[str] | None:
    """Split on ``sep`` outside double quotes; inside quotes a backslash escapes the next
    character; parts keep every character; None for an unterminated quote."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in value:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quoted:
        return None
    parts.append("".join(current))
    return parts


def split_or_none(value: str, sep: str) -> list[str] | None:
    try:
        return _split(value, sep)
    except AegisError as exc:
        refused = exc
    assert refused.code == "cert_invalid"
    assert "unterminated quote" in refused.message
    return None


@given(st.text(alphabet='ab"\\,;=\n', max_size=60), st.sampled_from(",;"))
def test_the_splitter_reads_as_the_reference(value: str, sep: str) -> None:
    assert split_or_none(value, sep) == reference(value, sep)


@pytest.mark.parametrize(
    ("value", "parts"),
    [
        ("", [""]),
        ("a;b", ["a", "b"]),
        ('Subject="CN=a;O=b";URI=x', ['Subject="CN=a;O=b"', "URI=x"]),
        ('k="a\\";b";c', ['k="a\\";b"', "c"]),  # an escaped quote does not end the string
        ("a\\;b", ["a\\", "b"]),  # outside quotes a backslash is an ordinary character
        (";;", ["", "", ""]),
    ],
)
def test_known_splits(value: str, parts: list[str]) -> None:
    assert _split(value, ";") == parts


@pytest.mark.parametrize("value", ['"', 'a;"b', 'k="a\\"', '"x"y"', 'k="a\\'])
def test_an_unterminated_quote_is_refused(value: str) -> None:
    assert split_or_none(value, ";") is None


def test_a_long_unterminated_quote_is_refused() -> None:
    value = '"' + "a\\" * 8000
    assert split_or_none(value, ";") is None
    assert split_or_none(value + "a", ";") is None
