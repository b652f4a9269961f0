"""Method and target overrides upstream frameworks honour: refused at every door.

Rails (``Rack::MethodOverride``), Laravel and Symfony serve a POST carrying a ``_method`` field
(a form field, a multipart part, a Laravel JSON member, or a query parameter) as another method;
Express's method-override and IIS's URL rewrite read ``X-HTTP-Method-Override`` or
``X-Original-URL``. Policy would decide a POST to ``/public`` served as a DELETE, or as ``/admin``:
every such call is refused, however the name is spelled or the body encoded."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any, Final
from urllib.parse import unquote_plus, unquote_to_bytes

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from aegis.errors import InvalidRequest
from aegis.gateway.fields import CHARSET, is_encoded
from aegis.gateway.names import name_keys

__all__ = [
    "METHOD_OVERRIDE",
    "REDIRECTING_FIELDS",
    "MethodOverrideWatch",
    "body_field_names",
    "is_form_type",
    "overrides_method",
    "read_whole_for_override",
    "refuse_coded_override",
    "refuse_method_override",
    "refuse_redirecting_fields",
]


#: Request fields that make common upstream frameworks serve another method or target than the
#: request line's (Symfony, Laravel, Express method-override, IIS URL rewrite; gunicorn's
#: ``forwarder_headers`` SCRIPT_NAME and PATH_INFO, trusted from loopback by default, and the
#: X-Script-Name of Flask's reverse-proxy recipe, cut from the front of the path; the original-
#: path fields proxies and rewriters read back): policy would decide a POST to /public that is
#: served as a DELETE, or /payments/x/admin served as /admin.
REDIRECTING_FIELDS: Final = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
     "x-rewrite-url", "script-name", "path-info", "x-script-name", "x-original-uri",
     "x-original-path", "x-envoy-original-path"}
)  # fmt: skip


def refuse_redirecting_fields(
    headers: tuple[tuple[str, str], ...], query: tuple[tuple[str, str], ...] = ()
) -> None:
    """Raise ``invalid_request`` for a call carrying one of :data:`REDIRECTING_FIELDS`, however
    spelled (a CGI or WSGI upstream reads ``X_HTTP_Method_Override`` as the same variable), or a
    ``_method`` query parameter (Rails, Laravel, Symfony, Express method-override)."""
    for name, _ in headers:
        if name.replace("_", "-") in REDIRECTING_FIELDS:
            raise InvalidRequest(
                f"the {name} header asks the upstream to serve another method or path than the "
                "one decided on; send the method and path themselves"
            )
    if _overrides(name for name, _ in query):
        raise InvalidRequest(
            "the _method query parameter asks the upstream to serve another method than the "
            "one decided on; send the method itself"
        )


def _overrides(names: Iterable[str]) -> bool:
    """Whether any of ``names`` is read as ``_method`` by some parser (:func:`name_keys`)."""
    return any(METHOD_OVERRIDE in name_keys(name) for name in names)


#: The body field (and query parameter) with which Rails (Rack::MethodOverride), Laravel and
#: Symfony serve a POST as another method: a form field, a multipart part, or (Laravel) a JSON
#: member.
METHOD_OVERRIDE: Final = "_method"
_OVERRIDE_REFUSED: Final = (
    "the body's _method field asks the upstream to serve this POST as another method than the "
    "one decided on; send the method itself"
)


def is_form_type(content_type: str | None) -> bool:
    """``application/x-www-form-urlencoded``."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ctype == "application/x-www-form-urlencoded"


def _is_multipart_form(content_type: str | None) -> bool:
    """Any ``multipart/*`` type: Rack parses ``multipart/mixed`` and ``multipart/related`` into
    form parameters as it does ``multipart/form-data``."""
    return (content_type or "").split(";")[0].strip().lower().startswith("multipart/")


def _read_as_form(method: str, content_type: str | None) -> bool:
    """A form to Rack: ``application/x-www-form-urlencoded``, or a POST without a type."""
    return is_form_type(content_type) or (method == "POST" and not (content_type or "").strip())


def _read_as_json(content_type: str | None) -> bool:
    """JSON to Laravel (``isJson``): any type holding ``/json`` or ``+json``, parameters
    included; and to Rails, which also registers ``text/x-json`` and ``application/jsonrequest``:
    any media type whose name holds ``json``."""
    ctype = (content_type or "").lower()
    return "/json" in ctype or "+json" in ctype or "json" in ctype.split(";", 1)[0]


def overrides_method(method: str, content_type: str | None) -> bool:
    """Whether a body of ``content_type`` sent with ``method`` may carry a method override an
    upstream framework honours: only a POST's form (or untyped), multipart or JSON body."""
    return method == "POST" and (
        _read_as_form(method, content_type)
        or _is_multipart_form(content_type)
        or _read_as_json(content_type)
    )


def read_whole_for_override(method: str, content_type: str | None) -> bool:
    """Whether the proxy holds such a body whole to look for an override (a multipart form is
    read as it streams, :class:`MethodOverrideWatch`)."""
    return overrides_method(method, content_type) and not _is_multipart_form(content_type)


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as a lenient reader keeps it: every member, repeats included."""


#: JSON as the most lenient common reader takes it (PHP's json_decode, JavaScript's JSON.parse):
#: repeated members, NaN and numbers of any size or range all read; only the names are wanted.
_lenient_json = json.JSONDecoder(
    object_pairs_hook=_Pairs,
    parse_constant=lambda _: None,
    parse_int=lambda _: 0,
    parse_float=lambda _: 0.0,
)


def _readings(raw: bytes) -> set[str]:
    """The texts readers may make of ``raw``: as UTF-8 (without a BOM, which body-parser drops)
    and as Latin-1 and Windows-1252 (what a form labelled ISO-8859-1 is read as); bytes a reading
    cannot decode are replaced, never a reason to read nothing. Other charsets are refused before
    (:func:`_readable_charset`)."""
    return {
        raw.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "replace"),
        raw.decode("latin-1"),
        raw.decode("cp1252", "replace"),
    }


#: Charsets a form body may be labelled with (browsers send UTF-8; Java's HttpClient ISO-8859-1);
#: JSON is UTF-8 (RFC 8259 §8.1) or its subset US-ASCII.
_FORM_CHARSETS: Final = frozenset(
    {"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1", "windows-1252",
     "cp1252"}
)  # fmt: skip
_JSON_CHARSETS: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def _readable_charset(method: str, content_type: str | None) -> bool:
    """Whether every charset the type names is one the names are read in: another one (UTF-7 or
    UTF-16, read by body-parser's iconv-lite; a codec that is no text encoding at all) would
    hide names from :func:`_readings`."""
    allowed = _JSON_CHARSETS if _read_as_json(content_type) else _FORM_CHARSETS
    return all(
        not extended and charset.lower() in allowed
        for extended, charset in CHARSET.findall(content_type or "")
    )


_FORM_SEPARATORS: Final = re.compile(r"[&;]")


def _top_level_names(raw: bytes, method: str, content_type: str | None) -> frozenset[str]:
    """Every top-level field name some lenient framework may read in a whole form or JSON body:
    the union over the texts of :func:`_readings`; for a form, fields split on ``&`` and on
    ``;`` (older Rack, Go and Python split on both), names decoded as UTF-8 and as Latin-1. A
    reading no reader takes (not JSON) gives no names, as it gives them none."""
    names: set[str] = set()
    for text in _readings(raw):
        # Both readings where both apply: Laravel reads any type holding /json as JSON, even a
        # form type whose parameter holds it, which Express and Rack read as a form.
        if _read_as_json(content_type):
            try:
                value = _lenient_json.decode(text.lstrip("\ufeff"))
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, _Pairs):
                names.update(k for k, _ in value)
        if _read_as_form(method, content_type):
            for field in _FORM_SEPARATORS.split(text):
                name = field.split("=", 1)[0]
                names.add(unquote_plus(name, encoding="utf-8", errors="replace"))
                names.add(unquote_plus(name, encoding="latin-1"))
    return frozenset(names)


def body_field_names(
    method: str,
    content_type: str | None,
    content_encoding: str | None,
    body: Any,
    raw_body: bytes | None,
) -> frozenset[str] | None:
    """The top-level field names of a non-empty body as frameworks that merge body and query
    read them: a JSON object's members (``body``, as parsed), a form's fields (read from
    ``raw_body``); empty for a body of another type; None for a form, multipart or JSON body
    that cannot be read here (not held, under a content coding, multipart, or in a charset the
    names are not read in)."""
    if not (
        _read_as_form(method, content_type)
        or _read_as_json(content_type)
        or _is_multipart_form(content_type)
    ):
        return frozenset()
    if is_encoded(content_encoding):
        return None
    if isinstance(body, dict):
        return frozenset(body)
    if (
        raw_body is None
        or _is_multipart_form(content_type)
        or not _readable_charset(method, content_type)
    ):
        return None
    return _top_level_names(raw_body, method, content_type)


def refuse_method_override(
    method: str, content_type: str | None, raw: bytes, content_encoding: str | None = None
) -> None:
    """Raise ``invalid_request`` for a whole POST body that carries a ``_method`` field, however
    spelled or encoded (``%5Fmethod``, ``_method[]``, `` _method``, ``"\\u005fmethod"``), or that
    may carry one under a content coding (body-parser inflates gzip before Express reads
    ``req.body._method``)."""
    if not raw or not overrides_method(method, content_type):
        return
    refuse_coded_override(content_encoding)
    if _is_multipart_form(content_type):
        watch = MethodOverrideWatch(content_type)
        watch.feed(raw)
        return
    if not _readable_charset(method, content_type):
        raise InvalidRequest(
            "a POST form or JSON body may carry a _method override, which the gateway reads only "
            "in UTF-8 (a form also in ISO-8859-1 or Windows-1252); send it so labelled"
        )
    names = _top_level_names(raw, method, content_type)
    if _overrides(names):
        raise InvalidRequest(_OVERRIDE_REFUSED)


def refuse_coded_override(content_encoding: str | None) -> None:
    """Raise ``invalid_request`` for a content coding on a body that may carry a method
    override (see :func:`overrides_method`): the gateway cannot read the field in coded bytes."""
    if is_encoded(content_encoding):
        raise InvalidRequest(
            "a POST form, multipart or JSON body may carry a _method override, which the gateway "
            "cannot read under a content coding; send it without a content-encoding"
        )


#: python-multipart logs a warning for each malformed body it is given; a client's bodies must not
#: fill the gateway's log (the refusal itself is audited).
logging.getLogger("python_multipart").setLevel(logging.ERROR)
_WHITESPACE: Final = b"\r\n \t"
#: RFC 2046 §5.1.1 boundary characters, without the space every parser reads its own way.
_BOUNDARY: Final = re.compile(rb"[0-9A-Za-z'()+_\-./:=?]{1,70}")
_MULTIPART_UNREADABLE: Final = (
    "the multipart/form-data body cannot be read the one way every server reads it; send a "
    "well-formed one (CRLF line ends, no preamble or epilogue, every part named)"
)


def _loose_names(disposition: bytes) -> list[str]:
    """Every name a ``Content-Disposition`` value may give its part to some parser: each
    ``name``, ``name*`` or ``name*0`` parameter, unquoted (double or single quotes), without
    backslash escapes, an RFC 5987 charset prefix or percent-encoding, cut at a NUL. Splitting on
    ``;`` inside a quoted value only adds candidates."""
    # Older Rack took the last ``\sname=`` anywhere on the line, inside a quoted value too.
    names = [
        unquote_to_bytes(m).decode("utf-8", "replace")
        for m in re.findall(rb"\sname\*?\s*=\s*[\"']?([^\"';]*)", disposition, re.IGNORECASE)
    ]
    for segment in disposition.split(b";")[1:]:
        key, eq, value = segment.partition(b"=")
        if not eq or key.strip().lower().rstrip(b"*0123456789") != b"name":
            continue
        value = value.strip().strip(b"\"'").replace(b"\\", b"")
        if b"''" in value:
            value = value.split(b"''", 1)[1]
        names.append(unquote_to_bytes(value).decode("utf-8", "replace"))
    return names


class MethodOverrideWatch:
    """Reads a ``multipart/form-data`` body as it streams (python-multipart's parser) and raises
    ``invalid_request`` at the part header naming a ``_method`` field, before the chunk holding
    it is passed on: the upstream never receives a whole body carrying the override (a framework
    reads every part before it dispatches).

    Parsers disagree at the edges, so only a body they read alike passes: one ``boundary``
    parameter (Rack takes the last, PHP the first), every part named (Rack names an unnamed part
    by its ``Content-ID``), nothing but line ends after the closing delimiter (PHP and Rack read
    parts placed there), and nothing python-multipart refuses (a preamble, bare LF line ends,
    folded headers)."""

    def __init__(self, content_type: str | None) -> None:
        if (content_type or "").lower().count("boundary") > 1:
            raise InvalidRequest(_MULTIPART_UNREADABLE)
        _, params = parse_options_header(content_type or "")
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidRequest("a multipart/form-data body needs a boundary parameter")
        if not _BOUNDARY.fullmatch(boundary):
            # Rack stops a boundary at ',', ';' or '"' even inside quotes: it would split the body
            # on another delimiter than this parser.
            raise InvalidRequest(_MULTIPART_UNREADABLE)
        self._form_data = (content_type or "").split(";")[0].strip().lower() == (
            "multipart/form-data"
        )
        self._close = b"\r\n--" + boundary + b"--"
        self._tail = b""
        self._started = False
        self._closed = False
        self._named = False
        self._field, self._value = bytearray(), bytearray()
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_field,
                "on_header_value": self._on_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
            },
        )

    def _on_part_begin(self) -> None:
        self._named = False

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        field_name, value = bytes(self._field).strip().lower(), bytes(self._value)
        self._field.clear()
        self._value.clear()
        lowered = value.lower()
        if b"content-disposition:" in lowered or b"content-id:" in lowered:
            # Rack 2 matched these over the whole header block, inside another field's value too.
            raise InvalidRequest(_MULTIPART_UNREADABLE)
        # Older Rack found the name anywhere in the part's headers (``X-Content-ID`` too).
        if field_name.endswith(b"content-id"):
            # Rack names a part without a Content-Disposition name by its Content-ID.
            names = [
                unquote_to_bytes(v).decode("utf-8", "replace")
                for v in (value.strip(), value.strip().strip(b"<>"))
            ]
            if _overrides(names):
                raise InvalidRequest(_OVERRIDE_REFUSED)
            return
        if not field_name.endswith(b"content-disposition"):
            return
        _, params = parse_options_header(value)
        names = _loose_names(value)
        if b"name" in params:
            names.append(params[b"name"].decode("utf-8", "replace"))
        self._named = self._named or bool(names)
        if _overrides(names):
            raise InvalidRequest(_OVERRIDE_REFUSED)

    def _on_headers_finished(self) -> None:
        # A form's parts are named (RFC 7578 §4.2); multipart/related or mixed parts often not.
        if self._form_data and not self._named:
            raise InvalidRequest(_MULTIPART_UNREADABLE)

    def feed(self, chunk: bytes) -> None:
        """Read the next bytes of the body; raises before returning if they name ``_method``,
        or carry anything but line ends after the closing delimiter."""
        if self._closed:
            if chunk.strip(_WHITESPACE):
                raise InvalidRequest(_MULTIPART_UNREADABLE)
            return
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise InvalidRequest(_MULTIPART_UNREADABLE) from None
        data = self._tail + chunk
        rest: bytes | None = None
        if not self._started and data.startswith(self._close[2:]):
            rest = data[len(self._close) - 2 :]  # a closing delimiter first: no part at all
        else:
            at = data.find(self._close)
            if at >= 0:
                rest = data[at + len(self._close) :]
        self._started = self._started or bool(data)
        if rest is not None:
            self._closed = True
            if rest.strip(_WHITESPACE):
                raise InvalidRequest(_MULTIPART_UNREADABLE)
        self._tail = data[-(len(self._close) - 1) :]
