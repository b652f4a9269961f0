"""The ``/metrics`` endpoint, served only to the scrapers' addresses.

The counters name tools, refusal codes and call volumes per route: what an attacker probing a
gateway would like to read back. Each listener serves them to the networks its settings name
(``server.metrics_clients``, ``gateway.metrics_clients``; loopback by default) and answers anyone
else 403 ``forbidden``, whose message names the setting to change.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import REGISTRY

__all__ = ["metrics_endpoint"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


#: Fields a proxy adds on the way: a scraper talks to the listener directly, so a request that
#: carries one came through a proxy, and its peer address is the proxy's, not the client's.
_FORWARDED: Final = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip", b"x-forwarded-host"})


def _address(host: str | None) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return None  # a unix socket or no address: not a known scraper
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def metrics_endpoint(
    clients: Iterable[str], setting: str, *, proxies: Iterable[str] = ()
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving :data:`REGISTRY` to peers within ``clients`` (addresses or
    networks, validated by the configuration). A request from one of ``proxies`` (the
    listener's trusted proxies) or carrying a forwarding field is refused whatever its peer
    address: a proxy on this host would otherwise pass anyone's request on from loopback."""
    networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in clients)
    relays = frozenset(a for a in map(_address, proxies) if a is not None)

    def refusal(request: Request) -> str | None:
        addr = _address(request.client.host if request.client else None)
        if addr is None or not any(addr in net for net in networks):
            return (
                f"/metrics is served only to the addresses in {setting}; add the scraper's "
                "address or network there"
            )
        forwarded = any(name.lower() in _FORWARDED for name, _ in request.scope["headers"])
        if addr in relays or forwarded:
            return "/metrics is not served through a proxy; let the scraper connect directly"
        return None

    async def metrics(request: Request) -> Response:
        why = refusal(request)
        if why is not None:
            client = request.client.host if request.client else None
            log_event("metrics.refused", level=logging.WARNING, client=client)
            return JSONResponse(
                {"error": "forbidden", "code": "forbidden", "message": why}, status_code=403
            )
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return metrics
