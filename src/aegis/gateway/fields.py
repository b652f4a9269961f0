"""Request header fields (RFC 9110 §5): what every door refuses before policy reads a call.

Fields the gateway and the upstream could read differently are refused: a single field sent
twice, a ``Connection`` hiding the body's labels, ``Content-Length`` beside ``Transfer-Encoding``,
control characters or bytes outside ASCII, a ``Content-Type`` that is not one media type, a JSON
body in another charset. Callers' claims about the path through proxies are never believed."""

from __future__ import annotations

import re
from typing import Any, Final

from aegis.crypto.jws import StrictJSONError, strict_json
from aegis.errors import InvalidRequest

__all__ = [
    "CHARSET",
    "MAX_FIELDS",
    "MAX_FIELD_BYTES",
    "PROXY_CLAIMS",
    "SINGLE_FIELDS",
    "UPGRADE_REFUSED",
    "is_encoded",
    "is_json_type",
    "parse_json_body",
    "proxy_claim",
    "utf8_labelled",
    "vet_fields",
]


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


#: Fields a TLS-terminating proxy sets to pass on the client's certificate or its check: RFC
#: 9440's ``Client-Cert`` and ``Client-Cert-Chain``, nginx's and HAProxy's customary
#: ``X-SSL-Client-*``, IIS ARR's ``X-ARR-ClientCert``, AWS ALB's ``X-Amzn-Mtls-Clientcert*``.
CERTIFICATE_CLAIMS: Final = frozenset(
    {"x-ssl-cert", "x-arr-clientcert", "x-client-verify", "x-client-dn"}
)  # fmt: skip
#: ... and whole families: Apache mod_ssl's ``SSL_CLIENT_*`` (``SSL_CLIENT_S_DN``, the subject
#: upstreams authorise on), its ``X-`` spelling, RFC 9440's pair, AWS ALB's.
_CERTIFICATE_CLAIM_PREFIXES: Final = ("client-cert", "x-client-cert", "ssl-client-",
                                      "x-ssl-client-", "x-amzn-mtls-clientcert")  # fmt: skip


def proxy_claim(name: str) -> bool:
    """Whether a request field (lowercase name) is a claim about the client or the path through
    proxies (:data:`PROXY_CLAIMS`, ``X-Forwarded-*``, a client certificate a proxy vouches for
    (:data:`CERTIFICATE_CLAIMS`), however spelled): from a caller it is unverified, and an
    upstream that believes it would take a spoofed address, scheme, host or certificate for the
    gateway's word. Every door shows policy its own ``X-Forwarded-For/Proto/Host`` instead."""
    norm = name.replace("_", "-")
    return (
        norm in PROXY_CLAIMS
        or norm in CERTIFICATE_CLAIMS
        or norm.startswith(("x-forwarded-", *_CERTIFICATE_CLAIM_PREFIXES))
    )


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
CHARSET: Final = re.compile(r'charset\s*+(\*[0-9*]*+)?\s*+=\s*+"?+([^";,\s]*+)', re.IGNORECASE)


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
        for extended, charset in CHARSET.findall(content_type or "")
    )


def parse_json_body(
    raw: bytes,
    content_type: str | None,
    content_encoding: str | None = None,
    *,
    fold_case: bool = True,
    safe_integers: bool = False,
) -> Any:
    """The JSON body for policy, or None when the body is not JSON (then policy sees null).

    A body under a content coding (``gzip``, ``br``, …) is not read: the upstream decodes it
    first and acts on what the coding yields, which need not be what the encoded bytes say read
    as JSON. Policy sees null, so a policy that reads the body refuses the call.

    A body that claims to be JSON and is not is refused: policy must never decide on a body the
    upstream would read differently. So is an object that repeats a member (RFC 8259 §4: "the
    behavior of software that receives such an object is unpredictable"): policy and
    sanitization would read the last ``amount``, an upstream may read the first. With
    ``fold_case`` (requests) so is one holding members that differ only in case, and with
    ``safe_integers`` (a body policy reads) one holding an integer beyond +-2**53, which readers
    that hold numbers as doubles read as another.

    JSON is UTF-8 (RFC 8259 §8.1), or its subset US-ASCII when every byte is ASCII; a body labelled with another ``charset`` is refused: an
    upstream that decodes by the label (body-parser, Django) would read other text (UTF-7
    turns ``+ACI-`` into a quote) than policy read as UTF-8."""
    if not raw or not is_json_type(content_type) or is_encoded(content_encoding):
        return None
    for extended, charset in CHARSET.findall(content_type or ""):  # a parser may take any
        # US-ASCII is UTF-8's subset: ASCII bytes read the same by either label; any other byte
        # is decoded differently (or not at all) by a reader that goes by the label.
        ascii_ok = charset.lower() in ("us-ascii", "ascii") and raw.isascii()
        if extended or not (ascii_ok or charset.lower() in ("utf-8", "utf8")):
            raise InvalidRequest(
                "a JSON body is UTF-8 (RFC 8259); send charset=utf-8 or none, not "
                f"{'charset' + extended + '=' + charset[:32]!r}"
            )
    try:
        return strict_json(raw.decode("utf-8"), fold_case=fold_case, safe_integers=safe_integers)
    except StrictJSONError as exc:
        raise InvalidRequest(f"the body {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
