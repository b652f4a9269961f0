"""Lifecycle edges of the admin API: narrowing an agent's scopes or keys ends what its tokens
carry at once; a quarantined agent changes only by an admin's hand; retired stays final for its
clients too; revocations and updates leave events that say who did what; and no answer (client
secrets, admin keys, access tokens) may be kept by a cache."""

from __future__ import annotations

from typing import Any

import httpx

from aegis.crypto.keys import Ed25519SigningKey
from aegis.types import AdminRole
from tests.server.test_admin_api import AGENT, Api, api  # noqa: F401  (fixture)

REASON = {"reason": "incident"}
OP = AdminRole.OPERATOR


async def _agent_with_client(a: Api, **agent: Any) -> tuple[str, str]:
    assert (await a.call(OP, "POST", "/admin/agents", {**AGENT, **agent})).status_code == 201
    created = (await a.call(OP, "POST", "/admin/clients", {"agent_id": "finance-agent"})).json()
    return created["client_id"], created["client_secret"]


async def _events(a: Api, type_: str) -> list[dict[str, Any]]:
    page = await a.call(AdminRole.AUDITOR, "GET", "/admin/events?limit=1000")
    return [e for e in page.json()["items"] if e["type"] == type_]


async def _mint(a: Api, *scopes: str) -> str:
    body = {"agent_id": "finance-agent", "scopes": list(scopes)}
    return str((await a.call(OP, "POST", "/admin/tokens", body)).json()["access_token"])


async def test_narrowing_an_agents_scopes_ends_tokens_carrying_the_removed_scope(
    api: Api,  # noqa: F811
) -> None:
    await _agent_with_client(api)
    writer, reader = await _mint(api, "payments:write"), await _mint(api, "payments:read")
    patched = await api.call(OP, "PATCH", "/admin/agents/finance-agent",
                             {"scopes": ["payments:read"]})  # fmt: skip
    assert patched.json()["scopes"] == ["payments:read"]
    api.services.cache.invalidate()
    assert await api.services.tokens.introspect(writer, tenant=None) == {"active": False}
    assert (await api.services.tokens.introspect(reader, tenant=None))["active"] is True
    [event] = await _events(api, "agent.updated")
    assert event["data"]["changes"] == {"allowed_scopes": {
        "from": ["payments:write", "payments:read"], "to": ["payments:read"]}}  # fmt: skip


async def test_removing_a_key_ends_the_agents_earlier_tokens(api: Api) -> None:  # noqa: F811
    old, new = Ed25519SigningKey.generate(), Ed25519SigningKey.generate()
    await _agent_with_client(api, jwks=[old.public.to_jwk()])
    before = await _mint(api, "payments:read")
    added = await api.call(OP, "PATCH", "/admin/agents/finance-agent",
                           {"jwks": [old.public.to_jwk(), new.public.to_jwk()]})  # fmt: skip
    assert added.json()["tokens_not_before"] == 0.0  # a key added ends nothing
    removed = await api.call(OP, "PATCH", "/admin/agents/finance-agent",
                             {"jwks": [new.public.to_jwk()]})  # fmt: skip
    assert removed.json()["tokens_not_before"] > 0
    api.services.cache.invalidate()
    assert await api.services.tokens.introspect(before, tenant=None) == {"active": False}
    changes = [e["data"]["changes"] for e in await _events(api, "agent.updated")]
    assert {"jwks": {"from": [old.public.kid, new.public.kid], "to": [new.public.kid]}} in changes


async def test_only_an_admin_changes_a_quarantined_agent(api: Api) -> None:  # noqa: F811
    await api.call(OP, "POST", "/admin/agents", AGENT)
    await api.call(OP, "POST", "/admin/agents/finance-agent/quarantine", REASON)
    change = {"scopes": ["admin:all"], "owner": "mallory@example.com"}
    refused = await api.call(OP, "PATCH", "/admin/agents/finance-agent", change)
    assert (refused.status_code, refused.json()["code"]) == (403, "forbidden"), refused.text
    agent = (await api.call(OP, "GET", "/admin/agents/finance-agent")).json()
    assert (agent["scopes"], agent["owner"]) == (AGENT["scopes"], AGENT["owner"])
    admin = await api.call(AdminRole.ADMIN, "PATCH", "/admin/agents/finance-agent",
                           {"scopes": ["payments:read"]})  # fmt: skip
    assert admin.status_code == 200, admin.text


async def test_a_retired_agents_client_is_neither_enabled_nor_given_a_secret(api: Api) -> None:  # noqa: F811
    client_id, _ = await _agent_with_client(api)
    await api.call(OP, "POST", f"/admin/clients/{client_id}/disable")
    await api.call(OP, "POST", "/admin/agents/finance-agent/retire", REASON)
    enabled = await api.call(OP, "POST", f"/admin/clients/{client_id}/enable")
    rotated = await api.call(OP, "POST", f"/admin/clients/{client_id}/rotate-secret")
    assert (enabled.status_code, rotated.status_code) == (409, 409)
    assert "client_secret" not in rotated.json()
    client = (await api.call(OP, "GET", f"/admin/clients/{client_id}")).json()
    assert client["active"] is False


async def test_only_an_admin_brings_back_a_quarantined_agents_client(api: Api) -> None:  # noqa: F811
    """Disabled and quarantined over a leak: an operator re-enabling the client, or handing it
    a new secret, would have it issue tokens the moment the agent is released."""
    client_id, _ = await _agent_with_client(api)
    await api.call(OP, "POST", f"/admin/clients/{client_id}/disable")
    await api.call(OP, "POST", "/admin/agents/finance-agent/quarantine", REASON)
    enabled = await api.call(OP, "POST", f"/admin/clients/{client_id}/enable")
    rotated = await api.call(OP, "POST", f"/admin/clients/{client_id}/rotate-secret")
    assert [(r.status_code, r.json()["code"]) for r in (enabled, rotated)] == [
        (403, "forbidden")
    ] * 2
    assert "client_secret" not in rotated.json()
    assert (await api.call(OP, "GET", f"/admin/clients/{client_id}")).json()["active"] is False
    # Disabling needs no admin; an admin may do either.
    assert (await api.call(OP, "POST", f"/admin/clients/{client_id}/disable")).status_code == 200
    admin = await api.call(AdminRole.ADMIN, "POST", f"/admin/clients/{client_id}/rotate-secret")
    assert admin.status_code == 200 and admin.json()["client_secret"]


async def test_a_rotation_can_stop_the_previous_secret_at_once(api: Api) -> None:  # noqa: F811
    """`{"revoke_previous": true}` (a leak): the old secret authenticates nothing from now on;
    without it the old secret keeps its overlap."""
    client_id, old = await _agent_with_client(api)
    kept = await api.call(OP, "POST", f"/admin/clients/{client_id}/rotate-secret")
    middle = kept.json()["client_secret"]
    form = {"grant_type": "client_credentials"}
    for secret in (old, middle):
        ok = await api.http.post("/oauth/token", data=form, auth=(client_id, secret))
        assert ok.status_code == 200, ok.text
    cut = await api.call(OP, "POST", f"/admin/clients/{client_id}/rotate-secret",
                         {"revoke_previous": True})  # fmt: skip
    assert cut.status_code == 200
    for secret, status in ((old, 401), (middle, 401), (cut.json()["client_secret"], 200)):
        answer = await api.http.post("/oauth/token", data=form, auth=(client_id, secret))
        assert answer.status_code == status, answer.text
    odd = await api.call(OP, "POST", f"/admin/clients/{client_id}/rotate-secret",
                         {"revoke_previous": "yes please"})  # fmt: skip
    assert odd.status_code == 400


async def test_a_revocation_is_recorded_with_who_made_it(api: Api) -> None:  # noqa: F811
    client_id, secret = await _agent_with_client(api)
    token = await _mint(api, "payments:read")
    own = await _mint(api, "payments:read")
    by_key = await api.http.post("/oauth/revoke", data={"token": token}, headers=api.auth(OP))
    by_client = await api.http.post("/oauth/revoke", data={"token": own},
                                    auth=(client_id, secret))  # fmt: skip
    assert by_key.status_code == by_client.status_code == 200
    revoked = await _events(api, "token.revoked")
    assert [(e["actor"], e["subject"], e["tenant"]) for e in revoked] == [
        (f"admin_key:{api.key_ids[OP]}", "agent:finance-agent", "acme"),
        (f"client:{client_id}", "agent:finance-agent", "acme"),
    ]
    assert {e["data"]["client"] for e in revoked} == {client_id}
    [minted, *_] = await _events(api, "token.minted")
    assert minted["tenant"] == "acme"


async def test_no_admin_answer_may_be_cached(api: Api) -> None:  # noqa: F811
    await api.call(OP, "POST", "/admin/agents", AGENT)
    answers: list[httpx.Response] = [
        await api.call(OP, "POST", "/admin/clients", {"agent_id": "finance-agent"}),
        await api.call(OP, "POST", "/admin/tokens", {"agent_id": "finance-agent"}),
        await api.call(
            AdminRole.ADMIN, "POST", "/admin/admin-keys", {"name": "n", "role": "auditor"}
        ),
        await api.call(OP, "GET", "/admin/agents/finance-agent"),
        await api.call(OP, "GET", "/admin/agents/nobody"),  # an error too
    ]
    assert [a.status_code for a in answers] == [201, 201, 201, 200, 404]
    assert {a.headers.get("cache-control") for a in answers} == {"no-store"}
