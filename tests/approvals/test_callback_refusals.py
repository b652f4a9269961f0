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
