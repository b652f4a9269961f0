"""Forwarded-certificate headers are removed from every request however spelled: the
underscored ``X_SSL_Client_Cert``, which CGI and WSGI upstreams (and Envoy with underscores
allowed) read as ``X-SSL-Client-Cert``, passed the peer-certificate step and the reverse proxy
and reached the upstream tool; only the hyphenated names were removed."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization

from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.types import ClientAuthMethod
from tests.gateway.harness import Upstream
from tests.gateway.harness import serve as serve_http
from tests.integration.test_mtls_gateway import world
from tests.pki.harness import fetch, serve

FORWARDED = {"x-forwarded-client-cert", "x-ssl-client-cert"}


async def test_no_spelling_of_a_forwarded_certificate_reaches_the_upstream(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
        key, cert = w.cert("alpha")
        _, other = w.cert("beta")  # a public certificate of another agent
        other_pem = quote(other.public_bytes(serialization.Encoding.PEM).decode(), safe="")
        client, _ = w.services.registry.create_client(
            "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="test"
        )
        token = w.services.issuer.issue(
            agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=("aegis-gateway",), lifetime=60,
        ).token  # fmt: skip
        upstream = Upstream()
        with serve_http(upstream.app) as up:
            settings = GatewaySettings.model_validate(
                {
                    "routes": [{"path_prefix": "/docs", "upstream": up, "tool": "read_docs",
                                "tenant": "acme", "env": "prod", "allow_bearer": True}],
                    "allow": [{"tool": "read_docs"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(w.services, settings)
            gateway = create_gateway_app(w.services, settings, pipeline=pipeline)
            headers = {
                "Authorization": f"Bearer {token}",
                "X_Forwarded_Client_Cert": f'By=x;Hash=y;Cert="{other_pem}"',
                "X_SSL_Client_Cert": other_pem,
                # The hyphenated spellings are stripped (control).
                "X-Forwarded-Client-Cert": f'Cert="{other_pem}"',
            }
            async with (
                gateway.router.lifespan_context(gateway),
                serve(gateway, w.server_ctx(require=False), name="gw-spell") as gw,
            ):
                answer = await fetch(gw.port, w.ctx(key, cert), "/docs/x", headers=headers)
        assert answer.status == 200, answer
        [seen] = upstream.seen
        smuggled = sorted(k for k in seen["headers"] if k.replace("_", "-") in FORWARDED)
        assert smuggled == [], f"forwarded-certificate headers reached the upstream: {smuggled}"
