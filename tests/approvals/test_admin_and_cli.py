"""Deciding through the admin API (real HTTP, admin keys mapped to approvers) and the CLI
(``aegis approvals list|show|approve|deny|withdraw`` on the same database, as after a restart)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from itertools import count
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from aegis.approvals import ApprovalRequest, ApprovalService, build_approval_service
from aegis.cli.main import app
from aegis.config import Approver
from aegis.types import AdminRole
from tests.approvals.conftest import APPROVERS_YAML, FINANCE, held
from tests.support.server import RunningServer, run_server

pytestmark = pytest.mark.slow
_n = count()


@dataclasses.dataclass
class Admin:
    srv: RunningServer
    service: ApprovalService
    keys: dict[str, str]

    def hold(self, **kw: Any) -> ApprovalRequest:
        call = held(body_digest=f"sha256:{next(_n):064x}", **kw)
        return asyncio.run(self.service.hold(call, FINANCE))

    def post(self, path: str, key: str | None, body: Any = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[key]}"} if key else {}
        return httpx.post(f"{self.srv.url}/v1/admin/approvals{path}", json=body or {},
                          headers=headers)  # fmt: skip

    def get(self, path: str, key: str) -> httpx.Response:
        url = f"{self.srv.url}/v1/admin/approvals{path}"
        return httpx.get(url, headers={"Authorization": f"Bearer {self.keys[key]}"})


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    with run_server(tmp_path_factory.mktemp("admin"), APPROVERS_YAML) as srv:
        reg = srv.services.registry
        made = {
            name: reg.create_admin_key(name, role, actor="test")
            for name, role in (("carol", AdminRole.OPERATOR), ("stranger", AdminRole.OPERATOR),
                               ("auditor", AdminRole.AUDITOR))
        }  # fmt: skip
        # The operator's configuration lists carol's key id under her approver entry.
        cfg = srv.config.approvals
        approvers = tuple(
            a.model_copy(update={"admin_keys": (made["carol"][0].key_id,)})
            if a.id == "carol@example.com" else a
            for a in cfg.approvers
        )  # fmt: skip
        assert all(isinstance(a, Approver) for a in approvers)
        config = srv.config.model_copy(
            update={"approvals": cfg.model_copy(update={"approvers": approvers})}
        )
        service = build_approval_service(
            config, clock=srv.services.clock, keyring=srv.services.keyring,
            replay=srv.services.replay,
        )  # fmt: skip
        srv.services.extras["approvals"] = service
        yield Admin(srv, service, {n: secret for n, (_, secret) in made.items()})
        service.close()


def test_approver_key_approves_over_the_admin_api(admin: Admin) -> None:
    req = admin.hold()
    resp = admin.post(f"/{req.id}/approve", "carol", {"reason": "checked the invoice"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["state"], body["decided_by"], body["decided_via"]) == (
        "approved", "carol@example.com", "api")  # fmt: skip
    assert body["decision_reason"] == "checked the invoice"
    shown = admin.get(f"/{req.id}", "auditor").json()
    assert shown["state"] == "approved"
    listed = admin.get("?state=approved", "auditor").json()["items"]
    assert req.id in [r["id"] for r in listed]


@pytest.mark.parametrize(
    ("key", "path", "body", "status", "code"),
    [
        ("stranger", "/{id}/approve", None, 403, "approver_unknown"),
        ("auditor", "/{id}/approve", None, 403, "forbidden"),
        (None, "/{id}/approve", None, 401, "unauthenticated"),
        ("carol", "/apr_unknown/approve", None, 404, "approval_not_found"),
        ("carol", "/{id}/deny", {"reason": "x", "extra": 1}, 400, "invalid_request"),
    ],
)
def test_refused_admin_decisions(
    admin: Admin, key: str | None, path: str, body: Any, status: int, code: str
) -> None:
    req = admin.hold()
    resp = admin.post(path.format(id=req.id), key, body)
    assert (resp.status_code, resp.json()["code"]) == (status, code)
    assert admin.get(f"/{req.id}", "carol").json()["state"] == "pending"


class Cli:
    def __init__(self, admin: Admin) -> None:
        self.config = str(admin.srv.config.path("aegis.yaml"))
        self.runner = CliRunner()

    def run(self, *args: str) -> Any:
        return self.runner.invoke(app, ["--config", self.config, "approvals", *args])


def test_cli_list_show_approve_deny(admin: Admin) -> None:
    cli = Cli(admin)
    a, b = admin.hold(), admin.hold()
    listed = cli.run("list", "--state", "pending", "--json")
    assert listed.exit_code == 0, listed.output
    ids = [r["id"] for r in json.loads(listed.stdout)["items"]]
    assert {a.id, b.id} <= set(ids)
    shown = cli.run("show", a.id, "--json")
    assert json.loads(shown.stdout)["parameters"]["password"] == "[redacted]"
    approved = cli.run("approve", a.id, "--as", "carol@example.com", "--reason", "ok", "--json")
    assert approved.exit_code == 0, approved.output
    assert json.loads(approved.stdout)["decided_via"] == "cli"
    denied = cli.run("deny", b.id, "--as", "carol@example.com", "--reason", "too much")
    assert denied.exit_code == 0 and "denied" in denied.stdout
    assert cli.run("list").exit_code == 0


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("approve", "apr_missing", "--as", "carol@example.com"), "approval_not_found"),
        (("approve", "{id}", "--as", "owner@example.com"), "self_approval_forbidden"),
        (("approve", "{id}", "--as", "dave@example.com"), "approver_not_in_group"),
        (("deny", "{id}", "--as", "mallory@example.com"), "approver_unknown"),
        (("show", "apr_missing"), "approval_not_found"),
    ],
)
def test_cli_refusals_exit_non_zero_with_one_line(
    admin: Admin, args: tuple[str, ...], code: str
) -> None:
    req = admin.hold()
    result = Cli(admin).run(*(a.format(id=req.id) for a in args))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {code}: ")
    assert admin.get(f"/{req.id}", "carol").json()["state"] == "pending"


def test_an_approval_is_withdrawn_over_the_api_and_the_cli(admin: Admin) -> None:
    a, b = admin.hold(), admin.hold(query=(("to", "acct-9"),))
    for req in (a, b):
        assert admin.post(f"/{req.id}/approve", "carol").json()["state"] == "approved"
    # Over the API: only an approver's key; the request is denied after all.
    assert admin.post(f"/{a.id}/withdraw", "stranger").json()["code"] == "approver_unknown"
    done = admin.post(f"/{a.id}/withdraw", "carol", {"reason": "wrong account"}).json()
    assert (done["state"], done["decided_via"], done["decision_reason"]) == (
        "denied", "api", "wrong account"
    )  # fmt: skip
    again = admin.post(f"/{a.id}/withdraw", "carol")
    assert (again.status_code, again.json()["code"]) == (409, "approval_decided")
    # Over the CLI, and `show` lists the query the approval is bound to.
    cli = Cli(admin)
    shown = cli.run("show", b.id)
    assert shown.exit_code == 0 and 'query "to": "acct-9"' in shown.stdout
    withdrawn = cli.run("withdraw", b.id, "--as", "carol@example.com", "--json")
    assert withdrawn.exit_code == 0, withdrawn.output
    assert json.loads(withdrawn.stdout)["state"] == "denied"
    refused = cli.run("withdraw", b.id, "--as", "carol@example.com")
    assert refused.exit_code == 1 and "approval_decided" in refused.stderr
