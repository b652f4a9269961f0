"""Policy versions over the admin API: store, activate, audit events, and the OPA bundle that the
control plane serves (loaded into regorus and checked against the in-process evaluator)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import regorus
import yaml

from aegis.clock import FrozenClock
from aegis.config import load_config
from aegis.policy import PolicyWatcher, SqlPolicyStore, compile_policy, load_file, policy_version
from aegis.policy.input import build_input, call_from_dict
from aegis.policy.rego import DECISION_QUERY, to_rego
from aegis.server.app import create_app
from aegis.server.services import Services, build_services
from aegis.types import AdminRole
from tests.support.server import write_dev_config

POLICY = Path(__file__).parents[2] / "examples" / "policies" / "payments.yaml"
DOCUMENT: dict[str, Any] = yaml.safe_load(POLICY.read_text())
OTHER: dict[str, Any] = {
    "apiVersion": "aegis/v1",
    "kind": "Policy",
    "metadata": {"name": "crm-only"},
    "spec": {"rules": [{"id": "crm", "action": "allow", "match": {"tools": ["crm.*"]}}]},
}
LARGE = {
    "tool": "payments.transfer",
    "scopes": ["payments:write"],
    "body": {"amount": 9000, "account": "GB1234567890"},
    "time": 1736935200,
}


@dataclass
class Api:
    http: httpx.AsyncClient
    services: Services
    keys: dict[AdminRole, str]
    key_ids: dict[AdminRole, str]

    async def call(
        self, role: AdminRole | None, method: str, path: str, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        headers |= kw.pop("headers", {})
        return await self.http.request(method, f"/v1{path}", headers=headers, **kw)

    def events(self, type_: str) -> list[Any]:
        return [
            e for e in self.services.registry_store.list_events(limit=10_000) if e.type == type_
        ]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    services = build_services(config)
    keys, ids = {}, {}
    for role in AdminRole:
        key, secret = services.registry.create_admin_key(role.value, role, actor="test")
        keys[role], ids[role] = secret, key.key_id
    transport = httpx.ASGITransport(app=create_app(services))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://aegis.test") as http:
            yield Api(http, services, keys, ids)
    finally:
        await services.aclose()


OP, AUDITOR = AdminRole.OPERATOR, AdminRole.AUDITOR


async def test_stored_versions_are_content_addressed_and_audited(api: Api) -> None:
    first = await api.call(OP, "POST", "/policy/versions", json={"policy": DOCUMENT})
    assert first.status_code == 201, first.text
    version = first.json()["version"]
    assert version == policy_version(load_file(POLICY)) and first.json()["name"] == "payments"
    again = await api.call(OP, "POST", "/policy/versions", json={"policy": DOCUMENT})
    assert again.json()["version"] == version
    listed = (await api.call(AUDITOR, "GET", "/policy/versions")).json()["items"]
    assert [v["version"] for v in listed] == [version]
    (stored, _) = api.events("policy.stored")
    assert stored.actor == f"admin_key:{api.key_ids[OP]}" and stored.data["version"] == version


async def test_a_rejected_document_changes_nothing_and_is_recorded(api: Api) -> None:
    version = (await api.call(OP, "POST", "/policy/versions", json={"policy": DOCUMENT})).json()
    body = {"tenant": "acme", "env": "prod", "version": version["version"]}
    assert (await api.call(OP, "POST", "/policy/activations", json=body)).status_code == 201
    bad = {**DOCUMENT, "spec": {"rules": [{"id": "x", "action": "alow"}]}}
    refused = await api.call(OP, "POST", "/policy/versions", json={"policy": bad})
    assert refused.status_code == 400 and refused.json()["code"] == "policy_invalid"
    assert len((await api.call(AUDITOR, "GET", "/policy/versions")).json()["items"]) == 1
    active = await api.call(
        AUDITOR, "GET", "/policy/active", params={"tenant": "acme", "env": "prod"}
    )
    assert active.json()["version"] == version["version"]
    (rejected,) = api.events("policy.rejected")
    assert rejected.data["code"] == "policy_invalid"


async def test_activation_is_per_scope_audited_and_reaches_a_watching_gateway(api: Api) -> None:
    v1 = (await api.call(OP, "POST", "/policy/versions", json={"policy": DOCUMENT})).json()[
        "version"
    ]
    v2 = (await api.call(OP, "POST", "/policy/versions", json={"policy": OTHER})).json()["version"]
    unknown = await api.call(
        OP, "POST", "/policy/activations", json={"tenant": "acme", "env": "prod", "version": "nope"}
    )
    assert unknown.status_code == 404
    scope = {"tenant": "acme", "env": "prod"}
    missing = await api.call(AUDITOR, "GET", "/policy/active", params=scope)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"

    clock = FrozenClock(0.0)
    store = SqlPolicyStore(api.services.config.database_url())
    try:
        watcher = PolicyWatcher(store, tenant="acme", env="prod", clock=clock, interval=1.0)
        assert watcher.evaluate(build_input(call_from_dict(LARGE))).code == "policy_unavailable"
        await api.call(OP, "POST", "/policy/activations", json={**scope, "version": v1})
        clock.advance(1.0)
        decision = watcher.evaluate(build_input(call_from_dict(LARGE)))
        assert (decision.action, decision.policy_version) == ("approval_needed", v1)
        await api.call(OP, "POST", "/policy/activations", json={**scope, "version": v2})
        await api.call(
            OP, "POST", "/policy/activations", json={"tenant": "acme", "env": "dev", "version": v1}
        )
        clock.advance(1.0)
        decision = watcher.evaluate(build_input(call_from_dict(LARGE)))
        assert (decision.action, decision.policy_version) == ("deny", v2)
    finally:
        store.close()
    active = (await api.call(AUDITOR, "GET", "/policy/active", params=scope)).json()
    assert active["version"] == v2 and [a["version"] for a in active["history"]] == [v1, v2]
    events = api.events("policy.activated")
    assert [
        (e.tenant_id, e.data["env"], e.data["version"], e.data["previous"]) for e in events
    ] == [
        ("acme", "prod", v1, None),
        ("acme", "prod", v2, v1),
        ("acme", "dev", v1, None),
    ]
    assert all(e.actor == f"admin_key:{api.key_ids[OP]}" for e in events)


def _bundle_files(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


async def test_the_active_bundle_is_served_with_an_etag_and_decides_like_the_evaluator(
    api: Api,
) -> None:
    path = "/policy/bundles/acme/prod"
    assert (await api.call(AUDITOR, "GET", path)).status_code == 404
    version = (await api.call(OP, "POST", "/policy/versions", json={"policy": DOCUMENT})).json()[
        "version"
    ]
    await api.call(
        OP,
        "POST",
        "/policy/activations",
        json={"tenant": "acme", "env": "prod", "version": version},
    )
    served = await api.call(AUDITOR, "GET", path)
    assert served.status_code == 200 and served.headers["etag"] == f'"{version}"'
    files = _bundle_files(served.content)
    assert sorted(files) == [".manifest", "data.json", "policy.rego"]
    assert json.loads(files[".manifest"])["revision"] == version
    assert files["policy.rego"].decode() == to_rego(compile_policy(load_file(POLICY)))
    # OPA's conditional poll: nothing new, nothing sent.
    same = await api.call(AUDITOR, "GET", path, headers={"If-None-Match": f'"{version}"'})
    assert same.status_code == 304 and same.content == b""
    # The served bundle, run by a real Rego engine, decides exactly as the evaluator.
    engine = regorus.Engine()
    engine.add_policy("policy.rego", files["policy.rego"].decode())
    engine.add_data_json(files["data.json"].decode())
    doc = build_input(call_from_dict(LARGE))
    engine.set_input_json(json.dumps(doc))
    theirs = json.loads(engine.eval_rule_as_json(DECISION_QUERY))
    ours = compile_policy(load_file(POLICY)).evaluate(doc).to_dict()
    assert theirs["action"] == ours["action"] == "approval_needed"
    assert theirs["rule_ids"] == ours["rule_ids"]
    assert theirs["policy_version"] == ours["policy_version"] == version


async def test_roles_and_authentication(api: Api) -> None:
    body = {"policy": DOCUMENT}
    assert (await api.call(None, "POST", "/policy/versions", json=body)).status_code == 401
    assert (await api.call(None, "GET", "/policy/bundles/acme/prod")).status_code == 401
    assert (await api.call(AUDITOR, "POST", "/policy/versions", json=body)).status_code == 403
    activation = {"tenant": "acme", "env": "prod", "version": "v"}
    refused = await api.call(AUDITOR, "POST", "/policy/activations", json=activation)
    assert refused.status_code == 403
    extra = await api.call(OP, "POST", "/policy/activations", json={**activation, "force": True})
    assert extra.status_code == 400 and extra.json()["code"] == "invalid_request"
    assert api.events("policy.activated") == []
