"""``/metrics`` is read only by the scrapers' addresses, over a real uvicorn socket: the counters
name tools, refusal codes and call volumes, which a prober should not read back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from aegis.config import GatewaySettings, ServerSettings, load_config
from aegis.gateway.app import create_gateway_app
from aegis.server.app import create_app
from aegis.server.services import build_services
from aegis.telemetry.scrape import metrics_endpoint
from tests.gateway.harness import serve
from tests.support.server import write_dev_config


def _app(clients: tuple[str, ...]) -> Starlette:
    return Starlette(
        routes=[Route("/metrics", metrics_endpoint(clients, "gateway.metrics_clients"))]
    )


@pytest.mark.parametrize("clients", [("127.0.0.0/8", "::1/128"), ("127.0.0.1",), ("0.0.0.0/0",)])
def test_metrics_are_served_to_a_listed_address(clients: tuple[str, ...]) -> None:
    with serve(_app(clients)) as base:
        answer = httpx.get(f"{base}/metrics")
    assert answer.status_code == 200
    assert "aegis_decisions_total" in answer.text


@pytest.mark.parametrize("clients", [(), ("10.0.0.0/8",), ("::1/128",), ("127.0.0.2",)])
def test_metrics_are_refused_to_any_other_address(clients: tuple[str, ...]) -> None:
    with serve(_app(clients)) as base:
        answer = httpx.get(f"{base}/metrics")
    assert answer.status_code == 403
    body = answer.json()
    assert body["code"] == "forbidden"
    assert "gateway.metrics_clients" in body["message"]
    assert "aegis_" not in answer.text


def test_both_listeners_default_to_loopback_and_refuse_what_is_not_a_network() -> None:
    assert GatewaySettings().metrics_clients == ServerSettings().metrics_clients
    assert GatewaySettings(metrics_clients=("10.1.2.0/24", "fd00::/8", "192.0.2.7")).metrics_clients
    for bad in ("prometheus.internal", "10.0.0.0/33", ""):
        with pytest.raises(ValueError, match="is not an IP address or network"):
            GatewaySettings(metrics_clients=(bad,))
        with pytest.raises(ValueError, match="is not an IP address or network"):
            ServerSettings(metrics_clients=(bad,))


def test_each_listener_serves_metrics_by_its_own_setting(tmp_path: Path) -> None:
    path = write_dev_config(tmp_path, 8080)
    env = {"AEGIS_SERVER__METRICS_CLIENTS": "[192.0.2.0/24]"}
    services = build_services(load_config(path, environ=env))
    try:
        gateway = GatewaySettings(metrics_clients=("192.0.2.0/24",))
        with (
            serve(create_app(services)) as control,
            serve(create_gateway_app(services, gateway)) as proxy,
            serve(create_gateway_app(services, GatewaySettings())) as default,
        ):
            refused = httpx.get(f"{control}/metrics").json()["message"]
            assert "server.metrics_clients" in refused
            refused = httpx.get(f"{proxy}/metrics").json()["message"]
            assert "gateway.metrics_clients" in refused
            assert httpx.get(f"{default}/metrics").status_code == 200
    finally:
        asyncio.run(services.aclose())


@pytest.mark.parametrize("field", ["X-Forwarded-For", "forwarded", "X-Real-IP", "x-forwarded-host"])
def test_metrics_are_not_served_through_a_proxy(field: str) -> None:
    """A proxy on this host (a sidecar nginx or Envoy) connects from loopback: what it passes on
    from anyone would pass the address check."""
    with serve(_app(("127.0.0.0/8",))) as base:
        answer = httpx.get(f"{base}/metrics", headers={field: "203.0.113.9"})
    assert answer.status_code == 403
    assert "proxy" in answer.json()["message"]


def test_metrics_are_not_served_to_a_trusted_proxys_address() -> None:
    app = Starlette(routes=[Route("/metrics", metrics_endpoint(
        ("127.0.0.0/8",), "gateway.metrics_clients", proxies=("127.0.0.1",)))])  # fmt: skip
    with serve(app) as base:
        answer = httpx.get(f"{base}/metrics")
    assert answer.status_code == 403 and "proxy" in answer.json()["message"]
