"""Routes: which configured tool a request is for (RFC 9110 §7.2 Host, RFC 3986 §3.3 path).

Every front door (reverse proxy, HTTP and gRPC ext_authz) chooses the route with the same
:class:`RouteTable`, so that one request reaches the same tool, tenant and environment whichever
door it came in by. The route comes only from configuration, never from the request's own claims:
the longest matching ``path_prefix`` wins, a route with a ``host`` matches only that host (without
port, case-insensitive), and a prefix matches whole segments (``/pay`` matches ``/pay`` and
``/pay/x``, never ``/payx``). The path given must already be vetted
(:func:`aegis.gateway.context.vet_path`).
"""

from __future__ import annotations

from collections.abc import Iterable

from aegis.config import GatewayRoute
from aegis.gateway.context import Route, route_from_settings

__all__ = ["RouteTable", "bare_host"]


def bare_host(host: str) -> str:
    """``host[:port]`` without the port, lowercase; an IPv6 literal (``[::1]:80``) keeps its
    brackets and is returned as given. Only a port of digits (RFC 3986 §3.2.3 ``*DIGIT``) is
    removed, so that no other text after a ``:`` is dropped on the way to matching a route."""
    if host.startswith("["):
        return host
    name, colon, port = host.rpartition(":")
    if not (colon and port.isascii() and (port.isdigit() or not port)):
        name = host
    # One trailing dot names the same host (an absolute DNS name), and nginx drops it before it
    # picks a server block: ``admin.example.com.`` must choose admin.example.com's route, not
    # fall through to a host-less one on the same prefix.
    return name.lower().removesuffix(".")


class RouteTable:
    """The configured routes, longest prefix first (host-specific before host-less on a tie)."""

    def __init__(self, routes: Iterable[GatewayRoute]) -> None:
        self._routes = sorted(
            (route_from_settings(r) for r in routes),
            key=lambda r: (len(r.path_prefix), r.host is not None),
            reverse=True,
        )

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, host: str, path: str) -> Route | None:
        """The route for a request to ``host`` (a Host header value) and decoded ``path``."""
        bare = bare_host(host)
        for r in self._routes:
            prefix = r.path_prefix.rstrip("/")
            if r.host is not None and r.host.lower().removesuffix(".") != bare:
                continue
            if path == prefix or path.startswith(prefix + "/") or r.path_prefix == "/":
                return r
        return None
