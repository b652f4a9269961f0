"""encode_segment: compact UTF-8 JSON, the same bytes as json.dumps with the same options, and
never a NaN or infinity the parser would refuse."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from aegis.crypto.jws import encode_segment
from aegis.crypto.keys import b64u_decode

CASES: list[dict[str, Any]] = [
    {},
    {"alg": "EdDSA", "typ": "aegis-attestation+jwt", "kid": "k"},
    {"iss": "https://é.example", "n": 1, "f": 1.5, "t": True, "z": None, "l": [1, "a", {"b": []}]},
    {"quote": '"\\\n', "emoji": "\U0001f600", "ctl": "\x00\x1f"},
]


@pytest.mark.parametrize("obj", CASES)
def test_same_bytes_as_json_dumps(obj: dict[str, Any]) -> None:
    expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert b64u_decode(encode_segment(obj)) == expected.encode("utf-8")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_refuses_what_the_parser_would_refuse(bad: float) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_segment({"exp": bad})
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_segment({"nested": {"exp": [bad]}})


def test_a_lone_surrogate_is_never_minted() -> None:
    """The parser refuses it, so a token holding one could never be verified."""
    with pytest.raises(ValueError, match="surrogate"):
        encode_segment({"sub": "a\ud800b"})
