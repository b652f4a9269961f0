"""Redis goes away in the middle of a bounded load loop through the real gateway: every call during
the outage is a 503 (none allowed), and the gateway answers again by itself within 5 s of Redis
returning. A TCP relay stands in front of the real Redis and is cut and restored; the Redis server
itself is never stopped."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from redis.asyncio.connection import parse_url
from tests.contracts.test_redis_recovery import Relay
from tests.gateway.harness import Upstream, serve, serve_here
from tests.gateway.helpers import mint_proof
from tests.integration.test_gateway_replicas import agent_token, payments_settings
from tests.support.gateway_process import start_gateway, stop_gateway
from tests.support.server import free_port, write_dev_config

from aegis.config import load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.policy.store import MemoryPolicyStore
from aegis.server.services import build_services

pytestmark = [pytest.mark.slow, pytest.mark.redis]

PUBLIC = "https://gw.example.com"


@asynccontextmanager
async def relayed_redis(
    redis_url: str, redis_prefix: str
) -> AsyncIterator[tuple[Relay, dict[str, str]]]:
    """A relay in front of the test Redis, and the environment that points Aegis's replay and
    revocation stores at it; the relay is stopped at the end."""
    target = parse_url(redis_url)
    relay = Relay(str(target.get("host", "127.0.0.1")), int(target.get("port", 6379)))
    await relay.start()
    via = f"redis://127.0.0.1:{relay.port}/0"
    try:
        yield (
            relay,
            {
                "AEGIS_STORES__REPLAY": via,
                "AEGIS_STORES__REVOCATION": via,
                "AEGIS_STORES__REDIS_PREFIX": f"'{redis_prefix}'",  # a YAML scalar
            },
        )
    finally:
        await relay.stop()


async def cut_and_restore(call: Callable[[], Awaitable[httpx.Response]], relay: Relay) -> None:
    """Ten calls through; the relay cut: fifteen calls, each a 503 from the store that went away;
    the relay back on the same port: answered again within 5 s, and ten calls through."""
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


def dpop_caller(
    client: httpx.AsyncClient, base: str, key: Ed25519SigningKey, token: str
) -> Callable[[], Awaitable[httpx.Response]]:
    """One paid call through the gateway at ``base``, each with a fresh proof."""

    async def call() -> httpx.Response:
        proof = mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
        headers = {"authorization": f"DPoP {token}", "dpop": proof}
        return await client.post(f"{base}/payments/charge", json={}, headers=headers)

    return call


async def test_outage_is_503_throughout_and_the_gateway_recovers_unaided(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    async with relayed_redis(redis_url, redis_prefix) as (relay, environ):
        # A patient reply budget: the gateway runs on this test's own event loop, and a stall
        # of the loop under load must not read as an outage (the outage itself is refused at once).
        environ |= {
            "AEGIS_STORES__REDIS_TIMEOUT": "2.0",
            "AEGIS_STORES__REDIS_CONNECT_TIMEOUT": "2.0",
        }
        config = load_config(write_dev_config(tmp_path, 8080), environ=environ)
        services = build_services(config)
        key, token = agent_token(services, "outage-payer")
        upstream = Upstream()
        try:
            with serve(upstream.app) as up:
                settings = payments_settings(up)
                pipeline = build_pipeline(services, settings, policy_store=MemoryPolicyStore())
                app = create_gateway_app(services, settings, pipeline=pipeline)
                async with serve_here(app) as gw, httpx.AsyncClient(timeout=5) as client:
                    await cut_and_restore(dpop_caller(client, gw, key, token), relay)
        finally:
            approvals = getattr(services.extras.get("approvals"), "close", None)
            if approvals is not None:
                approvals()
            await services.aclose()


async def test_the_same_outage_through_an_aegis_gateway_run_process(
    tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The same cut and restore, the gateway a real ``aegis gateway run`` process (its own event
    loop, the gateway's server settings and the default Redis timeouts)."""
    upstream = Upstream()
    proc = None
    async with relayed_redis(redis_url, redis_prefix) as (relay, environ):
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
            port, log = free_port(), tmp_path / "gateway.log"
            try:
                proc = start_gateway(config, environ, log, port=port)
                gw = f"http://127.0.0.1:{port}"
                async with httpx.AsyncClient(timeout=5) as client:
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
                    await cut_and_restore(dpop_caller(client, gw, key, token), relay)
            finally:
                stopped = proc is None or stop_gateway(proc)
                await services.aclose()
    assert stopped, "aegis gateway run did not stop on SIGTERM"
