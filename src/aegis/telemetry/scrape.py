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

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import REGISTRY

__all__ = ["metrics_endpoint"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def metrics_endpoint(
    clients: Iterable[str], setting: str
) -> Callable[[Request], Awaitable[Response]]:
    """A Starlette endpoint serving :data:`REGISTRY` to peers within ``clients`` (addresses or
    networks, validated by the configuration)."""
    networks: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in clients)

    def allowed(host: str | None) -> bool:
        try:
            addr = ipaddress.ip_address((host or "").strip("[]"))
        except ValueError:
            return False  # a unix socket or no address: not a known scraper
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in networks)

    async def metrics(request: Request) -> Response:
        host = request.client.host if request.client else None
        if not allowed(host):
            log_event("metrics.refused", level=logging.WARNING, client=host)
            return JSONResponse(
                {"error": "forbidden", "code": "forbidden",
                 "message": f"/metrics is served only to the addresses in {setting}; add the "
                            "scraper's address or network there"},
                status_code=403,
            )  # fmt: skip
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return metrics
