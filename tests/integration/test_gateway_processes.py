"""Two ``aegis gateway run`` processes (the event loop, servers and start-up of a deployment)
sharing PostgreSQL and Redis behind one public URL: a DPoP proof spent at one is
``replay_detected`` at the other, and an agent suspended through the control plane (this test
process, writing to the same database) is refused by both within one second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.gateway.harness import Upstream, serve
from tests.gateway.helpers import mint_proof
from tests.integration.test_gateway_replicas import PUBLIC, agent_token
from tests.support.gateway_process import start_gateway, stop_gateway
from tests.support.server import free_port, write_dev_config

from aegis.config import load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.server.services import Services, build_services
from aegis.types import AgentStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]
READY_WITHIN = 30.0


@pytest.fixture
def gateways(
    tmp_path: Path, fresh_pg_url: str, redis_url: str, redis_prefix: str
) -> Iterator[tuple[Services, list[str]]]:
    environ = {
        "AEGIS_DATABASE__URL": fresh_pg_url,
        "AEGIS_STORES__REPLAY": redis_url,
        "AEGIS_STORES__REVOCATION": redis_url,
        "AEGIS_STORES__REDIS_PREFIX": f"'{redis_prefix}'",  # a YAML scalar
    }
    upstream = Upstream()
    with serve(upstream.app) as up:
        config = write_dev_config(
            tmp_path,
            8080,
            "gateway:\n"
            f"  public_url: {PUBLIC}\n"
            "  routes:\n"
            f"    - {{path_prefix: /payments, upstream: '{up}', tool: payments,"
            " tenant: acme, env: prod}\n"
            "  allow:\n    - {tool: payments}\n",
        )
        control = build_services(load_config(config, environ=environ))
        ports = [free_port(), free_port()]
        logs = [tmp_path / f"gateway-{i}.log" for i in range(2)]
        procs = [
            start_gateway(config, environ, log, port=p) for p, log in zip(ports, logs, strict=True)
        ]
        try:
            urls = [f"http://127.0.0.1:{p}" for p in ports]
            deadline = time.monotonic() + READY_WITHIN
            for proc, url, log in zip(procs, urls, logs, strict=True):
                while True:
                    assert proc.poll() is None, f"gateway exited:\n{log.read_text()[-2000:]}"
                    try:
                        if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, f"{url} not ready in {READY_WITHIN} s"
                    time.sleep(0.1)
            yield control, urls
        finally:
            stopped = [stop_gateway(proc) for proc in procs]
            asyncio.run(control.aclose())
        assert all(stopped), "an aegis gateway run process did not stop on SIGTERM"


def _call(
    base: str, key: Ed25519SigningKey, token: str, proof: str | None = None
) -> httpx.Response:
    proof = proof or mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
    headers = {"authorization": f"DPoP {token}", "dpop": proof}
    return httpx.post(f"{base}/payments/charge", json={"amount": 1}, headers=headers, timeout=5)


def test_a_proof_spent_at_one_process_is_replayed_at_the_other(
    gateways: tuple[Services, list[str]],
) -> None:
    control, (gw1, gw2) = gateways
    key, token = agent_token(control, "process-payer")
    for first, second in ((gw1, gw2), (gw2, gw1)):
        proof = mint_proof(key, "POST", f"{PUBLIC}/payments/charge", token=token)
        assert _call(first, key, token, proof).status_code == 200
        again = _call(second, key, token, proof)
        assert (again.status_code, again.json()["code"]) == (401, "replay_detected"), again.text


def test_an_agent_suspended_at_the_control_plane_is_refused_by_both_processes_within_1s(
    gateways: tuple[Services, list[str]],
) -> None:
    control, urls = gateways
    key, token = agent_token(control, "process-suspended")
    for gw in urls:
        assert _call(gw, key, token).status_code == 200
    control.registry.set_agent_status("process-suspended", AgentStatus.SUSPENDED, actor="test")
    started = time.monotonic()
    refused: dict[str, float] = {}
    while len(refused) < 2:
        for gw in urls:
            if gw in refused:
                continue
            sent = time.monotonic() - started
            resp = _call(gw, key, token)
            if resp.status_code != 200:
                assert resp.json()["code"] in ("agent_inactive", "token_revoked"), resp.text
                refused[gw] = sent
            else:
                assert sent <= 1.0, f"{gw} let a call sent {sent:.2f}s after the suspension through"
        time.sleep(0.02)
