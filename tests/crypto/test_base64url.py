"""b64u_decode against the definition of canonical unpadded base64url (RFC 7515 §2, RFC 4648 §5).

The oracle is written from the definition, not from the implementation: a string is accepted iff
it uses only the 64 base64url characters, its length is not 1 more than a multiple of 4, and it is
exactly what encoding its decoded bytes gives back (so the unused trailing bits are zero).
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from aegis.crypto.keys import b64u_decode, b64u_encode

_URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _oracle(text: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text, flags=re.ASCII) or len(text) % 4 == 1:
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return data if base64.urlsafe_b64encode(data).decode().rstrip("=") == text else None


def _ours(text: str) -> bytes | None:
    try:
        return b64u_decode(text)
    except ValueError:
        return None


@settings(max_examples=1500, deadline=None)
@given(st.text(alphabet=_URL_ALPHABET + "=+/ \t\n\r.\x00é\u0660\uff21", max_size=24))
@example("")
@example("AA")
@example("AB")
@example("AAA")
@example("AAB")
@example("A")
@example("AA==")
@example("AA=")
@example("QQ==")
@example("++++")
@example("////")
@example("AAAA\n")
@example("\u0660\u0660\u0660\u0660")  # Arabic-Indic digits: str.isdigit, but not base64
def test_decoder_agrees_with_the_definition(text: str) -> None:
    assert _ours(text) == _oracle(text)


@given(st.binary(max_size=300))
def test_every_encoding_decodes_back(data: bytes) -> None:
    assert b64u_decode(b64u_encode(data)) == data


@pytest.mark.parametrize("length", range(0, 70))
def test_every_length_and_every_last_character(length: int) -> None:
    """All 64 last characters at every length: exactly the canonical ones are accepted."""
    prefix = "A" * length
    for last in _URL_ALPHABET:
        text = prefix + last
        assert _ours(text) == _oracle(text), text
