"""Strict compact JWS (RFC 7515 §7.1) parsing and signing, for Ed25519 and ES256 only.

Parsing is the dangerous part, so it is strict and bounded:

* the input is ASCII, at most :data:`MAX_TOKEN_BYTES`, exactly three non-empty segments;
* every segment is canonical base64url without padding;
* header and payload are JSON objects without duplicate members (RFC 7515 §5.2: "the JWS Parser
  MUST either reject JWSs with duplicate Header Parameter names or ..." — we reject), and without
  ``NaN``/``Infinity``;
* ``crit`` is rejected since Aegis understands no extension (RFC 7515 §4.1.11: "If any of the listed
  extension Header Parameters are not understood ... then the JWS is invalid"), and so is
  ``b64: false`` (RFC 7797).

Which key verifies is never chosen by the token: the caller resolves the key from ``kid`` in its own
key ring, and headers that carry or point at keys are judged by the caller's rules
(:data:`KEY_CARRYING_HEADERS`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aegis.crypto.keys import b64u_decode, b64u_encode
from aegis.errors import TokenError

__all__ = [
    "KEY_CARRYING_HEADERS",
    "MAX_SAFE_INTEGER",
    "MAX_TOKEN_BYTES",
    "ParsedJWS",
    "StrictJSONError",
    "encode_segment",
    "fold_name",
    "holds_lone_surrogate",
    "holds_unsafe_integer",
    "parse_compact",
    "parse_with_header",
    "sign_compact",
    "split_compact",
    "strict_json",
]

#: Tokens larger than this are refused before any decoding.
MAX_TOKEN_BYTES: Final = 8192
#: Headers that carry a key or tell a verifier where to fetch one. Aegis never follows them.
KEY_CARRYING_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c"})
_HEADER_CACHE_MAX: Final = 1024


@dataclass(frozen=True, slots=True)
class ParsedJWS:
    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes


def _malformed(what: str) -> TokenError:
    return TokenError(f"malformed token: {what}", code="malformed_token")


class StrictJSONError(ValueError):
    """Valid JSON that Aegis refuses to read (the message says what): a repeated member, NaN or
    Infinity, a number out of range, a lone surrogate."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise StrictJSONError(
                    f"repeats the JSON member {name[:64]!r}; send each member once"
                )
            seen.add(name)
    return obj


def _no_constants(name: str) -> Any:
    raise StrictJSONError(f"holds {name!r}, which is not a JSON number; send finite numbers")


def _finite_float(text: str) -> float:
    # ``1e400`` is valid JSON that Python reads as infinity, which would make ``exp`` never pass;
    # RFC 8259 §6 leaves such numbers to the implementation: refuse them like NaN.
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(
            f"holds {text[:32]!r}, which is not a JSON number in range; send finite numbers"
        )
    return value


#: RFC 8259 JSON as Aegis reads it everywhere (tokens, proofs, request bodies): no repeated
#: members (RFC 8259 §4: "the behavior of software that receives such an object is
#: unpredictable"), no NaN or Infinity (every comparison with NaN is false).
_decoder = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates,
    parse_constant=_no_constants,
    parse_float=_finite_float,
)


def strict_json(text: str, *, fold_case: bool = False, safe_integers: bool = False) -> Any:
    """``text`` decoded by the strict reader; ``StrictJSONError`` for valid JSON Aegis refuses
    (lone surrogates included), ``ValueError`` for text that is not JSON. With ``fold_case``
    (request bodies) an object may not hold two members whose names differ only in case; with
    ``safe_integers`` (a body policy reads) nor an integer beyond +-2**53
    (:data:`MAX_SAFE_INTEGER`)."""
    if fold_case:
        decoder = _safe_folding_decoder if safe_integers else _folding_decoder
    else:
        decoder = _decoder
    value = decoder.decode(text)
    if holds_lone_surrogate(text, value):
        raise StrictJSONError("holds a lone UTF-16 surrogate ('\\ud800')")
    return value


def fold_name(name: str) -> str:
    """``name`` as the most lenient case-insensitive reader compares it: Unicode case folding,
    after a round trip through lower and upper case (Go's encoding/json matches U+0131, the
    dotless i, to ``I``, and U+0130 to ``i``, which case folding alone keeps apart), without the
    combining dot that folding U+0130 leaves. Names that fold alike here may be one name to some
    server."""
    if name.isascii():
        return name.lower()
    return name.lower().upper().casefold().replace("\u0307", "")


def _object_without_case_twins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _object_without_duplicates(pairs)
    if len(obj) > 1 and len({fold_name(name) for name in obj}) != len(obj):
        seen: dict[str, str] = {}
        for name in obj:
            twin = seen.setdefault(fold_name(name), name)
            if twin != name:
                raise StrictJSONError(
                    f"holds the JSON members {twin[:64]!r} and {name[:64]!r}, which differ only "
                    "in case: some servers (Go's encoding/json) read them as one; send one"
                )
    return obj


#: Largest magnitude of an integer every JSON reader reads as itself: readers that hold numbers
#: as IEEE doubles (JavaScript's JSON.parse, Go's interface{}, PHP past its int) round anything
#: beyond 2**53, so 9007199254740993 is 9007199254740992 to them.
MAX_SAFE_INTEGER: Final = 2**53


def holds_unsafe_integer(value: Any) -> bool:
    """Whether a parsed JSON value holds an integer beyond +-2**53 (:data:`MAX_SAFE_INTEGER`)
    anywhere, however deep (an iterative walk)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is int and abs(item) > MAX_SAFE_INTEGER:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _safe_int(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_SAFE_INTEGER:
        raise StrictJSONError(
            f"holds the integer {text[:32]}, beyond +-2**53, which readers that hold numbers as "
            "doubles (JavaScript, Go) read as another number; send it as a string"
        )
    return value


#: The reader of request bodies: as :data:`_decoder`, and names that differ only in case (or by
#: a letter Unicode folds alike, such as the Kelvin sign) are one repeated member to Go's
#: encoding/json and ASP.NET's default reader, which take the last; refused like a repeat.
_folding_decoder = json.JSONDecoder(
    object_pairs_hook=_object_without_case_twins,
    parse_constant=_no_constants,
    parse_float=_finite_float,
)
#: The reader of a body policy reads: as :data:`_folding_decoder`, and no integer a reader of
#: doubles would read as another (policy and such an upstream would decide on two numbers).
_safe_folding_decoder = json.JSONDecoder(
    object_pairs_hook=_object_without_case_twins,
    parse_constant=_no_constants,
    parse_float=_finite_float,
    parse_int=_safe_int,
)

_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


#: A ``\\u`` escape of a UTF-16 surrogate; only then can a decoded string hold a lone one.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")


def holds_lone_surrogate(text: str, value: Any) -> bool:
    """Whether ``value``, decoded from the JSON ``text``, holds a string with a lone UTF-16
    surrogate (``"\\ud800"``): valid JSON escaping, but no Unicode text, so nothing downstream
    can encode it. Only text with such an escape is looked at closely."""
    if "\\u" not in text or not _SURROGATE_ESCAPE.search(text):
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
        # Fast path for the compact form every signer emits: scan one value from offset 0 and
        # require it to span the whole text. Anything else (surrounding whitespace, trailing
        # data, a scan failure) takes the full decoder, so the accepted texts are exactly its.
        value: Any = None
        end = -1
        if text[:1] == "{":
            try:
                value, end = _scan_once(text, 0)
            except StopIteration:  # not even one value: the full decoder below says why
                end = -1
        if end != len(text):
            value = _decoder.decode(text)
    except StrictJSONError as exc:
        raise _malformed(f"{what} {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _malformed(f"{what} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise _malformed(f"{what} is not a JSON object")
    # "\ud800" is valid JSON escaping but no Unicode text: every later use of the value (a jti in
    # a replay key, an attestation, an audit record) would have to encode it and fail.
    if holds_lone_surrogate(text, value):
        raise _malformed(f"{what} holds a lone UTF-16 surrogate")
    return value


# Headers repeat across every token signed by one key, so their parsed form is cached by the exact
# segment text. Parsing is a pure function of that text; the cache changes no outcome. Every caller
# gets its own copy: a caller that edits the header it was given must not change what the next
# token with the same segment parses to. Only headers whose values are all scalars are cached, so
# that shallow copy is a whole copy; a header carrying an object or array (a DPoP ``jwk``) is
# parsed afresh each time.
_header_cache: dict[str, dict[str, Any]] = {}
_SCALAR_TYPES: Final = frozenset({str, int, float, bool, type(None)})


def _parse_header(segment: str) -> dict[str, Any]:
    header = _header_cache.get(segment)
    if header is not None:
        return header.copy()
    try:
        raw = b64u_decode(segment)
    except ValueError as exc:
        raise _malformed("header is not canonical base64url") from exc
    header = _json_object(raw, "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise _malformed("header has no alg")
    if "crit" in header:
        raise TokenError("unsupported critical header extension", code="forbidden_header")
    if "b64" in header:
        raise TokenError("unencoded payloads (b64) are not supported", code="forbidden_header")
    if all(type(value) in _SCALAR_TYPES for value in header.values()):
        if len(_header_cache) >= _HEADER_CACHE_MAX:
            _header_cache.clear()
        _header_cache[segment] = header.copy()
    return header


def split_compact(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> tuple[str, str, str]:
    """The three segments of a compact JWS, after the structural checks (a string, at most
    ``max_bytes``, ASCII, exactly three non-empty segments). Decodes nothing."""
    if not isinstance(token, str):
        raise _malformed("not a string")
    if len(token) > max_bytes:
        raise TokenError(f"token larger than {max_bytes} bytes", code="token_too_large")
    if not token.isascii():
        raise _malformed("non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise _malformed(f"expected 3 segments, found {len(parts)}")
    h, p, s = parts
    if not h or not p or not s:
        raise _malformed("empty segment")
    return h, p, s


def parse_with_header(h: str, p: str, s: str, header: dict[str, Any]) -> ParsedJWS:
    """Decode the payload and signature of segments from :func:`split_compact` whose header
    segment ``h`` the caller has already parsed (and judged) as ``header``: for a caller that
    keeps its own record of header segments it accepted. ``header`` is returned as given."""
    try:
        payload_raw = b64u_decode(p)
        signature = b64u_decode(s)
    except ValueError as exc:
        raise _malformed("segment is not canonical base64url") from exc
    payload = _json_object(payload_raw, "payload")
    # The signing input is the token up to its last '.', exactly as received (ASCII checked).
    return ParsedJWS(header, payload, f"{h}.{p}".encode("ascii"), signature)


def parse_compact(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> ParsedJWS:
    """Split and decode a compact JWS. Verifies nothing: the caller checks ``alg`` and signature."""
    h, p, s = split_compact(token, max_bytes=max_bytes)
    return parse_with_header(h, p, s, _parse_header(h))


def encode_segment(obj: dict[str, Any]) -> str:
    """Compact JSON, base64url-encoded. Raises ``ValueError`` for NaN or infinity and for a
    string with a lone surrogate, which the parser would refuse: never mint what we cannot
    verify."""
    text = _encoder.encode(obj)
    try:
        return b64u_encode(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("a string holds a lone UTF-16 surrogate; it has no UTF-8 form") from None


# What ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`` uses, built
# once: json.dumps builds a new encoder on every call made with non-default options.
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sign_compact(header_segment: str, payload: dict[str, Any], sign: Any) -> str:
    """Assemble a compact JWS from a pre-encoded header, a payload and a ``sign(bytes)`` callable."""
    signing_input = f"{header_segment}.{encode_segment(payload)}"
    signature = sign(signing_input.encode("ascii"))
    return f"{signing_input}.{b64u_encode(signature)}"
