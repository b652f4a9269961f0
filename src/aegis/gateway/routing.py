"""Routes: which configured tool a request is for (RFC 9110 §7.2 Host, RFC 3986 §3.3 path).

Every front door (reverse proxy, HTTP and gRPC ext_authz) chooses the route with the same
:class:`RouteTable`, so that one request reaches the same tool, tenant and environment whichever
door it came in by. The route comes only from configuration, never from the request's own claims:
the host chooses first, compared without port and case-insensitively (a request to a host some
route names is matched only against that host's routes, as nginx server blocks and Envoy virtual
hosts choose; any other host only against the host-less routes), then the longest matching
``path_prefix`` wins, and a prefix matches whole segments (``/pay`` matches ``/pay`` and
``/pay/x``, never ``/payx``). The path given must already be vetted
(:func:`aegis.gateway.target.vet_path`).

Upstreams read paths more loosely than a byte comparison: Express matches case-insensitively,
Tomcat and Spring drop ``;parameters`` from segments, IIS drops trailing dots and spaces. A
request the gateway decided as one tool must not be served as another, so prefixes are compared
with the path as the loosest of them reads it (:func:`match_key`): ``/Admin;x/users`` and
``/admin./users`` are decided under the ``/admin`` route, not a shorter or catch-all one. Which
upstream gets the call is unchanged (the proxy forwards the target as sent). Rails also serves
``/admin.json`` as ``/admin`` and Express ``/admin/`` as ``/admin``, while other upstreams serve
them as other paths: a call whose reading without them falls under another route is refused
(:meth:`RouteTable.read_as_another`).

Behind the ext_authz doors the proxy in front (Envoy, nginx) chooses the upstream itself, on the
path compared exactly (:meth:`RouteTable.match_exact`): a call whose exact and loose readings
fall under different routes (``/PUBLIC/x`` sent to the catch-all's upstream, decided as
``/public``) is refused there.
"""

from __future__ import annotations

from collections.abc import Iterable

from aegis.config import GatewayRoute
from aegis.errors import InvalidRequest
from aegis.gateway.context import Route, route_from_settings
from aegis.policy.input import loose_path, path_variants, without_format

__all__ = ["RouteTable", "bare_host", "match_key"]

#: ``path`` as the loosest common upstream reads it, for choosing a route (policy sees the same
#: reading as ``path_loose``).
match_key = loose_path

_Entry = tuple[Route, str, str | None]


def bare_host(host: str) -> str:
    """``host[:port]`` without the port, lowercase; an IPv6 literal (``[::1]:80``) keeps its
    brackets. Only a port of digits (RFC 3986 §3.2.3 ``*DIGIT``) is removed, so that no other
    text after a ``:`` is dropped on the way to matching a route."""
    if host.startswith("["):
        literal, bracket, port = host.partition("]")
        if bracket and (
            not port or (port[:1] == ":" and port[1:].isascii() and port[1:].isdigit())
        ):
            return f"{literal}]".lower()
        return host.lower()
    name, colon, port = host.rpartition(":")
    if not (colon and port.isascii() and (port.isdigit() or not port)):
        name = host
    # One trailing dot names the same host (an absolute DNS name), and nginx drops it before it
    # picks a server block: ``admin.example.com.`` must choose admin.example.com's route, not
    # fall through to a host-less one on the same prefix.
    return name.lower().removesuffix(".")


def _prefix_readings(prefix: str) -> tuple[str, ...]:
    """A route prefix's variant readings (:func:`~aegis.policy.input.path_variants`), or only
    the first cut of its last segment (:func:`~aegis.policy.input.without_format`) for a prefix
    with more dots than a path may hold."""
    try:
        return path_variants(prefix)
    except InvalidRequest:
        return (without_format(prefix),)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + "/")


class RouteTable:
    """The configured routes, longest prefix first. As nginx server blocks and Envoy virtual
    hosts do, the host chooses first: a request to a host some route names is matched only
    against that host's routes, any other only against the host-less ones."""

    def __init__(self, routes: Iterable[GatewayRoute]) -> None:
        self._routes = sorted(
            (route_from_settings(r) for r in routes),
            key=lambda r: len(r.path_prefix.rstrip("/")),
            reverse=True,
        )
        #: Each route with its prefix and host as compared (match_key, bare_host).
        self._keys: list[_Entry] = [
            (r, match_key(r.path_prefix.rstrip("/")),
             None if r.host is None else bare_host(r.host))
            for r in self._routes
        ]  # fmt: skip
        #: Each prefix also as each of its own variant readings reads it (``/openapi.json`` as
        #: ``/openapi``, ``/api/v1.2.3`` as ``/api/v1.2`` and ``/api/v1``), for matching a
        #: path's variant readings: a variant falls under a route when it falls under any form
        #: (``/api/v1.2/items`` under ``/api/v1.2``, ``/openapi`` under ``/openapi.json``).
        self._cut_keys: list[_Entry] = [
            (r, cut, h)
            for r, prefix, h in self._keys
            if r.path_prefix != "/"
            for cut in _prefix_readings(prefix)
        ]
        self._hosts = frozenset(h for _, _, h in self._keys if h is not None)

    def _for_host(self, host: str, entries: list[_Entry] | None = None) -> list[_Entry]:
        bare = bare_host(host)
        wanted = bare if bare in self._hosts else None
        return [entry for entry in (self._keys if entries is None else entries)
                if entry[2] == wanted]  # fmt: skip

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, host: str, path: str) -> Route | None:
        """The route for a request to ``host`` (a Host header value) and decoded ``path``."""
        return self._match(self._for_host(host), match_key(path))

    @staticmethod
    def _match(entries: list[_Entry], key: str) -> Route | None:
        for r, prefix, _ in entries:
            if key == prefix or key.startswith(prefix + "/") or r.path_prefix == "/":
                return r
        return None

    def read_as_another(self, host: str, path: str, chosen: Route) -> str | None:
        """Why one of ``path``'s variant readings (:func:`~aegis.policy.input.path_variants`:
        without a trailing ``/``, cut at a dot of the last segment or after a script) falls
        under another route than ``chosen``, or None. Rails serves ``/admin.json`` as
        ``/admin``: when routes share that upstream, the call would be decided under the
        catch-all and served as admin. Refused rather than guessed, since an upstream that
        compares paths exactly serves it as the other."""
        try:
            variants = path_variants(match_key(path))
        except InvalidRequest as exc:
            return exc.message
        entries = self._for_host(host)
        cut = self._for_host(host, self._cut_keys)
        for variant in variants:
            # As match() would choose for the variant sent as it is; only when that finds
            # nothing but the catch-all, a route whose prefix holds a format (``/openapi``
            # under ``/openapi.json``).
            other = self._match(entries, variant)
            if other is None or other.path_prefix == "/":
                other = next((r for r, c, _ in cut if _under(variant, c)), other)
            if other is not chosen:
                there = "no route" if other is None else f"the route {other.path_prefix!r}"
                return (f"the path is {variant!r} to upstreams that drop a trailing '/' or a "
                        "'.format' (Rails, Express) or run a script (PHP), which falls under "
                        f"{there}, not the route {chosen.path_prefix!r} it falls under as sent; "
                        "send the path without them, or as the route spells it")  # fmt: skip
        return None

    def match_exact(self, host: str, path: str) -> Route | None:
        """The route ``path`` falls under when compared byte for byte, case-sensitively, as
        Envoy's ``path_separated_prefix`` and nginx's ``location /prefix/`` compare (a front proxy
        chooses the upstream that way, while :meth:`match` reads the path as upstreams do)."""
        for r, _, _ in self._for_host(host):
            if r.path_prefix.endswith("/"):  # Envoy's prefix "/payments/" is not "/payments"
                if path.startswith(r.path_prefix):
                    return r
                continue
            if path == r.path_prefix or path.startswith(r.path_prefix + "/"):
                return r
        return None

    def clash(self, host: str, path: str, chosen: Route) -> str | None:
        """A longer route prefix that ``path`` begins with as a string but not at a segment
        boundary (``/billingX`` against ``/billing``), if any. Envoy's ``prefix`` and nginx's
        ``location /billing`` match such a path as a string, so in front of them the call may be
        forwarded to that route's upstream while this table decides it as ``chosen``."""
        key = match_key(path)
        for r, prefix, _ in self._for_host(host):
            if r is chosen:
                return None  # the rest are shorter
            if r.path_prefix != "/" and key.startswith(prefix):
                return r.path_prefix
        return None
