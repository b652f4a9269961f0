"""What the gateway does with certificates a call carries, or lacks, behind the mTLS listener:

* forwarded-certificate headers are removed however spelled: the underscored
  ``X_SSL_Client_Cert``, which CGI and WSGI upstreams (and Envoy with underscores allowed) read
  as ``X-SSL-Client-Cert``, passed the peer-certificate step and the reverse proxy and reached
  the upstream tool; only the hyphenated names were removed;
* a call without a certificate on a route that requires one is counted in
  ``aegis_mtls_rejections_total`` and recorded as ``mtls.rejected``, as docs/pki.md says of every
  refused certificate; routes decide (the certificate step lets the call through), and the
  pipeline's ``cert_required`` was recorded only as the call's refusal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization

from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.gateway.pipeline import Pipeline
from aegis.pki.middleware import MTLS_AUDIT_KIND
from aegis.types import ClientAuthMethod
from tests.gateway.harness import Upstream
from tests.gateway.harness import serve as serve_http
from tests.integration.test_mtls_gateway import world
from tests.pki.harness import fetch, rejections, serve

FORWARDED = {"x-forwarded-client-cert", "x-ssl-client-cert"}


def _bearer(w: Any) -> str:
    """A bearer token of agent alpha for the gateway (routes below take bearer tokens)."""
    client, _ = w.services.registry.create_client(
        "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
    )
    return str(w.services.issuer.issue(
        agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
        scopes=("payments:write",), audience=("aegis-gateway",), lifetime=60,
    ).token)  # fmt: skip


@asynccontextmanager
async def _gateway(
    w: Any, upstream: Upstream, route: dict[str, Any]
) -> AsyncIterator[tuple[int, Pipeline]]:
    """The gateway behind the mTLS listener (certificate asked for, not required), with one
    route to ``upstream`` allowed; its port and pipeline."""
    with serve_http(upstream.app) as up:
        settings = GatewaySettings.model_validate({
            "routes": [{"upstream": up, "tenant": "acme", "env": "prod", "allow_bearer": True,
                        **route}],
            "allow": [{"tool": route["tool"]}],
        })  # fmt: skip
        pipeline = build_pipeline(w.services, settings)
        gateway = create_gateway_app(w.services, settings, pipeline=pipeline)
        async with (
            gateway.router.lifespan_context(gateway),
            serve(gateway, w.server_ctx(require=False), name="gw-certs") as gw,
        ):
            yield gw.port, pipeline


async def test_no_spelling_of_a_forwarded_certificate_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        key, cert = w.cert("alpha")
        _, other = w.cert("beta")  # a public certificate of another agent
        other_pem = quote(other.public_bytes(serialization.Encoding.PEM).decode(), safe="")
        headers = {
            "Authorization": f"Bearer {_bearer(w)}",
            "X_Forwarded_Client_Cert": f'By=x;Hash=y;Cert="{other_pem}"',
            "X_SSL_Client_Cert": other_pem,
            "X-Forwarded-Client-Cert": f'Cert="{other_pem}"',  # the hyphenated spelling too
        }
        upstream = Upstream()
        route = {"path_prefix": "/docs", "tool": "read_docs"}
        async with _gateway(w, upstream, route) as (port, _):
            answer = await fetch(port, w.ctx(key, cert), "/docs/x", headers=headers)
    assert answer.status == 200, answer
    [seen] = upstream.seen
    smuggled = sorted(k for k in seen["headers"] if k.replace("_", "-") in FORWARDED)
    assert smuggled == [], f"forwarded-certificate headers reached the upstream: {smuggled}"


async def test_a_missing_certificate_on_an_mtls_route_is_counted_and_audited(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        token = _bearer(w)
        before = rejections("gateway", "cert_required")
        route = {"path_prefix": "/pay", "tool": "pay_invoice", "require_client_cert": True}
        async with _gateway(w, Upstream(), route) as (port, pipeline):
            bare = await fetch(
                port, w.ctx(None, None), "/pay/x", headers={"Authorization": f"Bearer {token}"}
            )
        assert (bare.status, (bare.body or {}).get("code")) == (401, "cert_required")
        assert rejections("gateway", "cert_required") == before + 1, "cert_required not counted"
        log = pipeline.audit
        assert log is not None
        assert [r for r in log.records(kind=MTLS_AUDIT_KIND) if r["code"] == "cert_required"], (
            "cert_required not written as mtls.rejected"
        )
