"""Delegation chains end to end: a real control plane over HTTP (uvicorn on a loopback port).

orchestrator -> finance -> payments, exchanged at ``/oauth/token`` (RFC 8693) and re-verified as a
gateway would (``verify_chain``); then each refusal, each with its own stable code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.server import RunningServer, run_server

from aegis.audit.log import AuditLog
from aegis.clock import new_id
from aegis.config import GatewaySettings
from aegis.crypto.jws import encode_segment, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import AegisError
from aegis.gateway.app import build_pipeline
from aegis.gateway.context import CallContext, Route
from aegis.gateway.pipeline import Pipeline
from aegis.policy.loader import load_document
from aegis.policy.store import MemoryPolicyStore
from aegis.registry.service import AgentSpec
from aegis.tokens.chain import Chain, verify_chain
from aegis.tokens.claims import AccessToken
from aegis.tokens.delegation import CHAIN_SEPARATOR, mint_grant
from aegis.tokens.exchange import DELEGATION_GRANT, EXCHANGE_AUDIT_KIND, JWT_TYPE, TOKEN_EXCHANGE
from aegis.types import AgentStatus, ClientAuthMethod

pytestmark = pytest.mark.slow
SCOPES = ("payments:read", "payments:write")


USER_ISS = "https://login.example"
USER_KEY = Ed25519SigningKey.generate()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    jwks = json.dumps({"keys": [USER_KEY.public.to_jwk()]})
    trust = f"delegation:\n  external_issuers:\n    - {{issuer: {USER_ISS}, tenant: acme, jwks: {jwks}}}\n"
    with run_server(tmp_path_factory.mktemp("delegation"), trust) as srv:
        yield srv


class Agent:
    def __init__(self, srv: RunningServer, name: str, tenant: str = "acme") -> None:
        self.srv, self.key = srv, Ed25519SigningKey.generate()
        self.id = f"{name}-{new_id(4).lower().replace('_', 'x').replace('-', 'x')}"
        srv.services.registry.register_agent(
            AgentSpec(self.id, tenant, "prod", "owner@example.com", allowed_scopes=SCOPES,
                      jwks=(self.key.public.to_jwk(),)),
            actor="test",
        )  # fmt: skip
        client, _ = srv.services.registry.create_client(
            self.id, auth_method=ClientAuthMethod.PRIVATE_KEY_JWT, actor="test"
        )
        self.client_id = client.client_id
        self.links: list[str] = []
        self.token: AccessToken | None = None
        self.raw = ""

    def grant(self, child: Agent, **over: Any) -> str:
        """What this agent hands to ``child``: its own chain plus a new link (the SDK's job)."""
        args: dict[str, Any] = {"scopes": SCOPES, "tools": ("pay_invoice",), "max_depth": 3}
        args.update(over)
        link = mint_grant(
            args.pop("key", self.key), parent=self.id, child=child.id, audience=self.srv.url,
            parent_links=self.links, now=args.pop("now", time.time()), **args,
        )  # fmt: skip
        return CHAIN_SEPARATOR.join([*self.links, link])

    def assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "jti": new_id(),
                  "aud": self.srv.url, "iat": now, "exp": now + 60}  # fmt: skip
        header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": self.key.kid})
        return sign_compact(header, claims, self.key.sign)

    def exchange(self, subject_token: str, **form: str) -> httpx.Response:
        data = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": form.pop("subject_token_type", DELEGATION_GRANT),
            "actor_token": self.assertion(),
            "actor_token_type": JWT_TYPE,
            **form,
        }
        resp = httpx.post(f"{self.srv.url}/oauth/token", data=data)
        if resp.status_code == 200:
            self.raw = resp.json()["access_token"]
            self.token = self.srv.services.verifier.verify(self.raw)
            self.links = self.token.claims["parent_agent"].split(CHAIN_SEPARATOR)
        return resp


def gateway(srv: RunningServer, token: AccessToken | None, **kw: Any) -> Chain:
    assert token is not None
    exchanger = srv.services.tokens.exchanger
    assert exchanger is not None
    return verify_chain(
        token, cache=srv.services.cache, rules=exchanger.rules, now=time.time(), **kw
    )


def refused_with(resp: httpx.Response, code: str) -> None:
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "invalid_request"  # RFC 8693 §2.2.2
    assert body["error_description"].endswith(f"({code})"), body


def test_orchestrator_finance_payments_allowed(server: RunningServer) -> None:
    orch, fin, pay = (Agent(server, n) for n in ("orchestrator", "finance", "payments"))
    resp = fin.exchange(orch.grant(fin), scope="payments:write payments:read")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["token_type"] == "Bearer"
    assert resp.headers["cache-control"] == "no-store"
    assert pay.exchange(fin.grant(pay, scopes=("payments:write",), max_depth=2)).status_code == 200
    assert pay.token is not None
    assert pay.token.scopes == ("payments:write",)
    assert pay.token.claims["act"] == {
        "sub": pay.id, "act": {"sub": fin.id, "act": {"sub": orch.id}}
    }  # fmt: skip
    chain = gateway(server, pay.token, tool="pay_invoice")
    assert chain.policy_input() == {
        "agents": [orch.id, fin.id, pay.id], "parent": fin.id, "depth": 2, "origin_user": None
    }  # fmt: skip
    meta = httpx.get(f"{server.url}/.well-known/oauth-authorization-server").json()
    assert TOKEN_EXCHANGE in meta["grant_types_supported"]


def test_each_refusal_has_its_own_code(server: RunningServer) -> None:
    orch, fin, pay = (Agent(server, n) for n in ("orchestrator", "finance", "payments"))
    intruder, foreign = Agent(server, "intruder"), Agent(server, "foreign", tenant="globex")
    assert fin.exchange(orch.grant(fin)).status_code == 200
    refused_with(
        pay.exchange(fin.grant(pay, key=intruder.key, max_depth=1)), "parent_signature_invalid"
    )
    refused_with(pay.exchange(fin.grant(pay, now=time.time() - 400, max_depth=1)), "parent_expired")
    grant = fin.grant(pay, max_depth=1)
    assert pay.exchange(grant).status_code == 200
    refused_with(pay.exchange(grant), "grant_replayed")
    refused_with(pay.exchange(fin.grant(pay, scopes=("payments:write", "admin:all"), max_depth=1)),
                 "scope_widened")  # fmt: skip
    refused_with(orch.exchange(pay.grant(orch, max_depth=0)), "delegation_cycle")
    refused_with(foreign.exchange(fin.grant(foreign, max_depth=1)), "tenant_mismatch")
    # Each refusal is in the control plane's audit log with the chain exactly as presented.
    audit = server.services.extras["exchange_audit"]
    assert isinstance(audit, AuditLog)
    mine = {orch.id, fin.id, pay.id, foreign.id}
    refused = {
        r["code"]: r for r in audit.records(kind=EXCHANGE_AUDIT_KIND)
        if r["action"] == "refused" and r["agent_id"] in mine
    }  # fmt: skip
    assert set(refused) == {"parent_signature_invalid", "parent_expired", "grant_replayed",
                            "scope_widened", "delegation_cycle", "tenant_mismatch"}  # fmt: skip
    cycle = refused["delegation_cycle"]["chain_presented"]
    assert [(link["iss"], link["sub"]) for link in cycle] == [
        (orch.id, fin.id), (fin.id, pay.id), (pay.id, orch.id)
    ]  # fmt: skip
    assert refused["scope_widened"]["chain_presented"][-1]["scope"] == "payments:write admin:all"


def test_depth_over_the_limit(server: RunningServer) -> None:
    hops = [Agent(server, f"hop{i}") for i in range(6)]
    for i in range(4):
        resp = hops[i + 1].exchange(hops[i].grant(hops[i + 1], max_depth=8 - i))
        assert resp.status_code == 200, resp.text
    assert gateway(server, hops[4].token).depth == 4
    refused_with(hops[5].exchange(hops[4].grant(hops[5], max_depth=0)), "delegation_too_deep")


def test_parent_retired_in_the_middle_of_the_chain(server: RunningServer) -> None:
    orch, fin, pay, ledger = (Agent(server, n) for n in ("orch", "finance", "payments", "ledger"))
    assert fin.exchange(orch.grant(fin)).status_code == 200
    assert pay.exchange(fin.grant(pay, max_depth=2)).status_code == 200
    next_grant = pay.grant(ledger, max_depth=1)
    server.services.registry.set_agent_status(fin.id, AgentStatus.RETIRED, actor="test")
    time.sleep(server.config.stores.registry_cache_ttl + 0.05)
    refused_with(ledger.exchange(next_grant), "parent_inactive")
    with pytest.raises(AegisError) as exc:
        gateway(server, pay.token)
    assert exc.value.code == "parent_inactive"
    assert [link["sub"] for link in exc.value.details["chain"]] == [fin.id, pay.id]


def test_forged_nested_act_grants_nothing(server: RunningServer) -> None:
    orch, fin, pay = (Agent(server, n) for n in ("orchestrator", "finance", "payments"))
    assert fin.exchange(orch.grant(fin)).status_code == 200
    forged_grant = fin.grant(pay, max_depth=1, extra={"act": {"sub": "root-admin"}})
    assert pay.exchange(forged_grant).status_code == 200
    assert pay.token is not None
    assert pay.token.claims["act"]["act"] == {"sub": fin.id, "act": {"sub": orch.id}}
    honest = gateway(server, pay.token)
    c = pay.token.claims
    reissued = server.services.issuer.issue(
        agent_id=c["sub"], client_id=c["client_id"], tenant=c["tenant"], env=c["env"],
        scopes=pay.token.scopes, audience=(c["aud"],), lifetime=60,
        extra={**{k: c[k] for k in ("parent_agent", "delegation_depth", "tools")},
               "act": {"sub": pay.id, "act": {"sub": "root-admin", "act": {"sub": "ceo"}}}},
    )  # fmt: skip
    forged = gateway(server, server.services.verifier.verify(reissued.token))
    assert (forged.agents, forged.parent, forged.depth) == (
        honest.agents, honest.parent, honest.depth
    )  # fmt: skip
    assert "root-admin" not in forged.agents


# -- through the gateway pipeline: policy on the chain, audit of every record ----------------------

PAY_ROUTE = Route("/pay", "http://127.0.0.1:9", "pay_invoice", "acme", "prod", allow_bearer=True)


class Gateway:
    """The real decision pipeline over the running control plane's services, with one policy."""

    def __init__(self, srv: RunningServer, tmp_path: Path, rules: str) -> None:
        self.audit = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=srv.services.clock)
        store = MemoryPolicyStore()
        doc = load_document(
            "apiVersion: aegis/v1\nkind: Policy\nmetadata: {name: chain}\nspec:\n  rules:\n" + rules
        )
        store.activate("acme", "prod", store.put(doc, now=0), actor="test", now=0)
        settings = GatewaySettings.model_validate({"policy_poll_interval": 0.001})
        self.pipeline: Pipeline = build_pipeline(
            srv.services, settings, policy_store=store, audit=self.audit
        )

    async def call(self, agent: Agent) -> tuple[str | None, dict[str, Any]]:
        ctx = CallContext(
            method="POST", url="https://gw.example/pay/x", host="gw.example", path="/pay/x",
            route=PAY_ROUTE, headers=(("authorization", f"Bearer {agent.raw}"),),
        )  # fmt: skip
        result = await self.pipeline.run(ctx)
        [record] = [
            r for r in self.audit.records(kind="gateway.decision")
            if r["decision_id"] == result.decision_id
        ]  # fmt: skip
        return (None if result.allowed else result.code), record


def own_token(agent: Agent) -> None:
    """A plain client_credentials token: the agent acting on its own authority, no parent."""
    resp = httpx.post(
        f"{agent.srv.url}/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": agent.assertion(),
            "scope": "payments:write",
        },
    )
    assert resp.status_code == 200, resp.text
    agent.raw = resp.json()["access_token"]


async def test_policy_requires_a_parent_and_restricts_the_edge(
    server: RunningServer, tmp_path: Path
) -> None:
    orch, fin, pay = (Agent(server, n) for n in ("orchestrator", "finance", "payments"))
    gw = Gateway(server, tmp_path, f"""
    - id: pay-only-via-finance
      action: allow
      match: {{tools: [pay_invoice], agent: {{ids: [{pay.id}]}}, chain: {{parents: [{fin.id}]}}}}
""")  # fmt: skip
    assert fin.exchange(orch.grant(fin)).status_code == 200
    assert pay.exchange(fin.grant(pay, max_depth=1)).status_code == 200
    code, record = await gw.call(pay)
    assert code is None, record
    assert record["chain"] == [orch.id, fin.id, pay.id]
    assert record["rule_ids"] == ["pay-only-via-finance"]
    # The same agent with no parent at all: the policy requires one, default deny.
    own_token(pay)
    code, record = await gw.call(pay)
    assert (code, record["chain"]) == ("access_denied", [pay.id])
    # A parent the policy does not allow for this child (orchestrator -> payments directly).
    direct = Agent(server, "payments")
    assert direct.exchange(orch.grant(direct)).status_code == 200
    (tmp_path / "direct").mkdir()
    gw2 = Gateway(server, tmp_path / "direct", f"""
    - id: pay-only-via-finance
      action: allow
      match: {{tools: [pay_invoice], agent: {{ids: [{direct.id}]}}, chain: {{parents: [{fin.id}]}}}}
""")  # fmt: skip
    code, record = await gw2.call(direct)
    assert (code, record["chain"]) == ("access_denied", [orch.id, direct.id])


def signed_user_token(srv: RunningServer, sub: str, actor: str) -> str:
    """An end user's token from the configured external issuer, naming ``actor`` in may_act."""
    now = int(time.time())
    claims = {"iss": USER_ISS, "sub": sub, "aud": srv.url, "iat": now, "exp": now + 300,
              "jti": new_id(), "scope": " ".join(SCOPES), "may_act": {"sub": actor}}  # fmt: skip
    header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": USER_KEY.kid})
    return sign_compact(header, claims, USER_KEY.sign)


async def test_origin_user_reaches_policy_and_every_audit_record(
    server: RunningServer, tmp_path: Path
) -> None:
    fin, pay = Agent(server, "finance"), Agent(server, "payments")
    gw = Gateway(server, tmp_path, """
    - id: alice-may-pay
      action: allow
      match: {tools: [pay_invoice], chain: {origin_users: [alice@example.com]}}
""")  # fmt: skip
    resp = fin.exchange(signed_user_token(server, "alice@example.com", fin.id),
                        subject_token_type=JWT_TYPE)  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert pay.exchange(fin.grant(pay, max_depth=1)).status_code == 200
    for agent in (fin, pay):
        code, record = await gw.call(agent)
        assert (code, record["origin_user"]) == (None, "alice@example.com"), record
    audit = server.services.extras["exchange_audit"]
    assert isinstance(audit, AuditLog)
    issued = [
        r for r in audit.records(kind=EXCHANGE_AUDIT_KIND) if r["agent_id"] in (fin.id, pay.id)
    ]
    assert [(r["action"], r["agent_id"], r["origin_user"]) for r in issued] == [
        ("issued", fin.id, "alice@example.com"), ("issued", pay.id, "alice@example.com")
    ]  # fmt: skip
    # Another user behind the same agents: the policy sees who, refuses, and the record says who.
    mallory = Agent(server, "payments")
    fin2 = Agent(server, "finance")
    resp = fin2.exchange(signed_user_token(server, "mallory@example.com", fin2.id),
                         subject_token_type=JWT_TYPE)  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert mallory.exchange(fin2.grant(mallory, max_depth=1)).status_code == 200
    code, record = await gw.call(mallory)
    assert (code, record["origin_user"]) == ("access_denied", "mallory@example.com")
    # Two issuers a tenant trusts may each have an alice@example.com: policy sees which one
    # vouched for the user.
    for issuer, expected in ((USER_ISS, None), ("https://partner.example", "access_denied")):
        by_issuer = Gateway(server, tmp_path / _dir_for(issuer), f"""
    - id: corporate-alice-may-pay
      action: allow
      match: {{tools: [pay_invoice], chain: {{origin_users: [alice@example.com]}}}}
      when: {{path: chain.origin_iss, eq: "{issuer}"}}
""")  # fmt: skip
        assert (await by_issuer.call(pay))[0] == expected, issuer


def _dir_for(issuer: str) -> str:
    return issuer.split("//")[1].replace(".", "-")


async def test_a_refused_chain_is_audited_as_presented(
    server: RunningServer, tmp_path: Path
) -> None:
    orch, fin, pay = (Agent(server, n) for n in ("orch", "finance", "payments"))
    gw = Gateway(server, tmp_path, """
    - id: any-delegated
      action: allow
      match: {tools: [pay_invoice], chain: {min_depth: 1}}
""")  # fmt: skip
    assert fin.exchange(orch.grant(fin)).status_code == 200
    assert pay.exchange(fin.grant(pay, max_depth=1)).status_code == 200
    assert (await gw.call(pay))[0] is None
    server.services.registry.set_agent_status(fin.id, AgentStatus.RETIRED, actor="test")
    time.sleep(server.config.stores.registry_cache_ttl + 0.05)
    code, record = await gw.call(pay)
    assert (code, record["action"]) == ("parent_inactive", "deny")
    presented = record["chain_presented"]
    assert [(link["iss"], link["sub"]) for link in presented] == [
        (orch.id, fin.id), (fin.id, pay.id)
    ]  # fmt: skip
    assert all(link["jti"] for link in presented)
    assert record["agent_id"] == pay.id
