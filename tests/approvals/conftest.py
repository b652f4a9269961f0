"""Fixtures for the approval tests: a real SQLite setup with configured approvers, an approval
service on a frozen clock, held calls, and recording HTTP servers standing in for Slack, Teams and
generic webhooks (the only outside services; everything else is the real thing)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from aegis.approvals import ApprovalService, HeldCall, build_approval_service
from aegis.audit.log import AuditLog
from aegis.clock import FrozenClock
from aegis.config import AegisConfig, load_config
from aegis.policy.decision import ApprovalRequirement
from aegis.server.services import Services, build_services
from tests.gateway import conftest as gateway_fixtures
from tests.gateway.harness import serve
from tests.support.server import write_dev_config

APPROVERS_YAML = """
approvals:
  override_lifetime: 120
  delivery_attempts: 3
  delivery_backoff: 0.01
  delivery_timeout: 2
  approvers:
    - {id: carol@example.com, groups: [finance], slack_user: UCAROL, teams_user: aad-carol}
    - {id: dave@example.com, groups: [security], slack_user: UDAVE}
    - {id: Owner@Example.com, groups: [finance, security], slack_user: UOWNER}
"""
FINANCE = ApprovalRequirement(group="finance", channel="slack", expires_in=600)
#: The gateway's in-process fixture (services, pipeline, policies, audit), shared here.
env = gateway_fixtures.env


class Recorder:
    """A real HTTP server that records every request; the first ``fail_first`` answer 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_first = fail_first

        async def handler(request: Request) -> Response:
            body = await request.body()
            self.calls.append({"headers": dict(request.headers), "body": body,
                               "path": request.url.path})  # fmt: skip
            if len(self.calls) <= self.fail_first:
                return JSONResponse({"ok": False}, 500)
            return JSONResponse({"ok": True})

        self.app = Starlette(routes=[Route("/{p:path}", handler, methods=["POST"])])

    def messages(self) -> list[Any]:
        return [json.loads(c["body"]) for c in self.calls]

    def wait(self, n: int = 1, timeout: float = 5.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {n} calls, saw {len(self.calls)}")
            time.sleep(0.02)
        return self.messages()


@dataclasses.dataclass
class Setup:
    config: AegisConfig
    services: Services
    service: ApprovalService
    clock: FrozenClock
    audit: AuditLog

    def audited(self, kind: str) -> list[dict[str, Any]]:
        return list(self.audit.records(kind=kind))


def make_setup(directory: Path, extra_yaml: str = "") -> Setup:
    """A setup in ``directory``; a second one there reopens it (a restart: same keys, same
    database)."""
    path = directory / "aegis.yaml"
    if not path.exists():
        write_dev_config(directory, 8080, APPROVERS_YAML + extra_yaml)
    config = load_config(path, environ={})
    clock = FrozenClock(time.time())
    services = build_services(config, clock=clock)
    audit = AuditLog(config.database_url(), clock=clock)
    service = build_approval_service(
        config, clock=clock, keyring=services.keyring, replay=services.replay, audit=audit
    )
    return Setup(config, services, service, clock, audit)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = make_setup(tmp_path)
    yield s
    s.service.close()
    s.audit.close()


@pytest.fixture
def slack() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    with serve(rec.app) as url:
        yield rec, url


def held(**overrides: Any) -> HeldCall:
    base = HeldCall(
        decision_id="dec-1", tenant="acme", env="prod", agent_id="payer",
        agent_owner="owner@example.com", tool="payments", method="POST", path="/payments/charge",
        query=(("currency", "eur"),), body_digest="sha256:" + "ab" * 32,
        body={"amount": 12000, "account": "DE00 1234", "password": "hunter2"},
        rule_ids=("pay-large",), policy_version="sha256:v1", reasons=("large payment",),
    )  # fmt: skip
    return dataclasses.replace(base, **overrides)
