"""Redis goes away in the middle of a bounded load loop through the real gateway: every call during
the outage is a 503 (none allowed), and the gateway answers again by itself within 5 s of Redis
returning. A TCP relay stands in front of the real Redis and is cut and restored; the Redis server
itself is never stopped."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis.asyncio.connection import parse_url
from tests.contracts.test_redis_recovery import Relay
from tests.gateway.harness import Upstream, serve, serve_here
from tests.gateway.helpers import mint_proof
from tests.integration.test_gateway_processes import start_gateway, stop_gateway
from tests.integration.test_gateway_replicas import agent_token
from tests.support.server import free_port, write_dev_config

from aegis.config import GatewaySettings, load_config
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PUBLIC = "https://gw.example.com"


async def test_outage_is_503_throughout_and_the_gateway_recovers_unaided(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    target = parse_url(redis_url)
    relay = Relay(str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
    await relay.start()
    via = f"redis://127.0.0.1:{relay.port}/0"
    environ = {
        "AEGIS_STORES__REPLAY": via,
        "AEGIS_STORES__REVOCATION": via,
        "AEGIS_STORES__REDIS_PREFIX": f"'{redis_prefix}'",
        # A patient reply budget: the gateway runs on this test's own event loop, and a stall
        # of the loop under load must not read as an outage (the outage itself is refused at once).
        "AEGIS_STORES__REDIS_TIMEOUT": "2.0",
        "AEGIS_STORES__REDIS_CONNECT_TIMEOUT": "2.0",
    }
    services = build_services(load_config(write_dev_config(tmp_path, 8080), environ=environ))
    key, token = agent_token(services, "outage-payer")
    upstream = Upstream()
    try:
        with serve(upstream.app) as up:
            settings = GatewaySettings.model_validate(
                {
                    "public_url": PUBLIC,
                    "routes": [{"path_prefix": "/payments", "upstream": up, "tool": "payments",
                                "tenant": "acme", "env": "prod"}],
                    "allow": [{"tool": "payments"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(services, settings, policy_store=MemoryPolicyStore())
            app = create_gateway_app(services, settings, pipeline=pipeline)
            async with serve_here(app) as gw, httpx.AsyncClient(timeout=5) as client:

                async def call() -> httpx.Response:
                    proof = mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
                    headers = {"authorization": f"DPoP {token}", "dpop": proof}
                    return await client.post(f"{gw}/payments/charge", json={}, headers=headers)

                for _ in range(10):
                    assert (await call()).status_code == 200
                await relay.stop()
                during: Counter[tuple[int, str]] = Counter()
                for _ in range(15):
                    resp = await call()
                    during[(resp.status_code, resp.json().get("code", ""))] += 1
                assert all(status == 503 for status, _ in during), during
                assert {code for _, code in during} <= {
                    "replay_store_unavailable", "revocation_store_unavailable"
                }  # fmt: skip
                await relay.start()  # the same port: "Redis is back"
                back = time.monotonic()
                while (await call()).status_code != 200:
                    assert time.monotonic() - back < 5.0, "the gateway did not recover within 5 s"
                    await asyncio.sleep(0.05)
                for _ in range(10):
                    assert (await call()).status_code == 200
    finally:
        approvals = getattr(services.extras.get("approvals"), "close", None)
        if approvals is not None:
            approvals()
        await services.aclose()
        await relay.stop()


async def test_the_same_outage_through_an_aegis_gateway_run_process(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The same cut and restore, the gateway a real ``aegis gateway run`` process (its own event
    loop, the gateway's server settings and the default Redis timeouts)."""
    target = parse_url(redis_url)
    relay = Relay(str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
    await relay.start()
    via = f"redis://127.0.0.1:{relay.port}/0"
    environ = {
        "AEGIS_STORES__REPLAY": via,
        "AEGIS_STORES__REVOCATION": via,
        "AEGIS_STORES__REDIS_PREFIX": f"'{redis_prefix}'",
    }
    upstream = Upstream()
    proc = None
    with serve(upstream.app) as up:
        config = write_dev_config(
            tmp_path,
            8080,
            f"gateway:\n  public_url: {PUBLIC}\n  routes:\n"
            f"    - {{path_prefix: /payments, upstream: '{up}', tool: payments,"
            " tenant: acme, env: prod}\n  allow:\n    - {tool: payments}\n",
        )
        services = build_services(load_config(config, environ=environ))
        key, token = agent_token(services, "outage-process-payer")
        port = free_port()
        log = tmp_path / "gateway.log"
        try:
            proc = start_gateway(config, port, environ, log)
            gw = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=5) as client:

                async def call() -> httpx.Response:
                    proof = mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
                    headers = {"authorization": f"DPoP {token}", "dpop": proof}
                    return await client.post(f"{gw}/payments/charge", json={}, headers=headers)

                deadline = time.monotonic() + 30
                while True:
                    assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-2000:]}"
                    try:
                        if (await client.get(f"{gw}/healthz", timeout=0.5)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "the gateway was not ready in 30 s"
                    await asyncio.sleep(0.1)
                for _ in range(10):
                    assert (await call()).status_code == 200
                await relay.stop()
                during: Counter[tuple[int, str]] = Counter()
                for _ in range(15):
                    resp = await call()
                    during[(resp.status_code, resp.json().get("code", ""))] += 1
                assert all(status == 503 for status, _ in during), during
                await relay.start()
                back = time.monotonic()
                while (await call()).status_code != 200:
                    assert time.monotonic() - back < 5.0, "the gateway did not recover within 5 s"
                    await asyncio.sleep(0.05)
                for _ in range(10):
                    assert (await call()).status_code == 200
        finally:
            if proc is not None:
                stop_gateway(proc)
            await services.aclose()
            await relay.stop()
