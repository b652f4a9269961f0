"""``POST /v1/policy/dry-run``: operators see a decision and its trace; nothing is stored."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from aegis.config import load_config
from aegis.policy import SqlPolicyStore, load_file
from aegis.server.app import create_app
from aegis.server.services import build_services
from aegis.types import AdminRole
from tests.support.server import write_dev_config

POLICY = Path(__file__).parents[2] / "examples" / "policies" / "payments.yaml"
# A weekday at 10:00 in London, to an account of the expected form.
SMALL = {
    "tool": "payments.transfer",
    "scopes": ["payments:write"],
    "body": {"amount": 100, "account": "GB1234567890"},
    "time": 1736935200,
}
LARGE = {**SMALL, "body": {"amount": 9000, "account": "GB1234567890"}}


@pytest.fixture
async def call(tmp_path: Path) -> AsyncIterator[Any]:
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    services = build_services(config)
    keys = {
        role: services.registry.create_admin_key(role.value, role, actor="test")[1]
        for role in AdminRole
    }
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://aegis.test") as http:

            async def post(role: AdminRole | None, body: object) -> httpx.Response:
                headers = {"Authorization": f"Bearer {keys[role]}"} if role else {}
                return await http.post("/v1/policy/dry-run", json=body, headers=headers)

            post.database_url = config.database_url()  # type: ignore[attr-defined]
            yield post
    finally:
        await services.aclose()


async def test_a_posted_document_is_decided_and_traced(call: Any) -> None:
    document = yaml.safe_load(POLICY.read_text())
    small = await call(AdminRole.OPERATOR, {"policy": document, "input": SMALL})
    assert small.status_code == 200, small.text
    assert small.json()["decision"]["action"] == "allow"
    large = (await call(AdminRole.ADMIN, {"policy": document, "input": LARGE})).json()
    assert large["decision"]["action"] == "approval_needed"
    trace = {rule["id"]: rule for rule in large["trace"]}
    assert trace["payments-approve-large"]["matched"]
    assert not trace["payments-allow-small"]["matched"]


async def test_stored_and_active_versions(call: Any) -> None:
    store = SqlPolicyStore(call.database_url)
    try:
        version = store.put(load_file(POLICY), now=1.0)
        by_version = await call(AdminRole.OPERATOR, {"version": version, "input": LARGE})
        assert by_version.json()["policy_version"] == version
        scope = {"tenant": "acme", "env": "prod", "input": LARGE}
        none_active = await call(AdminRole.OPERATOR, scope)
        assert none_active.status_code == 404 and none_active.json()["code"] == "not_found"
        store.activate("acme", "prod", version, actor="test", now=2.0)
        active = await call(AdminRole.OPERATOR, scope)
        assert active.json()["policy_version"] == version
        assert active.json()["decision"]["action"] == "approval_needed"
        assert store.active("acme", "prod") is not None and len(store.versions()) == 1
    finally:
        store.close()


async def test_refusals(call: Any) -> None:
    document = yaml.safe_load(POLICY.read_text())
    assert (await call(None, {"policy": document, "input": SMALL})).status_code == 401
    auditor = await call(AdminRole.AUDITOR, {"policy": document, "input": SMALL})
    assert auditor.status_code == 403
    for body, field in [
        ({"policy": document}, "input"),
        ({"input": SMALL}, "policy"),
        ({"policy": document, "version": "v1", "input": SMALL}, "policy"),
        ({"tenant": "acme", "input": SMALL}, "policy"),
    ]:
        response = await call(AdminRole.OPERATOR, body)
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_request"
        assert response.json()["field"] == field
    broken = await call(AdminRole.OPERATOR, {"policy": {"kind": "Policy"}, "input": SMALL})
    assert broken.status_code == 400 and broken.json()["code"] == "policy_invalid"
    unknown = await call(AdminRole.OPERATOR, {"version": "nope", "input": SMALL})
    assert unknown.status_code == 404
