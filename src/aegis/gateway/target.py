"""The request target (RFC 3986, RFC 9112 §3.2): a path and query that read one way at the
gateway and at every common upstream, or ``invalid_request``."""

from __future__ import annotations

import re
import unicodedata
from typing import Final
from urllib.parse import parse_qsl, unquote

from aegis.errors import InvalidRequest

__all__ = [
    "MAX_QUERY_PARAMETERS",
    "vet_path",
    "vet_query",
]


#: Percent-encodings of ``/``, ``\\`` and ``%``: decoding them changes how the path splits into
#: segments, or leaves a second layer of encoding for the upstream to decode.
_RESEGMENTING: Final = re.compile(r"%(?:2f|5c|25)", re.IGNORECASE)
#: A ``%`` that does not start a percent-encoding (RFC 3986 §2.1: ``%`` and two hex digits):
#: ``%u002e`` is text here, but IIS (http.sys, ``PercentUAllowed``) and ASP.NET's ``UrlDecode``
#: read it as ``.``, so ``/public/%u002e%u002e/payments`` would be decided under ``/public`` and
#: served as ``/payments``.
_STRAY_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f\\]")
_CONTROL_CHAR: Final = re.compile(r"[\x00-\x1f\x7f]")


#: Most query parameters a call may carry, counting empty pieces: Express (``qs`` and Node's
#: ``querystring``) and PHP (``max_input_vars``) keep the first 1,000 and drop the rest, so a
#: parameter policy reads past that many would never reach such an upstream.
MAX_QUERY_PARAMETERS: Final = 1000


def vet_query(query: str) -> tuple[tuple[str, str], ...]:
    """The parameters of a query string that reads the same at the gateway and the upstream.

    Policy reads the parameters as split on ``&`` (WHATWG, Python); some servers also split on
    ``;`` (older Rack, Go before 1.17), so ``action=read;action=delete`` would be one value here
    and two there: an unencoded ``;`` is refused, as Go now refuses it. So is a ``#`` (a parser
    that keeps a fragment would let policy read what the upstream client drops) and a NUL or other
    control character in a parameter name (C parsers end the name there). So is a query of more
    than :data:`MAX_QUERY_PARAMETERS` pieces, empty ones included."""
    if query.count("&") >= MAX_QUERY_PARAMETERS:
        raise InvalidRequest(
            f"the query string holds more than {MAX_QUERY_PARAMETERS} parameters; some upstreams "
            "drop those past their own limit, which policy would still have read"
        )
    if "#" in query:
        raise InvalidRequest("the request target must not contain a fragment ('#')")
    if ";" in query:
        raise InvalidRequest("encode ';' in the query string as %3B")
    if _STRAY_PERCENT.search(query):
        raise InvalidRequest(
            "the query string holds a '%' that does not start a percent-encoding of two hex "
            "digits (some upstreams read %uNNNN as a character); encode '%' as %25"
        )
    try:
        # Strict: policy would read an invalid UTF-8 escape as U+FFFD, PHP keeps the raw byte.
        params = tuple(parse_qsl(query, keep_blank_values=True, errors="strict"))
    except UnicodeDecodeError:
        raise InvalidRequest(
            "the query string holds a percent-encoding that is not UTF-8; encode text as UTF-8"
        ) from None
    for name, value in params:
        if _CONTROL_CHAR.search(name) or "\x00" in value:
            raise InvalidRequest(
                "query parameters must not carry control characters in names or NUL in values"
            )
    return params


def _dots_only(segment: str) -> bool:
    """A segment of dots and spaces only, before its ``;parameters``: ``.`` and ``..`` are dot
    segments (RFC 3986 §5.2.4), and a server that trims trailing dots and spaces (IIS) reads
    ``. `` or ``.. `` as nothing, or as one."""
    head = segment.split(";", 1)[0]
    return bool(head) and not head.rstrip(". ")


def vet_path(raw_path: str) -> str:
    """The decoded path of a request target that reads the same at the gateway and the upstream.

    The route, and so the tool that policy decides on, is chosen from the path; the upstream then
    resolves the same bytes. RFC 3986 §5.2.4 dot segments (``..``, ``.``, also encoded or with a
    ``;`` parameter as some servers read them), empty segments (merged by some servers),
    encoded separators and double encoding would let
    the two read different paths (``/payments/../admin`` decided as payments, served as admin),
    so they are refused (``invalid_request``) rather than normalised.
    """
    if not raw_path.startswith("/") or _RESEGMENTING.search(raw_path):
        raise InvalidRequest("send an absolute path without encoded '/', '\\' or '%'")
    if _STRAY_PERCENT.search(raw_path):
        raise InvalidRequest(
            "the request path holds a '%' that does not start a percent-encoding of two hex "
            "digits (IIS reads %uNNNN as a character)"
        )
    if "#" in raw_path:
        # Some parsers keep a fragment in the target; the upstream client would drop it, and
        # policy would have decided on a path the upstream never sees.
        raise InvalidRequest("the request target must not contain a fragment ('#')")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the request path is not valid utf-8 once decoded") from None
    if _CONTROL.search(path):
        raise InvalidRequest("the request path must not contain control characters or '\\'")
    if any(_dots_only(seg) for seg in path.split("/")):
        raise InvalidRequest(
            "the request path must not contain '.' or '..' segments, or segments of dots and "
            "spaces only (IIS trims them to nothing)"
        )
    if "/;" in path:
        # Tomcat and Spring drop the parameters, then merge the empty segment left:
        # ``/admin/;/users`` is ``/admin/users`` to them, ``/admin`` plus more to a route.
        raise InvalidRequest("the request path must not contain segments empty before ';'")
    if "//" in path:
        # nginx merges slashes (merge_slashes), so ``//admin/x`` is served as ``/admin/x``
        # while a segment match would choose the catch-all route.
        raise InvalidRequest("the request path must not contain empty segments ('//')")
    if not path.isascii():
        # Servers that apply Unicode compatibility normalisation (NFKC) read two FULLWIDTH FULL
        # STOPs as '..' and a FULLWIDTH SOLIDUS as '/': the path must split the same way once
        # normalised. A FULLWIDTH SEMICOLON after a '/' would leave an empty segment once its
        # parameters are dropped, a FULLWIDTH QUESTION MARK or NUMBER SIGN end the path.
        folded = unicodedata.normalize("NFKC", path)
        if folded != path and (
            any(folded.count(c) != path.count(c) for c in "/?#")
            or "/;" in folded
            or _CONTROL.search(folded)
            or any(_dots_only(seg) for seg in folded.split("/"))
        ):
            raise InvalidRequest(
                "the request path reads differently once Unicode-normalised (NFKC); "
                "send plain '.', '/', ';', '?', '#' and '\\' only where they mean themselves"
            )
    return path
