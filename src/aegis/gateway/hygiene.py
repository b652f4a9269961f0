"""Header hygiene of an intermediary (RFC 9110 §7.6): which fields the reverse proxy forwards.

Hop-by-hop fields (RFC 9110 §7.6.1: ``Connection`` and every field it names, ``Keep-Alive``,
``Proxy-*``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``) are dropped both ways; so are
the caller's credentials for the gateway, and the answer fields that would steer a shared cache or
proxy in front of the gateway. Every answer is marked ``Cache-Control: private``: it is the
outcome of one caller's decision."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Final

__all__ = [
    "CONTROL_BYTE",
    "HOP_BY_HOP",
    "REQUEST_DROP",
    "RESPONSE_DROP",
    "forwardable",
    "joined",
    "marked_private",
    "steers_cache",
]


HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection"}
    | {"te", "trailer", "transfer-encoding", "upgrade"}
)
#: Request fields never forwarded: credentials for the gateway, fields the proxy sets itself, and
#: ``Expect``: the gateway answers ``100 Continue`` to the caller itself and sends the upstream a
#: body it already holds or streams, while an upstream that never sends ``100`` would hold the
#: forwarded request, unbounded by ``upstream_timeout``.
REQUEST_DROP: Final = frozenset({"authorization", "dpop", "host", "content-length", "expect"})
RESPONSE_DROP: Final = frozenset({"content-length", "server", "date"})
#: Answer fields that steer a cache or proxy in front of the gateway past ``Cache-Control:
#: private``: nginx's ``X-Accel-Expires`` overrides it (and ``X-Accel-Redirect`` makes nginx serve
#: another location), CDNs obey ``Surrogate-Control`` and ``CDN-Cache-Control`` or a CDN's own
#: ``*-CDN-Cache-Control`` (RFC 9213). None is meant for the caller; all are dropped.
_SHARED_CACHE_DROP: Final = frozenset({"surrogate-control", "cdn-cache-control"})
_SHARED_CACHE_PREFIX: Final = "x-accel-"
_SHARED_CACHE_SUFFIX: Final = "-cdn-cache-control"
#: A control character other than HTAB, which no field value may hold (RFC 9110 §5.5).
CONTROL_BYTE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def forwardable(pairs: Collection[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    """Headers safe to pass on: no hop-by-hop field, none named in ``Connection``, no ``Proxy``
    or ``proxy-*`` (a CGI upstream reads ``Proxy`` as ``HTTP_PROXY``, the proxy its own outgoing
    calls take: "httpoxy"), and no ``x-aegis-*``, each however spelled: CGI and WSGI servers read
    ``X_Aegis_Agent_Id`` as the same variable as ``X-Aegis-Agent-Id``, so a client's underscored
    copy would reach the upstream beside (and before) the identity the gateway sets."""
    named = {t.strip().lower() for k, v in pairs if k.lower() == "connection" for t in v.split(",")}
    out = []
    for k, v in pairs:
        name = k.lower()
        if name in HOP_BY_HOP or name in named or name in drop:
            continue
        norm = name.replace("_", "-")
        if norm == "proxy" or norm.startswith(("proxy-", "x-aegis-")):
            continue
        out.append((name, v))
    return out


def joined(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """One value per field, repeats joined as RFC 9110 §5.3 reads them (``Cookie`` with ``; ``,
    RFC 9113 §8.2.3): the upstream receives every value the policy saw, not only the last."""
    values: dict[str, list[str]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    return {
        k: v[0] if len(v) == 1 else ("; " if k == "cookie" else ", ").join(v)
        for k, v in values.items()
    }


def steers_cache(name: str) -> bool:
    """Whether an answer field (lowercased name) is meant for a cache or proxy in front of the
    gateway (:data:`_SHARED_CACHE_DROP`), however spelled (``X_Accel_Expires`` too)."""
    name = name.replace("_", "-")
    return (
        name in _SHARED_CACHE_DROP
        or name.startswith(_SHARED_CACHE_PREFIX)
        or name.endswith(_SHARED_CACHE_SUFFIX)
    )


def marked_private(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``headers`` with ``Cache-Control: private`` added unless a field already says
    ``private`` or ``no-store`` unqualified. Every answer is the outcome of one caller's
    decision; a shared cache in front of the gateway that stored it (RFC 9111 §3.5 lets it when
    the upstream says ``public``, even for a request with ``Authorization``) would serve it to
    another agent whose call is never decided. ``private="set-cookie"`` lets a shared cache
    store the rest, and a field with a quoted string is not read here: added then too (a second
    ``private`` is harmless, a missing one is not)."""
    said = {
        directive.strip().lower()
        for name, value in headers
        if name == "cache-control" and '"' not in value
        for directive in value.split(",")
    }
    return headers if said & {"private", "no-store"} else [*headers, ("cache-control", "private")]
