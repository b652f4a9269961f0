"""A call without a certificate on a route that requires one (``require_client_cert``) is counted
in ``aegis_mtls_rejections_total`` and recorded as ``mtls.rejected``, as docs/pki.md says of every
refused certificate. At the gateway routes decide (the certificate step lets the call through),
and the pipeline's ``cert_required`` was recorded only as the call's refusal."""

from __future__ import annotations

from pathlib import Path

from aegis.config import GatewaySettings
from aegis.gateway.app import build_pipeline, create_gateway_app
from aegis.pki.middleware import MTLS_AUDIT_KIND
from aegis.types import ClientAuthMethod
from tests.gateway.harness import Upstream
from tests.gateway.harness import serve as serve_http
from tests.integration.test_mtls_gateway import world
from tests.pki.harness import fetch, rejections, serve


async def test_a_missing_certificate_on_an_mtls_route_is_counted_and_audited(
    tmp_path: Path,
) -> None:
    async with world(tmp_path) as w:
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
                    "routes": [{"path_prefix": "/pay", "upstream": up, "tool": "pay_invoice",
                                "tenant": "acme", "env": "prod", "allow_bearer": True,
                                "require_client_cert": True}],
                    "allow": [{"tool": "pay_invoice"}],
                }
            )  # fmt: skip
            pipeline = build_pipeline(w.services, settings)
            gateway = create_gateway_app(w.services, settings, pipeline=pipeline)
            before = rejections("gateway", "cert_required")
            async with (
                gateway.router.lifespan_context(gateway),
                serve(gateway, w.server_ctx(require=False), name="gw-req") as gw,
            ):
                bare = await fetch(
                    gw.port,
                    w.ctx(None, None),
                    "/pay/x",
                    headers={"Authorization": f"Bearer {token}"},
                )
        assert (bare.status, (bare.body or {}).get("code")) == (401, "cert_required")
        assert rejections("gateway", "cert_required") == before + 1, "cert_required not counted"
        log = pipeline.audit
        assert log is not None
        assert [r for r in log.records(kind=MTLS_AUDIT_KIND) if r["code"] == "cert_required"], (
            "cert_required not written as mtls.rejected"
        )
