"""The call context (RFC 9110 request semantics): what every front door hands the decision pipeline.

A front door (reverse proxy, ext_authz, MCP proxy) translates its protocol into one
:class:`CallContext` and nothing else; the pipeline never looks at a framework request. Headers are
kept as an ordered list of ``(lowercase name, value)`` pairs, because how many times a header occurs
is itself checked (two ``Authorization`` or two ``DPoP`` headers are refused). The peer identity is
set only from a verified certificate (``aegis.pki.middleware``), never from client input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, unquote, unquote_plus, unquote_to_bytes

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from aegis.config import GatewayRoute
from aegis.crypto.jws import StrictJSONError, fold_name, strict_json
from aegis.errors import InvalidRequest
from aegis.pki.peer import PeerIdentity

__all__ = [
    "EMPTY_BODY_DIGEST",
    "MAX_FIELDS",
    "MAX_FIELD_BYTES",
    "METHODS",
    "REDIRECTING_FIELDS",
    "SINGLE_FIELDS",
    "STREAMED_BODY_DIGEST",
    "UPGRADE_REFUSED",
    "CallContext",
    "MethodOverrideWatch",
    "Route",
    "body_digest",
    "header_key",
    "is_encoded",
    "is_form_type",
    "is_json_type",
    "name_keys",
    "overrides_method",
    "parse_json_body",
    "proxy_claim",
    "query_key",
    "read_whole_for_override",
    "refuse_coded_override",
    "refuse_method_override",
    "refuse_redirecting_fields",
    "route_from_settings",
    "utf8_labelled",
    "vet_fields",
    "vet_path",
    "vet_query",
]

#: Methods a call may use at every front door (the proxy forwards them, ext_authz decides them);
#: anything else is answered 405 before any route is chosen.
METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
#: ``sha256:`` digest of an empty body.
EMPTY_BODY_DIGEST: Final = "sha256:" + hashlib.sha256(b"").hexdigest()
#: The body digest of a call whose body is streamed to the upstream without being buffered.
STREAMED_BODY_DIGEST: Final = "streamed"


def body_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass(frozen=True, slots=True)
class Route:
    """Where a call goes and what it is, from configuration (never from the request)."""

    path_prefix: str
    upstream: str
    tool: str
    tenant: str
    env: str
    host: str | None = None
    allow_bearer: bool = False
    #: An audience the token must carry for this route, besides the gateway's own.
    audience: str | None = None
    #: Calls without a verified peer certificate are refused (``cert_required``).
    require_client_cert: bool = False
    #: The SPIFFE ID an ``https`` upstream's certificate must name (None: any the CA issued).
    upstream_spiffe_id: str | None = None
    #: The key the upstream files a JSON body's members under (Rails ``wrap_parameters``).
    wrap_parameters: str | None = None


def route_from_settings(r: GatewayRoute) -> Route:
    return Route(
        r.path_prefix, r.upstream, r.tool, r.tenant, r.env, r.host, r.allow_bearer, r.audience,
        r.require_client_cert, r.upstream_spiffe_id, r.wrap_parameters,
    )  # fmt: skip


_HOST_FIELDS: Final = frozenset({"host", "x-forwarded-host"})


def _canonical_host(value: str) -> str:
    """``host[:port]`` as routes compare it: lowercase, without port or the trailing dot of an
    absolute DNS name (an IPv6 literal keeps its brackets)."""
    if value.startswith("["):
        literal, bracket, _ = value.partition("]")
        return f"{literal}]".lower() if bracket else value.lower()
    name, colon, port = value.rpartition(":")
    if colon and port.isascii() and port.isdigit():
        value = name
    return value.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class CallContext:
    """One call, as the pipeline sees it."""

    method: str
    #: The absolute URL the client addressed (scheme, host, path, query): DPoP ``htu`` is
    #: compared with it, and it is part of the request digest.
    url: str
    #: The Host header value (or the configured public host).
    host: str
    path: str
    route: Route
    #: ``(lowercase name, value)`` pairs in arrival order, repeats kept.
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    #: ``sha256:<hex>`` of the whole body, or :data:`STREAMED_BODY_DIGEST`.
    body_digest: str = EMPTY_BODY_DIGEST
    #: The parsed JSON body when it was small enough to buffer, else None.
    body: Any = None
    #: The raw buffered body (None when streamed).
    raw_body: bytes | None = b""
    #: Set only from a certificate validated by the PKI layer.
    peer: PeerIdentity | None = None
    client: str | None = None
    #: Whether the front door can apply sanitize obligations (rewrite the body, headers and the
    #: answer). An ext_authz door only answers allow or deny, so a sanitize decision with
    #: obligations is refused there (``policy_error``) rather than forwarded unsanitized.
    can_sanitize: bool = True
    #: Whether a field sent more than once may have arrived as one value joined with ``,``
    #: (Envoy's gRPC ``headers`` map): policy then cannot tell one value from several.
    fields_joined: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def body_hidden(self) -> bool:
        """The call has a body that policy does not see as JSON (streamed, over the buffering
        limit, or of another content type)."""
        if self.body_digest == EMPTY_BODY_DIGEST:
            return False
        if self.raw_body is None:
            return True
        ctype = coding = None
        for k, v in self.headers:  # the first of each, in one pass
            if k == "content-type" and ctype is None:
                ctype = v
            elif k == "content-encoding" and coding is None:
                coding = v
        return not is_json_type(ctype) or is_encoded(coding)

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in arrival order."""
        lname = name.lower()
        return [v for k, v in self.headers if k == lname]

    def header(self, name: str) -> str | None:
        lname = name.lower()
        return next((v for k, v in self.headers if k == lname), None)

    def policy_headers(self) -> dict[str, str]:
        """Single-valued view for the policy input (repeats joined by ``, `` per RFC 9110 §5.3);
        credentials are removed again by ``build_input``. ``host`` and ``x-forwarded-host`` are
        shown as routes compare them, lowercase and without port or trailing dot (RFC 3986
        §3.2.2: ``ADMIN.example.com.:443`` is admin.example.com), so that a rule on them holds
        for every spelling of the host."""
        values: dict[str, list[str]] = {}
        for k, v in self.headers:
            values.setdefault(k, []).append(_canonical_host(v) if k in _HOST_FIELDS else v)
        return {k: v[0] if len(v) == 1 else ", ".join(v) for k, v in values.items()}

    def body_names(self) -> frozenset[str] | None:
        """The top-level field names of the body as frameworks that merge body and query read
        them: a JSON object's members, a form's fields; empty for no body or one of another
        type; None for a form, multipart or JSON body the gateway did not read (not held, under
        a content coding, or multipart)."""
        if self.body_digest == EMPTY_BODY_DIGEST:
            return frozenset()
        content_type = next((v for k, v in self.headers if k == "content-type"), None)
        coding = next((v for k, v in self.headers if k == "content-encoding"), None)
        if not (
            _read_as_form(self.method, content_type)
            or _read_as_json(content_type)
            or _is_multipart_form(content_type)
        ):
            return frozenset()
        if is_encoded(coding):
            return None
        if isinstance(self.body, dict):
            return frozenset(self.body)
        if (
            self.raw_body is None
            or _is_multipart_form(content_type)
            or not _readable_charset(self.method, content_type)
        ):
            return None
        return _top_level_names(self.raw_body, self.method, content_type)

    def policy_query(self) -> dict[str, str | list[str]]:
        out: dict[str, str | list[str]] = {}
        for k, v in self.query:
            prev = out.get(k)
            if prev is None:
                out[k] = v
            elif isinstance(prev, list):
                prev.append(v)
            else:
                out[k] = [prev, v]
        return out


#: Request fields that make common upstream frameworks serve another method or target than the
#: request line's (Symfony, Laravel, Express method-override, IIS URL rewrite): policy would decide
#: a POST to /public that is served as a DELETE, or as /admin.
REDIRECTING_FIELDS: Final = frozenset(
    {"x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
     "x-rewrite-url"}
)  # fmt: skip


#: Why a request carrying ``Upgrade`` (RFC 9110 §7.8) is refused at every door: once the
#: connection switches protocols (a WebSocket, h2c), every later message reaches the upstream
#: without a decision.
UPGRADE_REFUSED: Final = (
    "protocol upgrades (WebSocket, h2c) are not allowed: after the switch no message would be "
    "decided; send each call as a plain HTTP request, without an Upgrade header"
)


#: Fields naming the client's address or the host it asked for that common upstream code
#: believes (Go chi's RealIP reads True-Client-IP, Rails' remote_ip Client-IP, CDNs set their
#: own), besides ``Forwarded``, ``X-Real-IP`` and ``X-Forwarded-*``.
PROXY_CLAIMS: Final = frozenset(
    {"forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "client-ip", "cf-connecting-ip",
     "x-cluster-client-ip", "fastly-client-ip", "x-original-forwarded-for", "x-host",
     "x-original-host", "x-proxyuser-ip"}
)  # fmt: skip


def proxy_claim(name: str) -> bool:
    """Whether a request field (lowercase name) is a claim about the client or the path through
    proxies (:data:`PROXY_CLAIMS`, ``X-Forwarded-*``, however spelled): from a caller it is
    unverified, and an upstream that believes it would take a spoofed address, scheme or host
    for the gateway's word. Every door shows policy its own ``X-Forwarded-For/Proto/Host``
    instead."""
    norm = name.replace("_", "-")
    return norm in PROXY_CLAIMS or norm.startswith("x-forwarded-")


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


def query_key(name: str) -> str:
    """The parameter a lenient server files ``name`` under: case-insensitively (ASP.NET Core,
    with :func:`~aegis.crypto.jws.fold_name`'s folding), without a ``[...]`` suffix (PHP and
    Node's qs read ``action[]`` as ``action``), and as PHP registers it: cut at a NUL, without
    leading spaces, with ``.`` and spaces as ``_``."""
    name = name.split("\x00", 1)[0].lstrip(" ")
    return fold_name(name.split("[", 1)[0].replace(".", "_").replace(" ", "_"))


def name_keys(name: str) -> frozenset[str]:
    """Every :func:`query_key` a lenient parser may file ``name`` under: as it is; without
    leading brackets and cut at the first bracket (Rack 2 and qs read ``[_method]`` as
    ``_method``); with an unclosed ``[`` as ``_`` (PHP reads ``account[id`` as ``account_id``);
    after its last ``.`` (ASP.NET Core binds ``t.amount`` to the ``amount`` of an action's
    parameter ``t``, ahead of a plain ``amount``); as the name in its last ``[...]`` (ASP.NET
    Core's jQuery form and query value providers read ``t[amount]`` as ``t.amount``); and each of
    these without a leading ``!`` (Spring's WebDataBinder binds ``!amount`` as ``amount`` when no
    ``amount`` is sent)."""
    base = name.split("\x00", 1)[0].lstrip(" ")
    keys = _keys(base)
    if base.startswith("!"):
        keys |= _keys(base[1:])
    return frozenset(keys)


def _keys(base: str) -> set[str]:
    keys = {query_key(base), query_key(_BRACKETS.split(base.lstrip("[]"), 1)[0])}
    if "." in base and (last := base.rsplit(".", 1)[1]):
        keys.add(query_key(last))
    if inner := [n for n in _BRACKETED.findall(base) if n]:
        keys.add(query_key(inner[-1]))
    opened = base.find("[")
    if opened >= 0 and "]" not in base[opened:]:
        # PHP turns that [ into _ and every later [ as well (transfer[max[amount is
        # transfer_max_amount).
        keys.add(query_key(base[:opened] + "_" + base[opened + 1 :].replace("[", "_")))
    return keys


_BRACKETS: Final = re.compile(r"[\[\]]")
_BRACKETED: Final = re.compile(r"\[([^\[\]]*)\]")


def _overrides(names: Iterable[str]) -> bool:
    """Whether any of ``names`` is read as ``_method`` by some parser (:func:`name_keys`)."""
    return any(METHOD_OVERRIDE in name_keys(name) for name in names)


def header_key(name: str) -> str:
    """The field a CGI or WSGI server files ``name`` under (``X_Account`` is ``x-account``)."""
    return name.lower().replace("_", "-")


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
        for extended, charset in _CHARSET.findall(content_type or "")
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


#: Header fields a request may carry, and their names and values in all (bytes): past these a
#: call is refused before anything is read (servers in front commonly allow 100 fields, 8-64 KiB).
MAX_FIELDS: Final = 256
MAX_FIELD_BYTES: Final = 64 * 1024
#: A character no field value may hold: a control character other than HTAB (h11 accepts
#: ``\x01``; a CR or LF left by a parser keeping an obs-fold), or one outside ASCII.
_UNSAFE_VALUE: Final = re.compile(r"[^\t\x20-\x7e]")
#: Fields the gateway and the upstream must read alike: sent once (policy would read the body by
#: one Content-Type, an upstream perhaps by the other), and never named in ``Connection``.
SINGLE_FIELDS: Final = frozenset({"host", "content-type", "content-length", "content-encoding"})
#: What ``Connection`` must not name: a field named there is dropped on the way (RFC 9110
#: §7.6.1), so the upstream would read the body without the type or coding policy read it by.
_NOT_HOP_BY_HOP: Final = SINGLE_FIELDS | {"transfer-encoding"}


#: A media type: ``type/subtype`` (RFC 9110 §8.3.1 tokens), then ``;parameters`` with no comma
#: outside a quoted value. One unambiguous pattern with possessive repeats (nothing is tried
#: twice), so matching stays linear on hostile input such as an unclosed quote of escapes.
_TOKEN: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]++"
_ONE_MEDIA_TYPE: Final = re.compile(
    rf'[ \t]*+{_TOKEN}/{_TOKEN}[ \t]*+(?:;(?:[^,"\\]++|"(?:[^"\\]++|\\.)*+")*+)?+'
)
#: A field value longer than this is no media type anyone sends.
_MAX_CONTENT_TYPE: Final = 1024
#: Every ``charset`` in a media type, wherever it stands (a parser that splits on ``,`` finds one
#: inside a quoted value): its RFC 2231 marks (``charset*=``, ``charset*0*=``) and its value.
_CHARSET: Final = re.compile(r'charset\s*+(\*[0-9*]*+)?\s*+=\s*+"?+([^";,\s]*+)', re.IGNORECASE)


def vet_fields(
    headers: tuple[tuple[str, str], ...],
) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """The request's fields (lowercase names) as the upstream receives them, without those a
    ``Connection`` header names, and the first value of each. Raises ``InvalidRequest`` where
    policy and an upstream could read the body or its labels differently: a field of
    :data:`SINGLE_FIELDS` sent twice or spelled with ``_``; a ``Connection`` naming one of them
    or ``Transfer-Encoding``; a ``Content-Type`` that is not one media type (or is over 1,024
    characters); a ``Transfer-Encoding`` other than ``chunked``, or one beside a
    ``Content-Length``; a value holding a control character other than HTAB or a character
    outside ASCII. An empty ``Content-Type`` is no type."""
    if len(headers) > MAX_FIELDS or sum(len(n) + len(v) for n, v in headers) > MAX_FIELD_BYTES:
        raise InvalidRequest(
            f"send at most {MAX_FIELDS} header fields of at most {MAX_FIELD_BYTES} bytes in all"
        )
    values: dict[str, str] = {}
    for name, value in headers:
        # isascii() reads a flag and isprintable() is one pass in C: a common value needs no regex.
        if not (value.isascii() and value.isprintable()) and (bad := _UNSAFE_VALUE.search(value)):
            raise InvalidRequest(_unsafe_value(name, bad.group()))
        if name not in values:
            values[name] = value
        elif name in SINGLE_FIELDS:
            raise InvalidRequest(f"send the {name} header once")
        if "_" in name and name.replace("_", "-") in _NOT_HOP_BY_HOP:
            # Older WSGI and CGI servers read Content_Type as CONTENT_TYPE, beside the real one.
            raise InvalidRequest(f"send {name.replace('_', '-')} spelled with a hyphen")
    ctype = values.get("content-type")
    if ctype is not None and not ctype.strip():
        ctype = None  # "Content-Type:" with nothing: no type, so the body is hidden from policy
    elif ctype is not None and (
        len(ctype) > _MAX_CONTENT_TYPE or not _ONE_MEDIA_TYPE.fullmatch(ctype)
    ):
        # "application/x-www-form-urlencoded, application/vnd.api+json" ends in +json for
        # policy, and is a form to Rack or PHP, which cut the list at ',' or ' '.
        raise InvalidRequest(
            "content-type must be one media type (type/subtype, then ;parameters), not a list"
        )
    coding = values.get("transfer-encoding")
    if coding is not None and coding.strip().lower() != "chunked":
        raise InvalidRequest("transfer-encoding may only be chunked; send the body uncoded")
    if coding is not None and "content-length" in values:
        # RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, but a server or proxy that
        # frames the body by the length would read another body, and another request after it.
        raise InvalidRequest(
            "send content-length or transfer-encoding, not both: servers and proxies could "
            "frame the body, and the requests after it, differently"
        )
    if "connection" not in values:
        return headers, values
    named = {t.strip() for k, v in headers if k == "connection" for t in v.lower().split(",")}
    named.discard("")
    kept = named & _NOT_HOP_BY_HOP
    if kept:
        raise InvalidRequest(
            f"the Connection header names {sorted(kept)[0]}, which the upstream must receive; "
            "do not name it there"
        )
    headers = tuple((k, v) for k, v in headers if k not in named)
    return headers, {k: v for k, v in values.items() if k not in named}


def _unsafe_value(name: str, char: str) -> str:
    """Why a field value holding ``char`` (see :data:`_UNSAFE_VALUE`) is refused."""
    if char.isascii():
        return (
            f"the {name[:64]} header holds a control character ({char!r}); servers strip, cut "
            "or keep it differently: send printable ASCII (and tabs) only"
        )
    return (
        f"the {name[:64]} header holds a byte outside ASCII; the gateway and the upstream could "
        "read it as other characters (Latin-1, UTF-8): send ASCII only, percent-encoded if need be"
    )


def is_json_type(content_type: str | None) -> bool:
    """``application/json`` or a ``+json`` structured syntax suffix (RFC 6839 §3.1)."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ctype == "application/json" or ctype.endswith("+json")


def is_encoded(content_encoding: str | None) -> bool:
    """Whether a body carries a content coding (RFC 9110 §8.4) other than ``identity``."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    return any(c not in ("", "identity") for c in codings)


def utf8_labelled(content_type: str | None) -> bool:
    """Whether ``content_type`` names no charset but UTF-8 (or its subset US-ASCII): text under
    any other label reads differently to the client than decoded here as UTF-8."""
    return all(
        not extended and charset.lower() in ("utf-8", "utf8", "us-ascii", "ascii")
        for extended, charset in _CHARSET.findall(content_type or "")
    )


def parse_json_body(
    raw: bytes,
    content_type: str | None,
    content_encoding: str | None = None,
    *,
    fold_case: bool = True,
) -> Any:
    """The JSON body for policy, or None when the body is not JSON (then policy sees null).

    A body under a content coding (``gzip``, ``br``, …) is not read: the upstream decodes it
    first and acts on what the coding yields, which need not be what the encoded bytes say read
    as JSON. Policy sees null, so a policy that reads the body refuses the call.

    A body that claims to be JSON and is not is refused: policy must never decide on a body the
    upstream would read differently. So is an object that repeats a member (RFC 8259 §4: "the
    behavior of software that receives such an object is unpredictable"): policy and
    sanitization would read the last ``amount``, an upstream may read the first. With
    ``fold_case`` (requests) so is one holding members that differ only in case.

    JSON is UTF-8 (RFC 8259 §8.1), or its subset US-ASCII when every byte is ASCII; a body labelled with another ``charset`` is refused: an
    upstream that decodes by the label (body-parser, Django) would read other text (UTF-7
    turns ``+ACI-`` into a quote) than policy read as UTF-8."""
    if not raw or not is_json_type(content_type) or is_encoded(content_encoding):
        return None
    for extended, charset in _CHARSET.findall(content_type or ""):  # a parser may take any
        # US-ASCII is UTF-8's subset: ASCII bytes read the same by either label; any other byte
        # is decoded differently (or not at all) by a reader that goes by the label.
        ascii_ok = charset.lower() in ("us-ascii", "ascii") and raw.isascii()
        if extended or not (ascii_ok or charset.lower() in ("utf-8", "utf8")):
            raise InvalidRequest(
                "a JSON body is UTF-8 (RFC 8259); send charset=utf-8 or none, not "
                f"{'charset' + extended + '=' + charset[:32]!r}"
            )
    try:
        return strict_json(raw.decode("utf-8"), fold_case=fold_case)
    except StrictJSONError as exc:
        raise InvalidRequest(f"the body {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None


#: Percent-encodings of ``/``, ``\\`` and ``%``: decoding them changes how the path splits into
#: segments, or leaves a second layer of encoding for the upstream to decode.
_RESEGMENTING: Final = re.compile(r"%(?:2f|5c|25)", re.IGNORECASE)
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
        # normalised.
        folded = unicodedata.normalize("NFKC", path)
        if folded != path and (
            folded.count("/") != path.count("/")
            or _CONTROL.search(folded)
            or any(_dots_only(seg) for seg in folded.split("/"))
        ):
            raise InvalidRequest(
                "the request path reads differently once Unicode-normalised (NFKC); "
                "send plain '.', '/' and '\\' only where they mean themselves"
            )
    return path
