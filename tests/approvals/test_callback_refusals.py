"""Every callback the control plane refuses before a decision is audited: an unknown or wrong
kind of channel and an oversized body too, not only a bad signature."""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.applications import Starlette

from aegis.server.approvals_public import approval_routes
from tests.approvals.conftest import make_setup
from tests.gateway.harness import serve

CHANNELS = """
  channels:
    slack: {kind: slack, url: 'http://127.0.0.1:9/hook', secret: s3cr3t}
    teams: {kind: teams, url: 'http://127.0.0.1:9/hook', secret: dGVhbXNzZWNyZXQ=}
"""


def test_refused_callbacks_are_all_audited(tmp_path: Path) -> None:
    s = make_setup(tmp_path, CHANNELS)
    try:
        s.services.extras["approvals"] = s.service
        app = Starlette(routes=approval_routes(s.services))
        big = b"x" * (s.config.server.max_body_bytes + 1)
        with serve(app) as url:
            answers = [
                httpx.post(f"{url}/approvals/slack/slack", content=big),
                httpx.post(f"{url}/approvals/slack/nosuch", content=b"payload=%7B%7D"),
                httpx.post(f"{url}/approvals/teams/slack", content=b"{}"),  # a Slack channel
                httpx.post(f"{url}/approvals/slack/slack", content=b"payload=%7B%7D"),
            ]
        codes = [a.json()["code"] for a in answers]
        assert codes[0] == "payload_too_large" and codes[3] == "callback_unsigned", codes
        rejected = s.audited("approval.rejected")
        assert [r["code"] for r in rejected] == codes
        assert [r["channel"] for r in rejected] == ["slack", "slack", "teams", "slack"]
    finally:
        s.service.close()
        s.audit.close()


def test_refusals_at_the_status_url_are_counted_and_audited(tmp_path: Path) -> None:
    """The URL an agent fetches its override from is where a forged or garbage credential, or
    another agent guessing ids, is tried: each refusal there is counted and audited, the
    caller's id cut short."""
    from aegis.audit.log import AuditLog
    from aegis.telemetry.metrics import REGISTRY
    from tests.approvals.conftest import APPROVERS_YAML
    from tests.support.server import run_server

    def rejected(code: str) -> float:
        return REGISTRY.get_sample_value("aegis_approval_rejections_total", {"code": code}) or 0.0

    with run_server(tmp_path, APPROVERS_YAML) as srv:
        token = srv.services.issuer.issue(
            agent_id="a", client_id="c", tenant="acme", env="prod", scopes=(),
            audience=("aegis",), lifetime=60,
        ).token  # fmt: skip
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        before = rejected("invalid_signature"), rejected("unauthenticated")
        signatures = REGISTRY.get_sample_value("aegis_failed_signature_verifications_total") or 0
        long_id = "apr_" + "x" * 5000
        answers = [
            httpx.get(
                f"{srv.url}/approvals/{long_id}", headers={"authorization": f"Bearer {forged}"}
            ),
            httpx.get(f"{srv.url}/approvals/apr_x", headers={"authorization": "Basic eA=="}),
        ]
        assert [a.status_code for a in answers] == [401, 401]
        assert (rejected("invalid_signature"), rejected("unauthenticated")) == (
            before[0] + 1, before[1] + 1)  # fmt: skip
        assert (
            REGISTRY.get_sample_value("aegis_failed_signature_verifications_total")
            == signatures + 1
        )
        audit = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        try:
            records = list(audit.records(kind="approval.rejected"))
        finally:
            audit.close()
        assert [(r["code"], r["channel"]) for r in records] == [
            ("invalid_signature", "status"), ("unauthenticated", "status")]  # fmt: skip
        assert len(records[0]["id"]) == 128
