"""RFC 8693 token exchange for delegation chains: the happy path, each refusal with its own code,
on-behalf-of a user from a configured issuer, and scope intersection as a property."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.audit.log import AuditLog
from aegis.clock import new_id
from aegis.crypto.jws import encode_segment, parse_compact, sign_compact
from aegis.crypto.keys import Ed25519SigningKey
from aegis.errors import AegisError, ConfigError, Unavailable
from aegis.tokens.chain import root_link_horizon, verify_chain
from aegis.tokens.delegation import CHAIN_SEPARATOR
from aegis.tokens.exchange import EXCHANGE_AUDIT_KIND, JWT_TYPE, nested_act
from aegis.tokens.external import ExternalIssuer, load_trust
from aegis.types import AgentStatus
from tests.support.delegation import ISSUER, Handle, World, client_assertion

USER_ISS = "https://login.example"
USER_KEY = Ed25519SigningKey.generate()


async def refused(world: World, child: Handle, subject: str, **form: str) -> AegisError:
    with pytest.raises(AegisError) as exc:
        await world.exchange(child, subject, **form)
    return exc.value


async def test_orchestrator_to_finance_to_payments() -> None:
    w = World()
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    issued = await w.exchange(fin, w.grant(orch, fin), scope="payments:write")
    c = issued.claims
    assert (c["sub"], c["client_id"], c["aud"]) == ("finance", fin.client_id, "aegis-gateway")
    assert c["scope"] == "payments:write"
    assert c["act"] == {"sub": "finance", "act": {"sub": "orchestrator"}}
    assert c["delegation_depth"] == 1
    assert c["tools"] == ["pay_invoice", "read_ledger"]
    assert "origin_user" not in c
    issued = await w.exchange(pay, w.grant(fin, pay, scopes=("payments:write",), max_depth=2))
    c = issued.claims
    assert c["act"] == nested_act(["orchestrator", "finance", "payments"])
    assert c["act"]["act"]["act"] == {"sub": "orchestrator"}
    assert c["delegation_depth"] == 2
    assert c["scope"] == "payments:write"
    assert len(c["parent_agent"].split(CHAIN_SEPARATOR)) == 2


async def test_scopes_are_requested_and_granted_and_allowed() -> None:
    w = World()
    orch = w.agent("orchestrator")
    fin = w.agent("finance", scopes=("payments:read", "ledger:read"))
    grant = w.grant(orch, fin, scopes=("payments:read", "payments:write"))
    err = await refused(w, fin, grant, scope="payments:write")  # granted, not allowed
    assert err.code == "invalid_scope"
    # A refused request spends nothing: the same grant still works.
    issued = await w.exchange(fin, grant)
    assert issued.claims["scope"] == "payments:read"


async def test_audience_is_restricted() -> None:
    w = World()
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    assert (await refused(w, fin, w.grant(orch, fin), audience="evil-api")).code == "invalid_target"
    err = await refused(w, fin, w.grant(orch, fin), audience="aegis-gateway payments-api")
    assert err.code == "invalid_target"
    issued = await w.exchange(fin, w.grant(orch, fin), audience="payments-api")
    assert issued.claims["aud"] == "payments-api"


async def test_each_refusal_has_its_own_code(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aegis")
    w = World()
    orch = w.agent("orchestrator")
    fin, pay = w.agent("finance"), w.agent("payments")
    other = w.agent("other", tenant="globex")
    intruder = w.agent("intruder")
    cases: dict[str, Any] = {}
    # A grant signed by another agent's key, claiming to be the orchestrator's.
    cases["parent_signature_invalid"] = (fin, w.grant(orch, fin, key=intruder.key))
    expired = w.grant(orch, fin, lifetime=60)
    w.clock.advance(91)
    cases["parent_expired"] = (fin, expired)
    cases["scope_widened"] = (fin, w.grant(orch, fin, scopes=("payments:write", "admin:all")))
    cases["tenant_mismatch"] = (other, w.grant(orch, other))
    cases["invalid_grant"] = (pay, w.grant(orch, fin))  # made for finance, presented by payments
    for code, (child, subject) in cases.items():
        err = await refused(w, child, subject)
        assert err.code == "invalid_request", code  # RFC 8693 §2.2.2
        assert err.details["reason"] == code
        assert f"({code})" in err.message
        assert err.details["chain"][-1]["sub"] in {"finance", "globex", "other"}
    events = [r for r in caplog.records if r.getMessage() == "delegation.rejected"]
    assert [e.aegis_fields["code"] for e in events] == list(cases)  # type: ignore[attr-defined]
    for event in events:
        fields = event.aegis_fields  # type: ignore[attr-defined]
        assert fields["stage"] == "exchange"
        assert all(set(link) <= {"iss", "sub", "jti", "scope"} for link in fields["chain"])
        assert "." not in str(fields["chain"]).replace("payments:", "")  # no compact token


async def test_replayed_grant() -> None:
    w = World()
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    grant = w.grant(orch, fin)
    await w.exchange(fin, grant)
    err = await refused(w, fin, grant)
    assert err.details["reason"] == "grant_replayed"


async def test_depth_is_bounded_by_each_link_and_by_the_maximum() -> None:
    w = World()
    a, b, c = w.agent("a1"), w.agent("a2"), w.agent("a3")
    await w.exchange(b, w.grant(a, b, max_depth=0))
    err = await refused(w, c, w.grant(b, c, max_depth=0))
    assert err.details["reason"] == "delegation_too_deep"  # a1 allowed no re-delegation
    agents = [w.agent(f"hop{i}") for i in range(6)]
    for i, (parent, child) in enumerate(itertools.pairwise(agents[:5])):
        await w.exchange(child, w.grant(parent, child, max_depth=8 - i))
    err = await refused(w, agents[5], w.grant(agents[4], agents[5], max_depth=0))
    assert err.details["reason"] == "delegation_too_deep"  # five links, maximum four


async def test_cycle_and_retired_parent() -> None:
    w = World()
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    await w.exchange(fin, w.grant(orch, fin))
    err = await refused(w, orch, w.grant(fin, orch, max_depth=1))
    assert err.details["reason"] == "delegation_cycle"
    grant = w.grant(fin, pay, max_depth=1)
    w.registry.set_agent_status("orchestrator", AgentStatus.RETIRED, actor="test")
    err = await refused(w, pay, grant)
    assert err.details["reason"] == "parent_inactive"


async def test_forged_act_in_a_grant_or_assertion_grants_nothing() -> None:
    w = World()
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    grant = w.grant(orch, fin, act={"sub": "finance", "act": {"sub": "root-admin"}})
    issued = await w.exchange(fin, grant)
    assert issued.claims["act"] == {"sub": "finance", "act": {"sub": "orchestrator"}}


async def test_request_shape_errors() -> None:
    w = World()
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    grant = w.grant(orch, fin)
    for form in (
        {"subject_token_type": "urn:example:unknown"},
        {"actor_token_type": "urn:ietf:params:oauth:token-type:access_token"},
        {"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
        {"client_secret": "x"},
    ):
        assert (await refused(w, fin, grant, **form)).code == "invalid_request"
    err = await refused(w, fin, grant, actor_token="a.b.c")
    assert err.details["reason"] == "invalid_client"
    assert (await w.exchange(fin, grant)).claims["sub"] == "finance"  # nothing was spent


def _user_token(**over: Any) -> str:
    now = int(World().clock.now())
    claims = {
        "iss": USER_ISS,
        "sub": "alice@example.com",
        "aud": ISSUER,
        "iat": now,
        "exp": now + 600,
        "jti": new_id(),
        "scope": "payments:read payments:write",
        "may_act": {"sub": "finance"},
    }
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not None}
    header = encode_segment({"alg": "EdDSA", "typ": "JWT", "kid": USER_KEY.kid})
    return sign_compact(header, claims, USER_KEY.sign)


def _user_world(tmp_path: Path, **over: Any) -> World:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [USER_KEY.public.to_jwk()]}))
    settings = ExternalIssuer(issuer=USER_ISS, tenant="acme", jwks_file=str(path), **over)
    return World(external=(load_trust(settings, base_dir=tmp_path, default_audience=ISSUER),))


async def test_on_behalf_of_a_user_through_the_chain(tmp_path: Path) -> None:
    w = _user_world(tmp_path)
    fin, pay = w.agent("finance"), w.agent("payments")
    issued = await w.exchange(fin, _user_token(), subject_type=JWT_TYPE)
    c = issued.claims
    assert (c["origin_user"], c["origin_iss"], c["delegation_depth"]) == (
        "alice@example.com",
        USER_ISS,
        1,
    )
    assert c["act"] == {"sub": "finance"}
    issued = await w.exchange(pay, w.grant(fin, pay, max_depth=1))
    assert issued.claims["origin_user"] == "alice@example.com"
    assert issued.claims["act"] == {"sub": "payments", "act": {"sub": "finance"}}


async def test_user_token_refusals(tmp_path: Path) -> None:
    w = _user_world(tmp_path)
    fin, pay = w.agent("finance"), w.agent("payments")
    other = w.agent("other", tenant="globex")
    intruder = Ed25519SigningKey.generate()
    forged = sign_compact(
        encode_segment({"alg": "EdDSA", "kid": USER_KEY.kid}),
        {"iss": USER_ISS, "sub": "alice", "aud": ISSUER, "iat": 1, "exp": 2},
        intruder.sign,
    )
    cases = [
        (pay, _user_token(), "access_denied"),  # may_act names finance only
        # The identity provider's own "finance", not Aegis's agent of that name.
        (
            fin,
            _user_token(may_act={"iss": "https://idp.example", "sub": "finance"}),
            "access_denied",
        ),
        (fin, _user_token(may_act=None), "access_denied"),  # required by default
        (fin, _user_token(iss="https://other.example"), "invalid_grant"),
        (fin, _user_token(aud="https://elsewhere"), "invalid_audience"),
        (fin, forged, "invalid_signature"),
        (other, _user_token(may_act={"sub": "other"}), "tenant_mismatch"),
    ]
    for child, token, reason in cases:
        err = await refused(w, child, token, subject_type=JWT_TYPE)
        assert (err.code, err.details["reason"]) == ("invalid_request", reason)
    # The token service's own root link cannot be replayed as a grant.
    await w.exchange(
        fin, _user_token(may_act={"iss": ISSUER, "sub": "finance"}), subject_type=JWT_TYPE
    )  # naming Aegis as the actors' issuer is fine
    err = await refused(w, fin, CHAIN_SEPARATOR.join(fin.links))
    assert err.details["reason"] == "invalid_grant"


async def test_a_token_acting_for_a_user_never_outlives_the_users_token(tmp_path: Path) -> None:
    """The leeway forgives skew in judging the user's token, not a new token minted from it:
    an expired user token (inside the leeway) is refused, and a live one bounds the token and
    the root link Aegis signs for it, however long a life the agent asks for."""
    w = _user_world(tmp_path)
    fin = w.agent("finance")
    now = int(w.clock.now())
    err = await refused(w, fin, _user_token(iat=now - 600, exp=now - 10), subject_type=JWT_TYPE)
    assert (err.code, err.details["reason"]) == ("invalid_request", "token_expired")
    issued = await w.exchange(
        fin, _user_token(iat=now - 60, exp=now + 45), subject_type=JWT_TYPE, expires_in="3600"
    )
    assert issued.claims["exp"] <= now + 45
    root = parse_compact(issued.claims["parent_agent"].split(CHAIN_SEPARATOR)[0]).payload
    assert root["exp"] <= now + 45


def test_external_issuer_config_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ExternalIssuer(issuer=USER_ISS, tenant="acme")
    bad = ExternalIssuer(issuer=USER_ISS, tenant="acme", jwks={"keys": [USER_KEY.private_jwk()]})
    with pytest.raises(ConfigError):
        load_trust(bad, base_dir=tmp_path, default_audience=ISSUER)
    missing = ExternalIssuer(issuer=USER_ISS, tenant="acme", jwks_file="nope.json")
    with pytest.raises(ConfigError):
        load_trust(missing, base_dir=tmp_path, default_audience=ISSUER)


SCOPES = ["a", "b", "c", "d", "e"]
scope_sets = st.sets(st.sampled_from(SCOPES))


@settings(max_examples=40, deadline=None)
@given(allowed=scope_sets, granted=scope_sets, requested=scope_sets, parent=scope_sets)
def test_issued_scope_is_the_intersection(
    allowed: set[str], granted: set[str], requested: set[str], parent: set[str]
) -> None:
    async def run() -> None:
        w = World()
        orch = w.agent("orchestrator", scopes=tuple(sorted(parent)) or ("z",))
        fin = w.agent("finance", scopes=tuple(sorted(allowed)) or ("z",))
        form = {"scope": " ".join(sorted(requested))} if requested else {}
        grant = w.grant(orch, fin, scopes=tuple(sorted(granted)))
        base = granted & allowed
        if not granted <= (parent or {"z"}):
            assert (await refused(w, fin, grant, **form)).details["reason"] == "scope_widened"
            return
        if not base or not requested <= base:
            assert (await refused(w, fin, grant, **form)).code == "invalid_scope"
            return
        issued = await w.exchange(fin, grant, **form)
        scopes = set(issued.claims["scope"].split())
        assert scopes
        assert scopes <= granted & allowed <= parent
        assert scopes == (requested or granted & allowed)

    asyncio.run(run())


async def test_exchanges_are_audited_and_an_unwritable_log_issues_nothing(tmp_path: Path) -> None:
    log = AuditLog(f"sqlite:///{tmp_path / 'audit.db'}", clock=World().clock)
    w = World(audit=log.append_async)
    orch, fin, pay = w.agent("orchestrator"), w.agent("finance"), w.agent("payments")
    issued = await w.exchange(fin, w.grant(orch, fin))
    await refused(w, pay, w.grant(fin, pay, scopes=("admin:all",), max_depth=1))
    ok, no = list(log.records(kind=EXCHANGE_AUDIT_KIND))
    assert (ok["action"], ok["chain"], ok["token_jti"]) == (
        "issued",
        ["orchestrator", "finance"],
        issued.claims["jti"],
    )
    assert (no["action"], no["code"], no["agent_id"]) == ("refused", "scope_widened", "payments")
    assert [link["sub"] for link in no["chain_presented"]] == ["finance", "payments"]
    log.close()

    async def unwritable(kind: str, record: dict[str, Any]) -> None:
        raise Unavailable("the audit log cannot be written", code="audit_unavailable")

    w = World(audit=unwritable)
    orch, fin = w.agent("orchestrator"), w.agent("finance")
    err = await refused(w, fin, w.grant(orch, fin))
    assert err.code == "audit_unavailable"  # fail closed: no record, no token
    # A refusal stands even when its record cannot be written.
    assert (await refused(w, fin, "junk")).code == "invalid_request"


async def test_a_rotation_of_the_service_key_leaves_user_rooted_chains_valid(
    tmp_path: Path,
) -> None:
    """The service signs a user-rooted chain's first link; tokens exchanged below it, after a
    routine rotation, still carry it and verify until they expire (the user's token, which
    bounds them all, lives long enough here)."""
    w = _user_world(tmp_path, max_lifetime=86400)
    fin, pay = w.agent("finance"), w.agent("payments")
    user = _user_token(exp=int(w.clock.now()) + 86400)
    await w.exchange(fin, user, subject_type=JWT_TYPE, expires_in="3600")
    w.clock.advance(3000)
    w.keyring.rotate(force=True)  # the root link's key is retired
    w.clock.advance(500)
    await w.exchange(pay, w.grant(fin, pay, max_depth=1), expires_in="3600")
    w.clock.advance(3200)  # past the access-token overlap of the retired key
    assert pay.token is not None and w.clock.now() < pay.token.exp
    assert verify_chain(pay.token, cache=w.cache, rules=w.rules, now=w.clock.now()).depth == 2
    w.clock.advance(root_link_horizon(w.rules))  # long past any token the chain could carry
    with pytest.raises(AegisError) as exc:
        verify_chain(pay.token, cache=w.cache, rules=w.rules, now=w.clock.now())
    assert exc.value.code in ("parent_signature_invalid", "parent_expired")


def test_a_first_link_with_an_iat_out_of_any_range_is_a_typed_refusal() -> None:
    """The iat of a first link is read before its signature to choose the keys that may verify
    it: a number no float holds must be a refusal, not an OverflowError (a 500)."""
    from aegis.crypto.keys import b64u_encode
    from aegis.tokens.chain import ChainRules, verify_links

    head = b64u_encode(
        json.dumps({"alg": "EdDSA", "typ": "aegis-delegation+jwt", "kid": "k"}).encode()
    )
    body = b64u_encode(('{"iss":"https://ts","iat":' + "9" * 400 + "}").encode())
    link = f"{head}.{body}.{b64u_encode(b'x' * 64)}"
    rules = ChainRules(issuer="https://ts", service_keys=lambda kid, **_: None)
    with pytest.raises(AegisError):
        verify_links([link], cache=None, rules=rules, tenant="t", env="e", at=0)  # type: ignore[arg-type]


async def test_nothing_below_a_user_outlives_the_users_token(tmp_path: Path) -> None:
    """The user's expiry is signed into the root link: a token exchanged further down is capped
    at it, no link signed after it is exchanged, and the gateway refuses every token of the
    chain past it."""
    w = _user_world(tmp_path)
    fin, pay = w.agent("finance"), w.agent("payments")
    user_exp = int(w.clock.now()) + 45
    await w.exchange(fin, _user_token(exp=user_exp), subject_type=JWT_TYPE)
    issued = await w.exchange(pay, w.grant(fin, pay, max_depth=1), expires_in="3600")
    assert issued.claims["origin_user"] == "alice@example.com"
    assert issued.claims["exp"] <= user_exp
    assert pay.token is not None
    assert verify_chain(pay.token, cache=w.cache, rules=w.rules, now=w.clock.now()).depth == 2
    w.clock.advance(45 + w.rules.leeway)
    with pytest.raises(AegisError) as info:
        verify_chain(pay.token, cache=w.cache, rules=w.rules, now=w.clock.now())
    assert info.value.code == "parent_expired"
    # Finance signs a fresh grant under the chain half an hour later: refused.
    w.clock.advance(1800)
    with pytest.raises(AegisError) as info:
        await w.exchange(pay, w.grant(fin, pay, max_depth=1), expires_in="3600")
    assert "parent_expired" in info.value.message


async def test_an_exchange_that_waited_past_the_users_token_mints_nothing(tmp_path: Path) -> None:
    """The user's expiry is judged when the token is minted, after the exchange's awaits (a
    slow replay store spending the proof): a token is never minted after the user's, nor
    outlives it."""
    w = _user_world(tmp_path)
    fin = w.agent("finance")
    user_exp = int(w.clock.now()) + 5

    async def slow_spend() -> None:  # the replay store answers 8 s later
        w.clock.advance(8)

    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": _user_token(exp=user_exp),
        "subject_token_type": JWT_TYPE,
        "actor_token": client_assertion(fin, w.clock.now()),
        "actor_token_type": JWT_TYPE,
    }
    with pytest.raises(AegisError) as info:
        await w.exchanger.exchange(form, [], authorization=None, source="test", spend=slow_spend)
    assert "parent_expired" in info.value.message, (info.value.code, info.value.message)


@pytest.mark.parametrize("after", [-0.5, 0.0, 10.0])
async def test_nothing_is_minted_in_the_leeway_after_the_users_token(
    tmp_path: Path, after: float
) -> None:
    """The leeway forgives skew in judging a token, not a new one minted from it: a link signed
    in the last half second of the user's token, or within the leeway after it, is refused at
    the exchange, never turned into a token that outlives the user's."""
    w = _user_world(tmp_path)
    fin, pay = w.agent("finance"), w.agent("payments")
    user_exp = int(w.clock.now()) + 45
    await w.exchange(fin, _user_token(exp=user_exp), subject_type=JWT_TYPE)
    w.clock.advance(user_exp - w.clock.now() + after)
    assert after < w.rules.leeway  # the chain itself would still verify
    with pytest.raises(AegisError) as info:
        await w.exchange(pay, w.grant(fin, pay, max_depth=1), expires_in="3600")
    assert "parent_expired" in info.value.message
