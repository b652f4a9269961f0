"""The admin API over ASGI: authentication on every route, roles, typed errors, and what it writes.

Routes are enumerated from the app itself, so a route added later without its role dependency, or
reachable without a key, fails here rather than in production.
"""

from __future__ import annotations

import asyncio
import json
import re
import typing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from aegis.config import load_config
from aegis.crypto.keys import Ed25519SigningKey
from aegis.server.admin_api import create_admin_app
from aegis.server.admin_auth import Admin, Operator, Reader
from aegis.server.app import create_app
from aegis.server.services import Services, build_services
from aegis.telemetry.metrics import ADMIN_REQUESTS, REGISTRY
from aegis.types import AdminRole
from tests.support.server import write_dev_config

AGENT = {
    "id": "finance-agent",
    "tenant": "acme",
    "env": "prod",
    "owner": "alice@example.com",
    "scopes": ["payments:write", "payments:read"],
}


@dataclass
class Api:
    http: httpx.AsyncClient
    services: Services
    keys: dict[AdminRole, str]
    key_ids: dict[AdminRole, str]

    def auth(self, role: AdminRole) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    async def call(
        self, role: AdminRole, method: str, path: str, json: object = None
    ) -> httpx.Response:
        return await self.http.request(method, f"/v1{path}", json=json, headers=self.auth(role))


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


def _routes(services: Services) -> list[tuple[str, str]]:
    """(method, path) of every route of the admin app, path parameters filled in."""
    out = []
    for route in iter_route_contexts(create_admin_app(services).routes):
        assert isinstance(route.original_route, APIRoute), f"unexpected route {route!r}"
        assert route.path is not None and route.methods
        for method in sorted(route.methods):
            out.append((method, re.sub(r"\{[^}]+\}", "finance-agent", route.path)))
    return out


def _assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    body: dict[str, object] = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert str(body["message"])[0].islower()  # a sentence fragment, lowercase
    return body


async def test_every_route_refuses_a_missing_wrong_or_revoked_key(api: Api) -> None:
    routes = _routes(api.services)
    assert len(routes) >= 25  # the whole API, including the OpenAPI document
    assert ("GET", "/openapi.json") in routes
    admin_id = api.key_ids[AdminRole.ADMIN]
    api.services.registry.revoke_admin_key(api.key_ids[AdminRole.OPERATOR], actor="test")
    bad = [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {api.keys[AdminRole.ADMIN]}"},
        {"Authorization": "Bearer aegis_ak_0000000000000000_guessed"},
        {"Authorization": f"Bearer aegis_ak_{admin_id}_wrongsecret"},
        {"Authorization": f"Bearer {api.keys[AdminRole.OPERATOR]}"},  # revoked
    ]
    for method, path in [*routes, ("GET", "/no/such/route")]:
        for headers in bad:
            response = await api.http.request(method, f"/v1{path}", headers=headers, json={})
            _assert_error(response, 401, "unauthenticated")
            assert response.headers["www-authenticate"] == "Bearer"


async def test_auditor_only_reads_and_operator_cannot_manage_admin_keys(api: Api) -> None:
    for method, path in _routes(api.services):
        if method != "GET":
            body = _assert_error(
                await api.call(AdminRole.AUDITOR, method, path, {}), 403, "forbidden"
            )
            assert "auditor" in str(body["message"])
        if path.startswith("/admin/admin-keys"):
            response = await api.call(
                AdminRole.OPERATOR, method, path, {"name": "x", "role": "admin"}
            )
            _assert_error(response, 403, "forbidden")
    assert (await api.call(AdminRole.AUDITOR, "GET", "/admin/agents")).status_code == 200
    assert (await api.call(AdminRole.OPERATOR, "POST", "/admin/agents", AGENT)).status_code == 201
    assert (
        await api.call(AdminRole.AUDITOR, "GET", "/admin/agents/finance-agent")
    ).status_code == 200
    assert api.services.registry_store.list_admin_keys()[-1].name == "auditor"  # nothing created


async def test_openapi_document_lists_every_route(api: Api) -> None:
    response = await api.call(AdminRole.AUDITOR, "GET", "/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["servers"] == [{"url": "/v1"}]
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    expected = {
        (method, route.path)
        for route in iter_route_contexts(create_admin_app(api.services).routes)
        if isinstance(route.original_route, APIRoute) and route.original_route.include_in_schema
        for method in route.methods or ()
    }
    assert documented == expected
    assert ("POST", "/admin/agents/{agent_id}/quarantine") in documented


async def test_validation_errors_are_invalid_request_naming_the_field(api: Api) -> None:
    op = AdminRole.OPERATOR
    missing = {k: v for k, v in AGENT.items() if k != "owner"}
    body = _assert_error(
        await api.call(op, "POST", "/admin/agents", missing), 400, "invalid_request"
    )
    assert body["field"] == "owner" and "owner" in str(body["message"])
    body = _assert_error(
        await api.call(op, "POST", "/admin/agents", {**AGENT, "owner": "not-an-address"}),
        400,
        "invalid_request",
    )
    assert body["field"] == "owner"
    body = _assert_error(
        await api.call(op, "POST", "/admin/agents", {**AGENT, "scope": ["x"]}),
        400,
        "invalid_request",
    )
    assert body["field"] == "scope"  # unknown fields are refused, not ignored
    body = _assert_error(
        await api.call(op, "GET", "/admin/agents?status=dormant"), 400, "invalid_request"
    )
    assert body["field"] == "status"
    body = _assert_error(await api.call(op, "GET", "/admin/events?limit=0"), 400, "invalid_request")
    assert body["field"] == "limit"
    response = await api.http.post(
        "/v1/admin/agents",
        content=b"{not json",
        headers={**api.auth(op), "content-type": "application/json"},
    )
    _assert_error(response, 400, "invalid_request")
    body = _assert_error(
        await api.call(op, "POST", "/admin/agents/finance-agent/suspend", {}),
        400,
        "invalid_request",
    )
    assert body["field"] == "reason"
    _assert_error(await api.call(op, "DELETE", "/admin/agents"), 400, "invalid_request")
    _assert_error(await api.call(op, "GET", "/admin/agents/nobody"), 404, "not_found")
    _assert_error(await api.call(op, "GET", "/admin/unknown"), 404, "not_found")
    big = {**AGENT, "attributes": {"blob": "x" * 70_000}}
    _assert_error(await api.call(op, "POST", "/admin/agents", big), 413, "payload_too_large")


async def test_agent_life_cycle_is_recorded_with_the_key_as_actor(api: Api) -> None:
    op, admin = AdminRole.OPERATOR, AdminRole.ADMIN
    created = await api.call(
        op, "POST", "/admin/agents", {**AGENT, "model": "m-1", "roles": ["payer"]}
    )
    assert created.status_code == 201
    assert created.json()["scopes"] == AGENT["scopes"] and created.json()["status"] == "active"
    _assert_error(await api.call(op, "POST", "/admin/agents", AGENT), 409, "conflict")
    patched = await api.call(
        op, "PATCH", "/admin/agents/finance-agent", {"scopes": ["payments:read"]}
    )
    assert patched.json()["scopes"] == ["payments:read"] and patched.json()["model"] == "m-1"
    _assert_error(
        await api.call(op, "PATCH", "/admin/agents/finance-agent", {}), 400, "invalid_request"
    )
    _assert_error(
        await api.call(op, "PATCH", "/admin/agents/finance-agent", {"owner": None}),
        400,
        "invalid_request",
    )
    listed = await api.call(op, "GET", "/admin/agents?tenant=acme&status=active")
    assert [a["id"] for a in listed.json()["items"]] == ["finance-agent"]
    assert (await api.call(op, "GET", "/admin/agents?tenant=other")).json()["items"] == []

    reason = {"reason": "leaked credentials under review"}
    response = await api.call(op, "POST", "/admin/agents/finance-agent/quarantine", reason)
    assert response.json()["status"] == "quarantined"
    # Only an admin may release a quarantine.
    _assert_error(
        await api.call(op, "POST", "/admin/agents/finance-agent/activate", reason), 403, "forbidden"
    )
    assert api.services.registry_store.get_agent("finance-agent").status.value == "quarantined"
    response = await api.call(admin, "POST", "/admin/agents/finance-agent/activate", reason)
    assert response.json()["status"] == "active"
    events = (await api.call(AdminRole.AUDITOR, "GET", "/admin/events?limit=1000")).json()["items"]
    quarantined = [e for e in events if e["type"] == "agent.quarantined"]
    assert quarantined[0]["actor"] == f"admin_key:{api.key_ids[op]}"
    assert quarantined[0]["data"]["reason"] == reason["reason"]
    assert next(e for e in events if e["type"] == "agent.active")["actor"] == (
        f"admin_key:{api.key_ids[admin]}"
    )
    later = (await api.call(op, "GET", f"/admin/events?since={events[-1]['at']}")).json()["items"]
    assert all(e["at"] >= events[-1]["at"] for e in later)

    tenants = (await api.call(op, "GET", "/admin/tenants")).json()["items"]
    assert [t["id"] for t in tenants] == ["acme"]
    assert (await api.call(op, "POST", "/admin/tenants/acme/suspend")).json()[
        "status"
    ] == "suspended"
    _assert_error(
        await api.call(op, "POST", "/admin/tokens", {"agent_id": "finance-agent"}), 409, "conflict"
    )


async def test_clients_secrets_and_minted_tokens(api: Api) -> None:
    op = AdminRole.OPERATOR
    await api.call(op, "POST", "/admin/agents", AGENT)
    _assert_error(
        await api.call(op, "POST", "/admin/tokens", {"agent_id": "finance-agent"}), 409, "conflict"
    )
    created = (await api.call(op, "POST", "/admin/clients", {"agent_id": "finance-agent"})).json()
    client_id, secret = created["client_id"], created["client_secret"]
    assert secret.startswith("aegis_cs_")
    shown = await api.call(AdminRole.AUDITOR, "GET", f"/admin/clients/{client_id}")
    listed = await api.call(AdminRole.AUDITOR, "GET", "/admin/clients?agent_id=finance-agent")
    for text in (shown.text, listed.text):
        stored = api.services.registry_store.get_client(client_id).secrets[0].hash
        assert secret not in text and stored not in text and '"client_secret"' not in text
    _assert_error(await api.call(op, "GET", "/admin/clients?agent_id=nobody"), 404, "not_found")

    token = await api.http.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, auth=(client_id, secret)
    )
    assert token.status_code == 200, token.text
    minted = await api.call(
        op, "POST", "/admin/tokens", {"agent_id": "finance-agent", "scopes": ["payments:read"]}
    )
    assert minted.status_code == 201 and minted.json()["client_id"] == client_id
    assert minted.json()["scope"] == "payments:read"
    _assert_error(
        await api.call(
            op, "POST", "/admin/tokens", {"agent_id": "finance-agent", "scopes": ["admin:all"]}
        ),
        400,
        "invalid_scope",
    )
    tokens = api.services.tokens
    assert (await tokens.introspect(minted.json()["access_token"], tenant=None))["active"] is True

    rotated = (await api.call(op, "POST", f"/admin/clients/{client_id}/rotate-secret")).json()
    assert rotated["client_secret"] not in (secret, None) and len(rotated["secrets"]) == 2
    disabled = await api.call(op, "POST", f"/admin/clients/{client_id}/disable")
    assert disabled.json()["active"] is False
    # The cache was dropped: the disabled client's token is dead at once in this process.
    assert await tokens.introspect(minted.json()["access_token"], tenant=None) == {"active": False}
    _assert_error(
        await api.call(op, "POST", "/admin/tokens", {"agent_id": "finance-agent"}), 409, "conflict"
    )
    assert (await api.call(op, "POST", f"/admin/clients/{client_id}/enable")).json()[
        "active"
    ] is True
    events = api.services.registry_store.list_events(limit=1000)
    assert [e.data["jti"] for e in events if e.type == "token.minted"] == [minted.json()["jti"]]


async def test_keys_show_no_private_material_and_rotate(api: Api) -> None:
    op = AdminRole.OPERATOR
    listed = await api.call(AdminRole.AUDITOR, "GET", "/admin/keys")
    items = listed.json()["items"]
    assert {k["state"] for k in items} == {"active", "next"}
    assert set(items[0]) == {
        "kid",
        "alg",
        "state",
        "created_at",
        "activated_at",
        "retired_at",
        "remove_after",
    }
    assert "private" not in listed.text and '"d"' not in listed.text
    _assert_error(await api.call(op, "POST", "/admin/keys/rotate", {}), 409, "conflict")
    next_kid = next(k["kid"] for k in items if k["state"] == "next")
    rotated = await api.call(op, "POST", "/admin/keys/rotate", {"force": True})
    assert rotated.status_code == 200 and rotated.json()["active"] == next_kid
    assert api.services.keyring.signing_key().kid == next_kid
    events = api.services.registry_store.list_events(limit=1000)
    assert [(e.type, e.actor) for e in events if e.type == "keys.rotated"] == [
        ("keys.rotated", f"admin_key:{api.key_ids[op]}")
    ]


async def test_admin_keys_are_managed_by_admins_only(api: Api) -> None:
    admin = AdminRole.ADMIN
    created = (
        await api.call(admin, "POST", "/admin/admin-keys", {"name": "ci", "role": "operator"})
    ).json()
    assert created["secret"].startswith("aegis_ak_") and created["role"] == "operator"
    listed = await api.call(admin, "GET", "/admin/admin-keys")
    assert created["secret"] not in listed.text and "hash" not in listed.text
    new_key = {"Authorization": f"Bearer {created['secret']}"}
    assert (await api.http.get("/v1/admin/agents", headers=new_key)).status_code == 200
    revoked = await api.call(admin, "POST", f"/admin/admin-keys/{created['key_id']}/revoke")
    assert revoked.json()["revoked"] is True
    _assert_error(await api.http.get("/v1/admin/agents", headers=new_key), 401, "unauthenticated")
    # The last admin key cannot be revoked: nobody could manage admin keys any more.
    own = api.key_ids[admin]
    _assert_error(await api.call(admin, "POST", f"/admin/admin-keys/{own}/revoke"), 409, "conflict")
    _assert_error(
        await api.call(admin, "POST", "/admin/admin-keys", {"name": "x", "role": "root"}),
        400,
        "invalid_request",
    )


async def test_requests_are_counted_by_outcome(api: Api) -> None:
    def count(outcome: str) -> float:
        value = REGISTRY.get_sample_value("aegis_admin_requests_total", {"outcome": outcome})
        return value or 0.0

    assert ADMIN_REQUESTS is not None
    before = count("ok"), count("unauthenticated"), count("forbidden")
    await api.http.get("/v1/admin/agents")
    await api.call(AdminRole.AUDITOR, "GET", "/admin/agents")
    await api.call(AdminRole.AUDITOR, "POST", "/admin/agents", AGENT)
    assert (count("ok"), count("unauthenticated"), count("forbidden")) == (
        before[0] + 1,
        before[1] + 1,
        before[2] + 1,
    )


def test_every_route_names_its_role(tmp_path: Path) -> None:
    """Behind the middleware's auditor guard, each route still declares who may call it: writes
    never accept a read-only key, and admin keys are managed by admins alone."""
    config = load_config(write_dev_config(tmp_path, 8080), environ={})
    services = build_services(config)
    try:
        for route in iter_route_contexts(create_admin_app(services).routes):
            original = route.original_route
            assert isinstance(original, APIRoute)
            role = typing.get_type_hints(original.endpoint, include_extras=True)["key"]
            assert role in (Reader, Operator, Admin), original.path
            if route.methods != {"GET"}:
                assert role is not Reader, f"{original.path} writes with a read-only key"
            if original.path.startswith("/admin/admin-keys"):
                assert role is Admin, original.path
    finally:
        asyncio.run(services.aclose())


async def test_a_body_some_reader_would_read_otherwise_is_refused(api: Api) -> None:
    """Python keeps the last of two members: {"role": "auditor", "role": "admin"} made an admin
    key, and a policy rule reading "deny" first was stored as an allow."""
    rule = ('{"id": "block", "action": "deny", "match": {"tools": ["payments.*"]}, '
            '"action": "allow"}')  # fmt: skip
    policy = ('{"apiVersion": "aegis/v1", "kind": "Policy", "metadata": {"name": "dup"}, '
              '"spec": {"rules": [' + rule + "]}}")  # fmt: skip
    call = '{"tool": "payments.transfer", "body": {"amount": 1}}'
    for role, path, body in (
        (
            AdminRole.ADMIN,
            "/admin/admin-keys",
            '{"name": "ci", "role": "auditor", "role": "admin"}',
        ),
        (AdminRole.OPERATOR, "/policy/versions", '{"policy": ' + policy + "}"),
        (
            AdminRole.OPERATOR,
            "/policy/dry-run",
            '{"policy": ' + policy + ', "input": ' + call + "}",
        ),
        (AdminRole.OPERATOR, "/admin/agents", '{"id": "a", "id": "b"}'),
        (AdminRole.OPERATOR, "/admin/agents", '{"id": "a", "amount": NaN}'),
    ):
        response = await api.http.post(
            f"/v1{path}", content=body,
            headers={**api.auth(role), "content-type": "application/json"},
        )  # fmt: skip
        assert _assert_error(response, 400, "invalid_request")["message"], path
    keys = (await api.call(AdminRole.ADMIN, "GET", "/admin/admin-keys")).json()["items"]
    assert [k["name"] for k in keys if k["name"] == "ci"] == []
    assert (await api.call(AdminRole.OPERATOR, "GET", "/policy/versions")).json()["items"] == []


async def test_a_body_nested_too_deeply_is_a_400_not_a_500(api: Api) -> None:
    body = "[" * 30_000 + "]" * 30_000
    response = await api.http.post(
        "/v1/admin/agents", content=body,
        headers={**api.auth(AdminRole.OPERATOR), "content-type": "application/json"},
    )  # fmt: skip
    assert "nested too deeply" in str(_assert_error(response, 400, "invalid_request")["message"])


async def test_a_chunked_body_over_the_limit_is_413(api: Api) -> None:
    limit = api.services.config.server.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        for _ in range(limit // 1024 + 2):
            yield b" " * 1024

    response = await api.http.post(
        "/v1/admin/agents", content=chunks(),
        headers={**api.auth(AdminRole.OPERATOR), "content-type": "application/json"},
    )  # fmt: skip
    _assert_error(response, 413, "payload_too_large")


async def test_an_unknown_query_parameter_is_refused(api: Api) -> None:
    """A misspelt filter (?tenat=globex) answered with every tenant's agents."""
    typo = await api.call(AdminRole.AUDITOR, "GET", "/admin/agents?tenat=globex")
    body = _assert_error(typo, 400, "invalid_request")
    assert body["field"] == "tenat" and "tenant" in str(body["message"])
    assert (
        await api.call(AdminRole.AUDITOR, "GET", "/admin/agents?tenant=acme")
    ).status_code == 200
    # A role's dependency reads no query; the path has none to read.
    assert (await api.call(AdminRole.AUDITOR, "GET", "/admin/keys?x=1")).status_code == 400


@pytest.mark.parametrize(
    "encoding",
    ["utf-16", "utf-32", "utf-16-le", "utf-16-be", "utf-32-le", "utf-8-sig", "latin-1"],
    ids=lambda e: str(e),
)
async def test_a_body_not_in_plain_utf8_is_refused_never_read_unchecked(
    api: Api, encoding: str
) -> None:
    """The repeated-member check reads UTF-8; the routes' own readers also take UTF-16, UTF-32
    and a byte-order mark (keeping a repeated member's last value): such a body is refused, so
    {"role": "auditor", "role": "admin"} never makes an admin key, nor "deny", "allow" an
    allow."""
    # ASCII: in UTF-16 or UTF-32 without a byte-order mark it is valid UTF-8 (NULs included).
    key = '{"name": "ci-x", "role": "auditor", "role": "admin"}'
    policy = (
        '{"policy": {"apiVersion": "aegis/v1", "kind": "Policy", "metadata": {"name": "crm"},'
        ' "spec": {"rules": [{"id": "crm", "action": "deny", "action": "allow",'
        ' "match": {"tools": ["crm.*"]}}]}}}'
    )
    for path, body, role in (("/v1/admin/admin-keys", key, AdminRole.ADMIN),
                             ("/v1/policy/versions", policy, AdminRole.OPERATOR)):  # fmt: skip
        response = await api.http.post(
            path,
            content=body.encode(encoding),
            headers={**api.auth(role), "content-type": "application/json"},
        )
        assert response.status_code == 400, (path, response.status_code, response.text)
        assert response.json()["code"] == "invalid_request"
    assert not any(k.name.startswith("ci-") for k in api.services.registry_store.list_admin_keys())


@pytest.mark.parametrize("where", ["attributes", "kid", "patch"])
async def test_deeply_nested_agent_values_are_refused_not_stored(api: Api, where: str) -> None:
    """A value nested 300 levels deep (under the body's limits) was stored, and every answer
    showing the agent was then a 500, a suspension committed included: it is refused 400 naming
    the field, and nothing is stored."""
    deep: object = json.loads("[" * 300 + "]" * 300)
    body: dict[str, object] = {"id": f"deep-{where}", "tenant": "acme", "env": "prod",
                               "owner": "a@example.com"}  # fmt: skip
    if where == "attributes":
        body["attributes"] = {"a": deep}
    elif where == "kid":
        key = Ed25519SigningKey.generate().public.to_jwk()
        body["jwks"] = [{**key, "kid": deep}]
    created = await api.call(AdminRole.OPERATOR, "POST", "/admin/agents", body)
    if where == "patch":
        assert created.status_code == 201, created.text
        created = await api.call(
            AdminRole.OPERATOR, "PATCH", f"/admin/agents/{body['id']}", {"attributes": {"a": deep}}
        )
    assert created.status_code == 400, created.text
    assert created.json()["code"] == "invalid_request"
    assert created.json().get("field") in ("attributes", "jwks")
    listed = await api.call(AdminRole.AUDITOR, "GET", "/admin/agents")
    assert listed.status_code == 200
    stored = {a.id: a for a in api.services.registry_store.list_agents()}
    assert where == "patch" or body["id"] not in stored
    assert where != "patch" or stored[str(body["id"])].attributes == {}
