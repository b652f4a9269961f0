"""``aegis gateway run`` serving over mTLS as a real process (``pki.gateway_agent`` set).

The CA, the agents and a bearer token are made in this process over the same SQLite database and
CA files the gateway process reads. A caller with a valid agent certificate of that CA reaches the
upstream; one without a certificate is refused with ``cert_required`` on a route that requires
mTLS; one with a certificate from another CA (same trust domain, same agent name) is refused at
the handshake or with ``cert_required``. The process is stopped with SIGTERM in every case and
killed if it does not stop.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.gateway.harness import Upstream
from tests.gateway.harness import serve as serve_http
from tests.pki.harness import Result, fetch, pem
from tests.support.gateway_process import start_gateway, stop_gateway
from tests.support.server import free_port, write_dev_config

from aegis.clock import SystemClock
from aegis.config import load_config
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.service import PkiService
from aegis.pki.tls import client_context
from aegis.registry.service import AgentSpec
from aegis.server.services import Services, build_services
from aegis.types import ClientAuthMethod

pytestmark = pytest.mark.slow
TD = "cli-mtls.example"
#: A bound, not the expected time: on a loaded shared machine importing the CLI alone took ~5 s of
#: wall time and the whole test 8-11 s.
READY_WITHIN = 20.0


def _services(directory: Path, extra_yaml: str = "") -> tuple[Path, Services, PkiService]:
    directory.mkdir(exist_ok=True)
    path = write_dev_config(directory, free_port(), f"pki:\n  trust_domain: {TD}\n{extra_yaml}")
    config = load_config(path, environ={})
    CertificateAuthority.init(CaFiles.from_config(config), config.kek(), SystemClock(), TD)
    services = build_services(config)
    pki = services.extras["pki"]
    assert isinstance(pki, PkiService)
    for agent, roles in (("alpha", ()), ("gw", ("server",))):
        services.registry.register_agent(
            AgentSpec(agent, "acme", "prod", "owner@example.com",
                      allowed_scopes=("payments:write",), roles=roles),
            actor="test",
        )  # fmt: skip
    return path, services, pki


def _client(pki: PkiService, trust: PkiService, *, with_cert: bool = True) -> ssl.SSLContext:
    """A client context trusting ``trust``'s CA, presenting a certificate for alpha from ``pki``."""
    if not with_cert:
        return client_context(None, None, trust.ca.bundle_pem())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.issue("alpha", key.public_key()).certificate
    return client_context(pem(cert, pki.ca.current.cert), key, trust.ca.bundle_pem())


async def _wait_ready(
    proc: subprocess.Popen[bytes], port: int, ctx: ssl.SSLContext, log: Path
) -> None:
    deadline = time.monotonic() + READY_WITHIN
    while True:
        assert proc.poll() is None, f"aegis gateway run exited:\n{log.read_text()[-2000:]}"
        ready = await fetch(port, ctx, "/healthz", timeout=1.0)
        if ready.status == 200:
            return
        assert time.monotonic() < deadline, f"not serving mTLS within {READY_WITHIN} s: {ready}"
        await asyncio.sleep(0.1)


async def test_gateway_run_serves_mtls_to_agents_of_its_own_ca_only(tmp_path: Path) -> None:
    port = free_port()
    upstream = Upstream()
    with serve_http(upstream.app) as up:
        route = (
            f"{{path_prefix: /pay, upstream: '{up}', tool: pay_invoice, tenant: acme,"
            " env: prod, allow_bearer: true, require_client_cert: true}"
        )
        config, services, pki = _services(
            tmp_path,
            "  gateway_agent: gw\n"
            f"gateway:\n  port: {port}\n  routes:\n    - {route}\n"
            "  allow:\n    - {tool: pay_invoice}\n",
        )
        _, rogue_services, rogue = _services(tmp_path / "rogue")
        try:
            client, _ = services.registry.create_client(
                "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
            )
            token = services.issuer.issue(
                agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
                scopes=("payments:write",), audience=("aegis-gateway",), lifetime=60,
            ).token  # fmt: skip
            valid = _client(pki, pki)
            bare = _client(pki, pki, with_cert=False)
            foreign = _client(rogue, pki)
        finally:
            await rogue_services.aclose()
            await services.aclose()
        log = tmp_path / "gateway.log"
        proc = start_gateway(config, {}, log, local_stores=True)
        try:
            await _wait_ready(proc, port, valid, log)
            bearer = {"Authorization": f"Bearer {token}"}
            through = await fetch(port, valid, "/pay/charge", headers=bearer)
            without = await fetch(port, bare, "/pay/charge", headers=bearer)
            other_ca = await fetch(port, foreign, "/pay/charge", headers=bearer)
        finally:
            stopped = stop_gateway(proc, within=5)
        assert stopped, "aegis gateway run did not stop on SIGTERM"
    assert (through.status, through.body) == (200, {"ok": True, "card": "4111 1111 1111 1111"})
    assert (without.status, (without.body or {}).get("code")) == (401, "cert_required")
    assert _refused_or_cert_required(other_ca), other_ca
    assert len(upstream.seen) == 1  # only the call with a valid certificate reached the tool


def _refused_or_cert_required(result: Result) -> bool:
    if result.status is None:  # the handshake (or the first read, in TLS 1.3) failed
        return result.error is not None
    return (result.status, (result.body or {}).get("code")) == (401, "cert_required")
