"""The decision pipeline in process: each step refusing on its own, with its code and evidence."""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from aegis.crypto.keys import b64u_decode, b64u_encode
from aegis.errors import REFUSAL_FIELD, ConfigError, TokenError, Unavailable, refusal_mark
from aegis.gateway.app import build_pipeline
from aegis.gateway.context import STREAMED_BODY_DIGEST, body_digest
from aegis.gateway.pipeline import attested_fields
from aegis.pki.binding import X5T_S256
from aegis.policy.store import MemoryPolicyStore
from aegis.registry.cache import RegistryCache
from aegis.tokens.dpop import access_token_hash
from tests.gateway.conftest import GW, OPEN, PAY, Agent, Env, activate, dpop_headers, make_ctx
from tests.gateway.helpers import mint_proof

POLICY = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: gw}
spec:
  rules:
    - id: pay-small
      action: allow
      reason: small payment
      match: {tools: ["payments"]}
      when: {path: request.body.amount, lte: 100}
    - id: pay-mid
      action: sanitize
      reason: memo redacted
      match: {tools: ["payments"]}
      when: {all: [{path: request.body.amount, gt: 100}, {path: request.body.amount, lte: 1000}]}
      obligations: [{kind: redact, target: request, path: memo}]
    - id: pay-large
      action: approval_needed
      reason: large payment
      match: {tools: ["payments"]}
      when: {path: request.body.amount, gt: 1000}
      approval: {group: finance, channel: slack, expires_in: 600}
    - id: pay-negative
      action: deny
      reason: amount must be positive
      match: {tools: ["payments"]}
      when: {path: request.body.amount, lte: 0}
"""


async def test_allowed_with_allowlist_fallback_and_attested(env: Env) -> None:
    agent = Agent(env)
    token = agent.token()
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 5}))
    assert result.allowed, result
    assert result.upstream_headers["x-aegis-agent-id"] == agent.id
    att = result.headers["x-aegis-attestation"]
    assert result.upstream_headers["x-aegis-attestation"] == att
    header, payload = (b64u_decode(p) for p in att.split(".")[:2])
    assert b'"typ":"aegis-attestation+jwt"' in header
    assert b'"policy_version":"allowlist"' in payload and agent.id.encode() in payload
    assert token.encode() not in payload


def _zero_sig(token: str) -> str:
    return token.rsplit(".", 1)[0] + "." + b64u_encode(bytes(64))


@pytest.mark.parametrize(
    ("build", "status", "code"),
    [
        (lambda a, t: [("authorization", f"Bearer {t}")], 401, "invalid_token"),  # downgrade
        (lambda a, t: [*dpop_headers(a, t), ("dpop", a.proof(t))], 400, "invalid_request"),
        (lambda a, t: [*dpop_headers(a, t), ("authorization", f"DPoP {t}")], 400, "invalid_request"),
        (lambda a, t: [("authorization", f"Bearer {t}, DPoP {t}"), ("dpop", a.proof(t))], 400, "invalid_request"),
        (lambda a, t: [("authorization", f"Bearer {t}"), ("dpop", a.proof(t))], 400, "invalid_request"),
        (lambda a, t: [("authorization", f"DPoP {t}")], 401, "invalid_dpop_proof"),
        (lambda a, t: [], 401, "unauthenticated"),
        (lambda a, t: [("authorization", f"Basic {t}")], 401, "unauthenticated"),
        (lambda a, t: dpop_headers(a, t, path="/payments/other"), 401, "invalid_dpop_proof"),
        (lambda a, t: dpop_headers(a, t + "x"), 401, "malformed_token"),
        (lambda a, t: dpop_headers(a, _zero_sig(t)), 401, "invalid_signature"),
    ],
    ids=["bearer-downgrade", "two-dpop", "two-auth", "two-schemes", "bearer-with-proof",
         "dpop-without-proof", "none", "basic", "htu", "tampered-token", "zero-signature"],
)  # fmt: skip
async def test_credential_refusals(env: Env, build: object, status: int, code: str) -> None:
    agent = Agent(env)
    token = agent.token()
    result = await env.pipeline.run(make_ctx(build(agent, token), body={"amount": 5}))  # type: ignore[operator]
    assert (result.status, result.code) == (status, code), result
    assert not result.allowed and not result.upstream_headers
    if status == 401:
        assert (
            "algs=" in result.headers["www-authenticate"]
            or "Bearer" in result.headers["www-authenticate"]
        )
    assert token not in result.message


async def test_failed_proof_does_not_spend_its_jti(env: Env) -> None:
    agent = Agent(env)
    token = agent.token()
    bad = [("authorization", f"DPoP {token}"), ("dpop", agent.proof(token, jti="J", htm="GET"))]
    assert (await env.pipeline.run(make_ctx(bad, body={"amount": 1}))).code == "invalid_dpop_proof"
    good = [("authorization", f"DPoP {token}"), ("dpop", agent.proof(token, jti="J"))]
    assert (await env.pipeline.run(make_ctx(good, body={"amount": 1}))).allowed
    assert (await env.pipeline.run(make_ctx(good, body={"amount": 1}))).code == "replay_detected"


async def test_challenges_name_the_proof_when_the_proof_is_at_fault(env: Env) -> None:
    """RFC 9449 §7.1: a replayed proof, or the DPoP scheme without one, is ``invalid_dpop_proof``
    (the client needs a new proof, not a new token); a replayed single-use token is
    ``invalid_token``."""
    agent = Agent(env)
    token = agent.token()
    headers = dpop_headers(agent, token)
    assert (await env.pipeline.run(make_ctx(headers, body={"amount": 1}))).allowed
    again = await env.pipeline.run(make_ctx(headers, body={"amount": 1}))
    assert (again.status, again.code) == (401, "replay_detected")
    assert again.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    bare = await env.pipeline.run(make_ctx([("authorization", f"DPoP {token}")]))
    assert (bare.status, bare.code) == (401, "invalid_dpop_proof")
    assert bare.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    once = [("authorization", f"Bearer {agent.token(dpop=False, single_use=True)}")]
    assert (await env.pipeline.run(make_ctx(once, body={"amount": 1}))).allowed
    replayed = await env.pipeline.run(make_ctx(once, body={"amount": 1}))
    assert replayed.code == "replay_detected"
    assert replayed.headers["www-authenticate"] == 'Bearer realm="aegis", error="invalid_token"'


async def test_bearer_needs_a_single_use_token_or_an_open_route(env: Env) -> None:
    agent = Agent(env)
    plain = agent.token(dpop=False)
    headers = [("authorization", f"Bearer {plain}")]
    assert (await env.pipeline.run(make_ctx(headers, body={"amount": 1}))).code == "invalid_token"
    open_call = make_ctx(headers, body={"amount": 1}, route=OPEN, path="/open/x")
    assert (await env.pipeline.run(open_call)).allowed
    once = [("authorization", f"Bearer {agent.token(dpop=False, single_use=True)}")]
    assert (await env.pipeline.run(make_ctx(once, body={"amount": 1}))).allowed
    assert (await env.pipeline.run(make_ctx(once, body={"amount": 1}))).code == "replay_detected"


async def test_certificate_bound_token_without_peer_fails_closed(env: Env) -> None:
    agent = Agent(env)
    token = agent.token(cnf={X5T_S256: "A" * 43}, single_use=True)
    result = await env.pipeline.run(make_ctx([("authorization", f"Bearer {token}")], body={}))
    assert (result.status, result.code) == (401, "invalid_token")


async def test_route_tenant_and_audience(env: Env) -> None:
    other = Agent(env, "outsider", tenant="globex")
    token = other.token()
    result = await env.pipeline.run(make_ctx(dpop_headers(other, token), body={"amount": 1}))
    assert (result.status, result.code) == (403, "tenant_mismatch")
    agent = Agent(env)
    wrong = agent.token(aud="another-service")
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, wrong), body={"amount": 1}))
    assert result.code == "invalid_audience"
    token = agent.token()
    narrow = dataclasses.replace(PAY, audience="payments-api")
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, token), body={}, route=narrow))
    assert (result.status, result.code) == (401, "invalid_audience")


@pytest.mark.parametrize(
    ("amount", "action", "status", "code"),
    [
        (5, "allow", 200, None),
        (500, "sanitize", 200, None),
        (5000, "approval_needed", 403, "approval_needed"),
        (-1, "deny", 403, "access_denied"),
        ("lots", "deny", 403, "policy_error"),
        (None, "deny", 403, "policy_error"),
    ],
)
async def test_policy_enforcement(
    env: Env, amount: object, action: str, status: int, code: str | None
) -> None:
    activate(env, POLICY)
    agent = Agent(env)
    token = agent.token()
    body = {"amount": amount, "memo": "secret memo"}
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, token), body=body))
    assert (result.action, result.status, result.code) == (action, status, code), result
    if action == "sanitize":
        assert result.body_changed and result.body["memo"] != "secret memo"
    record = next(r for r in env.audit.records() if r["decision_id"] == result.decision_id)
    assert record["policy_version"].startswith("sha256:")


CONVERTED = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: gw}
spec:
  rules:
    - {id: pay, action: allow, match: {tools: ["payments"]}}
    - {id: blocked-account, action: deny, match: {tools: ["payments"]},
       when: {path: request.body.toAccount, in: [42]}}
"""


@pytest.mark.parametrize(
    ("account", "status", "code"),
    [
        (7, 200, None),
        (42, 403, "access_denied"),
        ("42", 403, "policy_error"),
        (True, 403, "policy_error"),
        (42.5, 403, "policy_error"),  # Jackson binds it to an int field as 42
        (42.999, 403, "policy_error"),
        (42.0, 403, "access_denied"),
        (7.5, 403, "policy_error"),
    ],
)
async def test_a_value_the_upstream_would_convert_is_refused(
    env: Env, account: object, status: int, code: str | None
) -> None:
    """Spring binds {"toAccount": "42"} to an int field as 42: a deny on 42 must hold for it."""
    activate(env, CONVERTED)
    agent = Agent(env)
    body = {"toAccount": account}
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, agent.token()), body=body))
    assert (result.status, result.code) == (status, code), result


async def test_a_body_the_policy_reads_must_be_shown_to_it(env: Env) -> None:
    activate(env, POLICY)
    agent = Agent(env)
    streamed = dataclasses.replace(
        make_ctx(dpop_headers(agent, agent.token())),
        body_digest=STREAMED_BODY_DIGEST,
        raw_body=None,
    )
    result = await env.pipeline.run(streamed)
    assert (result.status, result.code) == (400, "invalid_request")
    assert env.pipeline.reads_body(PAY)
    raw = b'{"amount": 5000}'
    plain = dataclasses.replace(
        make_ctx([*dpop_headers(agent, agent.token()), ("content-type", "text/plain")]),
        body_digest=body_digest(raw),
        raw_body=raw,
    )
    result = await env.pipeline.run(plain)
    assert (result.status, result.code) == (400, "invalid_request")


class DownPolicyStore(MemoryPolicyStore):
    def active(self, tenant: str, env: str) -> None:
        raise Unavailable("policy store down", code="policy_unavailable")


async def test_policy_store_down_is_503(env: Env) -> None:
    pipeline = build_pipeline(
        env.services, env.settings, policy_store=DownPolicyStore(), audit=env.audit
    )
    agent = Agent(env)
    token = agent.token()
    result = await pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
    assert (result.status, result.code) == (503, "policy_unavailable")
    assert result.headers["retry-after"] == "1"


class DownRegistry:
    """A registry store that cannot answer (a fake for the RegistryStore protocol)."""

    def _down(self, key: str) -> NoReturn:
        raise Unavailable("registry down", code="registry_unavailable")

    get_agent = get_client = get_tenant = _down


async def test_registry_down_is_503(env: Env) -> None:
    cache = RegistryCache(DownRegistry(), clock=env.services.clock)  # type: ignore[arg-type]
    services = dataclasses.replace(env.services, cache=cache)
    pipeline = build_pipeline(services, env.settings, policy_store=env.policies, audit=env.audit)
    agent = Agent(env)
    token = agent.token()
    result = await pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
    assert (result.status, result.code) == (503, "registry_unavailable")
    assert not result.allowed


async def test_nonce_required(env: Env) -> None:
    key = base64.b64encode(b"n" * 32).decode()
    settings = env.settings.model_copy(update={"dpop_nonce_key": key})
    pipeline = build_pipeline(env.services, settings, policy_store=env.policies, audit=env.audit)
    agent = Agent(env)
    token = agent.token()
    result = await pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
    assert (result.status, result.code) == (401, "use_dpop_nonce")
    nonce = result.headers["dpop-nonce"]
    assert result.headers["www-authenticate"].startswith('DPoP error="use_dpop_nonce"')
    ok = await pipeline.run(make_ctx(dpop_headers(agent, token, nonce=nonce), body={"amount": 1}))
    assert ok.allowed


async def test_proof_window_and_nonce_key_come_from_settings(env: Env, tmp_path: Path) -> None:
    settings = env.settings.model_copy(update={"dpop_iat_window": 10.0})
    pipeline = build_pipeline(env.services, settings, policy_store=env.policies, audit=env.audit)
    agent = Agent(env)
    token = agent.token()
    now = env.services.clock.now()
    old = await pipeline.run(make_ctx(dpop_headers(agent, token, iat=now - 11), body={"amount": 1}))
    assert (old.status, old.code) == (401, "invalid_dpop_proof")
    ok = await pipeline.run(make_ctx(dpop_headers(agent, token, iat=now - 9), body={"amount": 1}))
    assert ok.allowed, ok
    bad = env.settings.model_copy(update={"dpop_nonce_key_file": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"gateway\.dpop_nonce_key"):
        build_pipeline(env.services, bad, policy_store=env.policies, audit=env.audit)


async def test_audit_unavailable_refuses_the_call(env: Env) -> None:
    from sqlalchemy import text

    with env.audit._engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_records"))
    agent = Agent(env)
    token = agent.token()
    result = await env.pipeline.run(make_ctx(dpop_headers(agent, token), body={"amount": 1}))
    assert (result.status, result.code) == (503, "audit_unavailable")
    assert not result.allowed and not result.upstream_headers
    # The gateway's own answer, marked as every one is (an SDK then retries it as the
    # gateway's 503, never takes it for the tool's).
    assert result.headers.get(REFUSAL_FIELD) == refusal_mark(f"DPoP {token}")
    assert result.headers.get("x-aegis-decision-id") == result.decision_id


async def test_attestation_verifies_with_the_published_key(env: Env) -> None:
    from aegis.audit.attest import attestation_rules, request_digest
    from aegis.tokens.verifier import verify_jwt

    agent = Agent(env)
    token = agent.token()
    ctx = make_ctx(dpop_headers(agent, token), body={"amount": 5})
    result = await env.pipeline.run(ctx)
    keyring = env.services.keyring
    issuer = env.services.config.issuer
    jws = verify_jwt(
        result.headers["x-aegis-attestation"], keyring.public_key, attestation_rules(issuer), 0
    )
    claims = jws.payload
    assert claims["decision"] == "allow" and claims["agent_id"] == agent.id
    assert claims["decision_id"] == result.decision_id
    assert claims["request_digest"] == request_digest(
        "POST", ctx.url, ctx.body_digest, attested_fields(ctx)
    )
    forged = result.headers["x-aegis-attestation"].rsplit(".", 1)[0] + "." + b64u_encode(bytes(64))
    with pytest.raises(TokenError):
        verify_jwt(forged, keyring.public_key, attestation_rules(issuer), 0)


QUERY_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: query-rule}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: no-delete, action: deny, reason: no deletes, match: {tools: ["payments"]},
       when: {path: request.query.action, eq: delete}}
"""


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ((("action", "delete"),), 403, "access_denied"),
        ((("action", "read"),), 200, None),
        # ["read", "delete"] is not "delete", and an upstream may read either value.
        ((("action", "read"), ("action", "delete")), 400, "invalid_request"),
        ((("action", "delete"), ("action", "read")), 400, "invalid_request"),
        # A repeated parameter no condition reads is no concern.
        ((("action", "read"), ("tag", "a"), ("tag", "b")), 200, None),
        # ASP.NET Core binds cmd.action to the action of a parameter named cmd, over action.
        ((("action", "read"), ("cmd.action", "delete")), 400, "invalid_request"),
        ((("cmd.action", "delete"),), 400, "invalid_request"),
        ((("action", "read"), ("cmd.note", "x")), 200, None),
        # ASP.NET Core's jQuery value providers read cmd[action] as cmd.action, so as action.
        ((("cmd[action]", "delete"),), 400, "invalid_request"),
        ((("action", "read"), ("cmd[action]", "delete")), 400, "invalid_request"),
        ((("action", "read"), ("cmd[0][action]", "delete")), 400, "invalid_request"),
        ((("action", "read"), ("cmd[note]", "x")), 200, None),
        # Spring's WebDataBinder binds !action as action when no action is sent.
        ((("!action", "delete"),), 400, "invalid_request"),
        ((("action", "read"), ("!action", "delete")), 400, "invalid_request"),
        ((("action", "read"), ("!note", "x")), 200, None),
    ],
)
async def test_a_repeated_query_parameter_the_policy_reads_is_refused(
    env: Env, query: tuple[tuple[str, str], ...], status: int, code: str | None
) -> None:
    activate(env, QUERY_RULE)
    agent = Agent(env)
    ctx = dataclasses.replace(make_ctx(dpop_headers(agent, agent.token())), query=query)
    result = await env.pipeline.run(ctx)
    assert (result.status, result.code) == (status, code), result


SPELLING_RULES = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: spellings}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: cap, action: deny, reason: over the cap, match: {tools: ["payments"]},
       when: {path: request.body.payee.amount, gt: 1000}}
    - {id: no-delete, action: deny, reason: no deletes, match: {tools: ["payments"]},
       when: {path: request.query.action, eq: delete}}
    - {id: blocked, action: deny, reason: blocked account, match: {tools: ["payments"]},
       when: {path: request.headers.x-account, eq: "666"}}
"""


@pytest.mark.parametrize(
    ("body", "query", "fields", "status"),
    [
        # As the policy reads them: decided.
        ({"payee": {"amount": 5}}, (("action", "read"),), (("x-account", "1"),), 200),
        ({"payee": {"amount": 5000}}, (), (), 403),
        ({}, (("action", "delete"),), (), 403),
        ({}, (), (("x-account", "666"),), 403),
        # Other spellings some upstreams read as the same field: refused, whatever the value.
        ({"payee": {"Amount": 5000}}, (), (), 400),  # Go's encoding/json, ASP.NET
        ({"PAYEE": {"amount": 5000}}, (), (), 400),
        ({}, (("ACTION", "delete"),), (), 400),  # ASP.NET Core's Request.Query
        ({}, (("act\u0131on", "delete"),), (), 400),  # dotless i: I to Go and .NET
        ({}, ((" action", "delete"),), (), 400),  # PHP drops leading spaces
        ({}, (("[action]", "delete"),), (), 400),  # Rack 2 and qs read it as action
        ({}, (("action[]", "delete"),), (), 400),  # PHP, Node's qs
        ({}, (("action", "read"), ("action[]", "delete")), (), 400),
        ({}, (), (("x_account", "666"),), 400),  # CGI, WSGI
        ({}, (), (("x-account", "1"), ("x_account", "666")), 400),
        ({}, (), (("x-account", "666"), ("x-account", "1")), 400),  # Starlette reads the first
        # A name policy reads in one place, also sent in the other: one parameter to Rails'
        # params, Laravel's input() or Symfony's get().
        ({"payee": {"amount": 5}}, (("payee", "x"),), (), 400),
        ({"payee": {"amount": 5}}, (("Payee[amount]", "5000"),), (), 400),
        ({"action": "delete"}, (("action", "read"),), (), 400),
        ({"ACTION": "delete"}, (), (), 400),
        # Fields no condition reads are no concern, however spelled or repeated.
        ({"payee": {"amount": 5}, "Note": 1}, (("Tag", "a"), ("tag[]", "b")),
         (("x_trace", "a"), ("x-trace", "b")), 200),
    ],
)  # fmt: skip
async def test_a_field_policy_reads_sent_under_another_spelling_is_refused(
    env: Env,
    body: dict[str, Any],
    query: tuple[tuple[str, str], ...],
    fields: tuple[tuple[str, str], ...],
    status: int,
) -> None:
    activate(env, SPELLING_RULES)
    agent = Agent(env)
    ctx = make_ctx([*dpop_headers(agent, agent.token()), *fields], body=body)
    result = await env.pipeline.run(dataclasses.replace(ctx, query=query))
    assert result.status == status, result
    if status == 400:
        assert result.code == "invalid_request" and "policy for this tool reads" in result.message
        record = next(r for r in env.audit.records() if r["decision_id"] == result.decision_id)
        assert record["action"] == "deny"


@pytest.mark.parametrize(
    "field",
    ["x-http-method-override", "X-HTTP-Method", "x-method-override", "x_http_method_override",
     "x-original-url", "X-Rewrite-URL"],
)  # fmt: skip
async def test_a_field_that_redirects_the_upstream_is_refused(env: Env, field: str) -> None:
    # Decided as POST /payments/charge; Symfony, Laravel or an Express method-override would
    # serve it as a DELETE, IIS URL rewrite as another path.
    agent = Agent(env)
    headers = [*dpop_headers(agent, agent.token()), (field, "DELETE")]
    result = await env.pipeline.run(make_ctx(headers, body={"amount": 5}))
    assert (result.status, result.code) == (400, "invalid_request"), result
    assert field.lower() in result.message
    record = next(r for r in env.audit.records() if r["decision_id"] == result.decision_id)
    assert record["action"] == "deny"


async def test_a_proof_with_a_lone_surrogate_is_refused_and_evidenced(env: Env) -> None:
    """JSON "\\ud800" in a proof's jti is valid escaping but no text: refused as malformed before
    its jti is spent, and the refusal is attested and audited like any other."""
    agent = Agent(env)
    token = agent.token()
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": agent.key.public.to_jwk()}
    claims = {"jti": "\ud800", "htm": "POST", "htu": GW + "/payments/charge",
              "iat": int(time.time()), "ath": access_token_hash(token)}  # fmt: skip
    h = b64u_encode(json.dumps(header).encode())
    p = b64u_encode(json.dumps(claims).encode())  # ensure_ascii: the escape goes on the wire
    proof = f"{h}.{p}.{b64u_encode(agent.key.sign(f'{h}.{p}'.encode()))}"
    result = await env.pipeline.run(
        make_ctx([("authorization", f"DPoP {token}"), ("dpop", proof)], body={"amount": 1})
    )
    assert (result.status, result.code) == (401, "invalid_dpop_proof")
    assert "surrogate" in result.message
    record = next(r for r in env.audit.records() if r["decision_id"] == result.decision_id)
    assert record["action"] == "deny" and "x-aegis-attestation" in result.headers


async def test_a_failure_while_evidencing_is_a_refusal_never_an_answer_without_evidence(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: object) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(env.pipeline._attester, "sign", broken)
    agent = Agent(env)
    result = await env.pipeline.run(
        make_ctx(dpop_headers(agent, agent.token()), body={"amount": 1})
    )
    assert not result.allowed
    assert (result.status, result.code) == (500, "server_error")
    record = next(r for r in env.audit.records() if r["decision_id"] == result.decision_id)
    assert record["action"] == "deny"


async def test_a_method_override_in_the_query_is_refused(env: Env) -> None:
    agent = Agent(env)
    ctx = dataclasses.replace(
        make_ctx(dpop_headers(agent, agent.token()), body={"amount": 5}),
        query=(("_method", "DELETE"),),
    )
    result = await env.pipeline.run(ctx)
    assert (result.status, result.code) == (400, "invalid_request"), result


async def test_a_proof_for_another_hosts_route_is_refused_behind_a_public_url(env: Env) -> None:
    """With ``public_url`` set, a route of its own host is addressed at that host: a proof made
    for the same path on another host is not one for this call."""
    agent = Agent(env)
    admin = dataclasses.replace(PAY, host="admin.example.com")
    token = agent.token()
    elsewhere = [("authorization", f"DPoP {token}"), ("dpop", agent.proof(token))]  # gw.example.com
    result = await env.pipeline.run(make_ctx(elsewhere, body={"amount": 1}, route=admin))
    assert (result.status, result.code) == (401, "invalid_dpop_proof"), result
    proof = mint_proof(agent.key, "POST", "https://admin.example.com/payments/charge", token=token)
    here = [("authorization", f"DPoP {token}"), ("dpop", proof)]
    result = await env.pipeline.run(make_ctx(here, body={"amount": 1}, route=admin))
    assert result.allowed, result


@pytest.mark.parametrize(
    ("raw", "shown", "status"),
    [
        (b"note=1&amount=5", True, 200),
        (b"note=1&action=delete", True, 400),  # Rails reads the form's action over the query's
        (b"note=1&%41CTION=delete", True, 400),
        (b"note=1&[action]=delete", True, 400),  # Rack 2 and qs read it as action
        (b"note=1&cmd[action]=delete", True, 400),  # ASP.NET Core's jQuery form provider
        (b"note=1&cmd%5Baction%5D=delete", True, 400),
        (b"note=1&!action=delete", True, 400),  # Spring's field default prefix
        (b"note=1&cmd[note]=x&!note=y", True, 200),
        (b"note=1", False, 400),  # a form the gateway did not hold may carry it
    ],
)
async def test_a_form_body_shadowing_a_query_parameter_policy_reads_is_refused(
    env: Env, raw: bytes, shown: bool, status: int
) -> None:
    activate(env, QUERY_RULE)
    agent = Agent(env)
    ctx = dataclasses.replace(
        make_ctx([*dpop_headers(agent, agent.token()),
                  ("content-type", "application/x-www-form-urlencoded")]),
        query=(("action", "read"),), body_digest=body_digest(raw), raw_body=raw if shown else None,
    )  # fmt: skip
    result = await env.pipeline.run(ctx)
    assert result.status == status, result


@pytest.mark.parametrize(
    ("content_type", "raw", "status"),
    [
        (None, b"action=delete", 400),  # a POST without a type is a form to Rack
        ("text/plain; x=/json", b'{"action": "delete"}', 400),  # JSON to Laravel
        ("text/x-json", b'{"action": "delete"}', 400),  # JSON to Rails
        ("application/jsonrequest", b'{"action": "delete"}', 400),
        ("text/x-json", b'{"note": "read"}', 200),
        ("text/plain", b"action=delete", 200),  # a text body merges with nothing
    ],
)
async def test_an_untyped_or_json_ish_body_shadowing_a_read_parameter_is_refused(
    env: Env, content_type: str | None, raw: bytes, status: int
) -> None:
    activate(env, QUERY_RULE)
    agent = Agent(env)
    typed = [("content-type", content_type)] if content_type else []
    ctx = dataclasses.replace(
        make_ctx([*dpop_headers(agent, agent.token()), *typed]),
        query=(("action", "read"),), body_digest=body_digest(raw), raw_body=raw,
    )  # fmt: skip
    result = await env.pipeline.run(ctx)
    assert result.status == status, result


@pytest.mark.parametrize("host", ["admin.example.com:8443", "admin.example.com/x", "", "a b"])
def test_a_route_host_is_a_bare_host(host: str) -> None:
    """Matched against the Host header without its port, and named in DPoP htu: a port or path
    there could never match and would refuse every call."""
    from aegis.config import GatewayRoute

    with pytest.raises(ValueError, match="without port"):
        GatewayRoute(path_prefix="/p", host=host, upstream="http://u", tool="t", tenant="a",
                     env="p")  # fmt: skip


async def test_a_route_host_written_with_its_trailing_dot_names_the_host(env: Env) -> None:
    agent = Agent(env)
    token = agent.token()
    route = dataclasses.replace(PAY, host="Admin.Example.com.")
    proof = mint_proof(agent.key, "POST", "https://admin.example.com/payments/charge", token=token)
    ctx = make_ctx([("authorization", f"DPoP {token}"), ("dpop", proof)], body={}, route=route)
    assert (await env.pipeline.run(ctx)).allowed


@pytest.mark.parametrize(
    ("cookie", "status"),
    [
        ("session=abc; action=delete", 400),
        ("session=abc; theme=dark", 200),
        (" ACTION=x", 400),
        ("%61ction=delete", 400),  # older PHP decoded cookie names
        ("[action]=x", 400),  # Rack 2 and qs read it as action
        ("act+ion=x", 200),
    ],
)
async def test_a_cookie_named_like_a_read_parameter_is_refused(
    env: Env, cookie: str, status: int
) -> None:
    """PHP's $_REQUEST reads cookies over the query (variables_order EGPCS)."""
    activate(env, QUERY_RULE)
    agent = Agent(env)
    ctx = dataclasses.replace(
        make_ctx([*dpop_headers(agent, agent.token()), ("cookie", cookie)]),
        query=(("action", "read"),),
    )
    assert (await env.pipeline.run(ctx)).status == status


@pytest.mark.parametrize(
    "url", ["gw.example.com", "https://gw.example.com:99999", "https://u@gw.example.com",
            "https://gw.example.com/?x=1", "ftp://gw.example.com"],
)  # fmt: skip
def test_a_public_url_agents_cannot_address_is_refused_at_load(url: str) -> None:
    from aegis.config import GatewaySettings

    with pytest.raises(ValueError, match="public_url"):
        GatewaySettings.model_validate({"public_url": url})


def test_a_public_url_is_kept_without_its_trailing_slash() -> None:
    from aegis.config import GatewaySettings

    assert GatewaySettings.model_validate({"public_url": "https://gw/"}).public_url == "https://gw"
    assert (
        GatewaySettings.model_validate({"public_url": " https://gw\n"}).public_url == "https://gw"
    )
    assert GatewaySettings.model_validate({"public_url": ""}).public_url is None


BODY_CAP_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: body-cap}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: cap, action: deny, reason: over the cap, match: {tools: ["payments"]},
       when: {path: request.body.amount, gt: 100}}
"""


@pytest.mark.parametrize(
    ("body", "wrapper", "status"),
    [
        ({"amount": 50, "payment": {"amount": 5000}}, "payment", 400),
        ({"payment": {"amount": 5000}}, "payment", 400),
        ({"amount": 50, "Payment": {"amount": 5000}}, "payment", 400),
        ({"amount": 50, "fee": {"amount": 1}}, "payment", 200),
        ({"amount": 5000}, "payment", 403),
        ({"amount": 50, "payment": {"amount": 5000}}, None, 200),  # no wrapper configured
    ],
)
async def test_a_body_sending_the_upstream_wrapper_key_is_refused(
    env: Env, body: dict[str, Any], wrapper: str | None, status: int
) -> None:
    """Rails' ParamsWrapper files a JSON body's members under the controller's key unless the
    body sends that key itself: the controller would read the nested amount, policy the top."""
    activate(env, BODY_CAP_RULE)
    agent = Agent(env)
    route = dataclasses.replace(PAY, wrap_parameters=wrapper)
    result = await env.pipeline.run(
        make_ctx(dpop_headers(agent, agent.token()), body=body, route=route)
    )
    assert result.status == status, result


HOST_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: host-rule}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: admin, action: deny, reason: not on the admin host, match: {tools: ["payments"]},
       when: {path: request.headers.host, eq: admin.example.com}}
"""


@pytest.mark.parametrize(
    ("host", "status"),
    [("admin.example.com", 403), ("ADMIN.Example.com", 403), ("admin.example.com.", 403),
     ("Admin.example.com.:8443", 403), ("admin.example.com:443", 403), ("gw.example.com", 200)],
)  # fmt: skip
async def test_policy_sees_the_host_as_routes_compare_it(env: Env, host: str, status: int) -> None:
    """Host names are case-insensitive and a trailing dot names the same host: a rule on the
    host holds for every spelling of it."""
    activate(env, HOST_RULE)
    agent = Agent(env)
    ctx = make_ctx([*dpop_headers(agent, agent.token()), ("host", host)], body={})
    assert (await env.pipeline.run(ctx)).status == status


@pytest.mark.parametrize(
    ("query", "status"),
    [((("payment[amount]", "5000"),), 400), ((("payment", "x"),), 400),
     ((("Payment", "x"),), 400), ((("note", "x"),), 200)],
)  # fmt: skip
async def test_a_query_naming_the_upstream_wrapper_key_is_refused(
    env: Env, query: tuple[tuple[str, str], ...], status: int
) -> None:
    """Rails wraps only when ``request.parameters`` lacks the key, and they hold the query: with
    ``?payment[amount]=5000`` the controller reads 5000 while policy read the body's amount."""
    activate(env, BODY_CAP_RULE)
    agent = Agent(env)
    route = dataclasses.replace(PAY, wrap_parameters="payment")
    ctx = make_ctx(dpop_headers(agent, agent.token()), body={"amount": 50}, route=route)
    result = await env.pipeline.run(dataclasses.replace(ctx, query=query))
    assert result.status == status, result


PATH_RULES = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: path-rules}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: no-refund, action: deny, reason: no refunds, match: {tools: ["payments"]},
       when: {path: path_loose, eq: /payments/refund}}
    - {id: no-exe, action: deny, reason: no programs, match: {tools: ["payments"]},
       when: {path: path_loose, regex: "[.]exe$"}}
    - {id: no-export, action: deny, reason: no exports, match: {tools: ["payments"]},
       when: {path: path_loose, eq: /payments/export.json}}
"""


@pytest.mark.parametrize(
    ("path", "status"),
    [("/payments/refund", 403), ("/payments/refund.json", 403), ("/payments/Refund/", 403),
     ("/payments/refund.x.y", 403), ("/payments/charge.json", 200), ("/payments/charge/", 200),
     ("/payments/setup.exe", 403), ("/payments/setup.exe/", 403),
     ("/payments/export.json/", 403), ("/payments/export.json", 403),
     ("/payments/a.b.c.d.e.f.g.h.i.j", 400)],
)  # fmt: skip
async def test_a_path_the_policy_decides_apart_from_its_variant_is_refused(
    env: Env, path: str, status: int
) -> None:
    """Rails serves ``/payments/refund.json`` and Express ``/payments/refund/`` as the refund
    path a rule denies; an exact upstream serves them as other paths. A deny under either
    reading denies; a rule testing the extension still holds."""
    activate(env, PATH_RULES)
    agent = Agent(env)
    token = agent.token()
    headers = [("authorization", f"DPoP {token}"),
               ("dpop", mint_proof(agent.key, "POST", GW + path, token=token))]  # fmt: skip
    result = await env.pipeline.run(make_ctx(headers, body={}, path=path))
    assert result.status == status, result


APPROVAL_PATH_RULES = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: approval-paths}
spec:
  rules:
    - {id: pay, action: allow, reason: payments, match: {tools: ["payments"]}}
    - {id: refund, action: approval_needed, reason: refunds need a human,
       match: {tools: ["payments"]}, when: {path: path_loose, eq: /payments/refund},
       approval: {group: finance}}
"""


async def test_a_path_that_needs_an_approval_as_some_upstream_reads_it_is_held(env: Env) -> None:
    """``/payments/refund.json`` is allowed as sent and needs an approval as Rails serves it:
    the readings combine as rules do, so the call is held for the approval."""
    activate(env, APPROVAL_PATH_RULES)
    agent = Agent(env)
    token = agent.token()
    path = "/payments/refund.json"
    headers = [("authorization", f"DPoP {token}"),
               ("dpop", mint_proof(agent.key, "POST", GW + path, token=token))]  # fmt: skip
    result = await env.pipeline.run(make_ctx(headers, body={}, path=path))
    assert (result.status, result.code) == (403, "approval_needed"), result


async def test_the_request_digest_binds_the_fields_the_upstream_acts_on(env: Env) -> None:
    """Two calls differing only in a field a policy decides on (or that says how the body is
    read) are two decisions: their attestations name different request digests; a field the
    upstream never acts on (a trace id) changes nothing."""
    from aegis.audit.attest import attestation_rules
    from aegis.tokens.verifier import verify_jwt

    agent = Agent(env)

    async def digest(*extra: tuple[str, str]) -> str:
        token = agent.token()
        result = await env.pipeline.run(
            make_ctx([*dpop_headers(agent, token), *extra], body={"amount": 1})
        )
        assert result.allowed, result.code
        claims = verify_jwt(
            result.headers["x-aegis-attestation"], env.services.keyring.public_key,
            attestation_rules(env.services.config.issuer), env.services.clock.now(),
        ).payload  # fmt: skip
        return str(claims["request_digest"])

    plain = await digest()
    assert await digest(("x-account", "alice")) != await digest(("x-account", "mallory"))
    assert await digest(("content-encoding", "identity")) != plain
    # Every field the upstream receives, tracing and application data (baggage) included.
    for field in ("baggage", "user-agent", "x-request-id", "date", "traceparent"):
        assert await digest((field, "a")) != await digest((field, "b")), field
    # Not the credentials (fresh on every call) nor fields the upstream never receives.
    assert await digest(("connection", "close"), ("x-aegis-role", "admin")) == plain
