"""What the SDK sends where: a DPoP nonce goes back to the server that issued it only; client
credentials, tokens and proofs travel over https only (or to loopback); a cached token's repr
holds no token; an approval wait refreshes a token that expired meanwhile. Against real loopback servers that record every request."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from aegis.clock import FrozenClock
from aegis.crypto.keys import Ed25519SigningKey
from aegis.sdk import AgentClient, ApprovalPolicy, CachedToken, ClientSecret, PrivateKey
from aegis.sdk.auth import AegisAuth
from tests.sdk.recording import Answer, recording_server, refusal

T0 = 1_800_000_000.0


def _payload(jws: str) -> dict[str, Any]:
    seg = jws.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))))


def _agent_with_token(origins: list[str] | None = None) -> tuple[AgentClient, AegisAuth]:
    agent = AgentClient("http://127.0.0.1:9", PrivateKey("client-1", Ed25519SigningKey.generate()))
    auth = agent.auth(audience="aegis-gateway", scope="payments:write", origins=origins)
    now = agent.clock.now()
    agent.tokens.put(
        auth._key, CachedToken("header.payload.sig", "DPoP", now, now + 300, "payments:write", {})
    )
    return agent, auth


def test_a_dpop_nonce_goes_back_only_to_the_server_that_issued_it() -> None:
    def demand_nonce(method: str, path: str, headers: dict[str, str]) -> Answer:
        if _payload(headers["dpop"]).get("nonce") != "nonce-from-A":
            status, fields, body = refusal(401, "use_dpop_nonce")
            return status, {**fields, "DPoP-Nonce": "nonce-from-A"}, body
        return 200, {}, b"{}"

    with (
        recording_server(demand_nonce) as (a_url, a_seen),
        recording_server() as (b_url, b_seen),
    ):
        agent, auth = _agent_with_token(origins=[a_url, b_url])
        http = httpx.Client(auth=auth)
        assert http.get(f"{a_url}/tool").status_code == 200
        assert http.get(f"{b_url}/other-tool").status_code == 200
        assert http.get(f"{a_url}/tool").status_code == 200  # A's nonce kept for A: one trip
        http.close()
    assert "nonce" not in _payload(b_seen[0]["headers"]["dpop"])
    assert [_payload(s["headers"]["dpop"]).get("nonce") for s in a_seen] == [
        None, "nonce-from-A", "nonce-from-A"]  # fmt: skip
    agent.close()


@pytest.mark.parametrize("url", ["http://aegis.example.com", "ftp://aegis.example.com"])
def test_credentials_are_not_sent_in_clear(url: str) -> None:
    with pytest.raises(ValueError, match="https only"):
        AgentClient(url, ClientSecret("cid", "s3cret"))
    agent, auth = _agent_with_token()
    with httpx.Client(auth=auth) as http, pytest.raises(ValueError, match="https only"):
        http.get("http://gateway.example.com/payments")
    agent.close()


def test_an_auth_sends_its_token_to_its_own_origins_only() -> None:
    """A token is for one audience, not for whatever URL the caller (or an agent's prompt)
    hands the client: an auth sends it to the origins it was given, by default to its first
    request's, and refuses any other before a byte is sent."""
    with recording_server() as (gw, gw_seen), recording_server() as (evil, evil_seen):
        agent, auth = _agent_with_token()  # pinned to the first request's origin
        with httpx.Client(auth=auth) as http:
            assert http.get(f"{gw}/payments").status_code == 200
            with pytest.raises(ValueError, match="sends its token to"):
                http.get(f"{evil}/collect")
            assert http.get(f"{gw}/payments/2").status_code == 200
        agent.close()
        agent, auth = _agent_with_token(origins=[f"{gw}/any/path"])  # named: an origin, no path
        with httpx.Client(auth=auth) as http:
            with pytest.raises(ValueError, match="sends its token to"):
                http.get(f"{evil}/collect")  # not even as the first request
            assert http.get(f"{gw}/other").status_code == 200
        agent.close()
        agent, _ = _agent_with_token()
        with agent.client(gw, audience="aegis-gateway", scope="payments:write") as own:
            with pytest.raises(ValueError, match="sends its token to"):
                own.get(f"{evil}/collect")  # an absolute URL past the client's base URL
            assert own.get("/payments").status_code == 200
        agent.close()
    assert evil_seen == []
    assert [s["path"] for s in gw_seen] == ["/payments", "/payments/2", "/other", "/payments"]
    assert all(s["headers"]["authorization"].startswith("DPoP ") for s in gw_seen)


def test_a_cached_tokens_repr_holds_no_token() -> None:
    token = CachedToken("eyJsecret.access.token", "DPoP", 0.0, 300.0, "s", {"sub": "a"})
    assert "eyJsecret" not in repr(token) and "sub" not in repr(token)


# -- an approval wait outliving the token ---------------------------------------------------


def _jws(claims: dict[str, object]) -> str:
    def enc(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{enc({'alg': 'EdDSA', 'typ': 'at+jwt'})}.{enc(claims)}.c2ln"


def _held_until(
    clock: FrozenClock, approved_at: float, path: str, headers: dict[str, str]
) -> Answer:
    """A gateway and control plane in one: the call is held for approval (approval_needed) until
    ``approved_at``, its status polled at /v1/approvals/a1, then passed with override ovr-1."""
    if path.startswith("/v1/approvals/"):
        state = "pending" if clock.now() < approved_at else "approved"
        answer = {"state": state, "override_token": "ovr-1"}
        return 200, {"content-type": "application/json"}, json.dumps(answer).encode()
    if headers.get("x-aegis-override") == "ovr-1":
        return 200, {}, b"{}"
    return refusal(403, "approval_needed", decision="d-1", approval_id="a1",
                   status_url="/v1/approvals/a1")  # fmt: skip


def test_an_approval_wait_outliving_the_token_refreshes_it() -> None:
    """A token fetched a while ago is used until 30 s before it expires; an approval wait lasts
    minutes. Each poll takes the cached token anew, and one the server refuses as expired (its
    clock ahead of the agent's) is refreshed and the poll repeated: a human's approval is not
    lost to an expired token."""
    clock = FrozenClock(T0)
    old = _jws({"jti": "old", "exp": T0 + 60})
    new = _jws({"jti": "new", "exp": T0 + 10_000})

    def server(method: str, path: str, headers: dict[str, str]) -> Answer:
        token = headers.get("authorization", "").split(" ", 1)[-1]
        if path == "/oauth/token":
            body = {"access_token": new, "token_type": "DPoP", "expires_in": 9_000}
            return 200, {"content-type": "application/json"}, json.dumps(body).encode()
        if token == old and clock.now() >= T0 + 10:  # the server's clock runs ahead
            return refusal(401, "token_expired", decision="d-exp")
        return _held_until(clock, T0 + 90, path, headers)

    with recording_server(server) as (url, seen):
        agent = AgentClient(url, PrivateKey("c", Ed25519SigningKey.generate()), clock=clock,
                            approvals=ApprovalPolicy(timeout=120, poll_initial=5, poll_max=5),
                            sleep=clock.advance)  # fmt: skip
        auth = agent.auth(audience="aegis-gateway")
        # Fetched a while ago, still fresh by the cache's rule (more than 30 s left).
        agent.tokens.put(auth._key, CachedToken(old, "DPoP", T0 - 240, T0 + 60, "", {}))
        with httpx.Client(auth=auth) as http:
            response = http.post(f"{url}/treasury/transfer", json={"amount": 250_000})
        assert response.status_code == 200
        agent.close()
    polls = [s["headers"]["authorization"].split(" ", 1)[1] for s in seen
             if s["path"].startswith("/v1/approvals/")]  # fmt: skip
    assert old in polls and polls[-1] == new  # the expired one refreshed once, then polled on


def test_a_redirect_to_another_origin_carries_no_proof_nor_override() -> None:
    """httpx strips Authorization on a redirect to another origin but keeps the rest: the
    agent's clients remove a DPoP proof made for another origin, and the override with it;
    a redirect within the origin keeps both (its proof is that origin's)."""
    agent, _ = _agent_with_token()  # the client's own auth finds the same cached token
    with recording_server() as (elsewhere, elsewhere_seen):

        def redirect(method: str, path: str, headers: dict[str, str]) -> Answer:
            if path == "/payments/transfer":
                return 307, {"location": f"{elsewhere}/collect"}, b""
            if path == "/here":
                return 307, {"location": "/payments/done"}, b""
            return 200, {}, b"{}"

        with (
            recording_server(redirect) as (gw, gw_seen),
            agent.client(gw, audience="aegis-gateway", scope="payments:write") as http,
        ):
            http.post("/payments/transfer", json={"amount": 1}, follow_redirects=True,
                      headers={"x-aegis-override": "ovr-1"})  # fmt: skip
            http.get("/here", follow_redirects=True)
    got = elsewhere_seen[0]["headers"]
    assert "authorization" not in got and "dpop" not in got and "x-aegis-override" not in got
    same = gw_seen[-1]["headers"]  # /payments/done, redirected within the gateway's origin
    assert gw_seen[-1]["path"] == "/payments/done" and "dpop" in same
    agent.close()


def test_an_answer_after_a_redirect_is_passed_on_never_retried() -> None:
    """The answer to a request a redirect made is not the gateway's decision on the call sent:
    the gateway acted on a POST and redirected to another origin, whose 503 must not send the
    POST again (a second transfer), nor its nonce go back to the gateway."""
    agent, _ = _agent_with_token()
    nonce = {**refusal(401, "use_dpop_nonce")[1], "DPoP-Nonce": "nonce-from-B"}
    for answer in (refusal(503, "replay_store_unavailable"),
                   (401, nonce, refusal(401, "use_dpop_nonce")[2])):  # fmt: skip

        def redirect(method: str, path: str, headers: dict[str, str]) -> Answer:
            return 303, {"location": f"{elsewhere}/s"}, b""

        with (
            recording_server(lambda m, p, h, a=answer: a) as (elsewhere, _),
            recording_server(redirect) as (gw, gw_seen),
            agent.client(gw, audience="aegis-gateway", scope="payments:write") as http,
        ):
            got = http.post("/payments/transfer", json={"amount": 1}, follow_redirects=True)
        assert got.status_code == answer[0]
        assert [s["method"] for s in gw_seen] == ["POST"]
        assert "nonce" not in _payload(gw_seen[0]["headers"]["dpop"])
    agent.close()


def test_a_redirect_to_another_origin_carries_no_override_without_a_proof() -> None:
    """Certificate-bound and Bearer tokens carry no proof: the override still stays behind."""
    agent = AgentClient("http://127.0.0.1:9", PrivateKey("c", Ed25519SigningKey.generate()),
                        dpop=False)  # fmt: skip
    auth = agent.auth(audience="aegis-gateway", scope="payments:write")
    now = agent.clock.now()
    agent.tokens.put(auth._key, CachedToken("h.p.s", "Bearer", now, now + 300, "", {}))

    def redirect(method: str, path: str, headers: dict[str, str]) -> Answer:
        return 307, {"location": f"{elsewhere}/collect"}, b""

    with (
        recording_server() as (elsewhere, elsewhere_seen),
        recording_server(redirect) as (gw, _),
        agent.client(gw, audience="aegis-gateway", scope="payments:write") as http,
    ):
        http.post("/payments/transfer", json={"amount": 1}, follow_redirects=True,
                  headers={"x-aegis-override": "ovr-1"})  # fmt: skip
    agent.close()
    got = elsewhere_seen[0]["headers"]
    assert "authorization" not in got and "x-aegis-override" not in got


def test_a_dpop_proof_never_carries_the_urls_userinfo() -> None:
    """RFC 9449 §4.2: ``htu`` is the HTTP target URI (no query, no fragment); RFC 9110 §4.2.4:
    a sender must not generate userinfo in one: a password in the URL handed to the client is
    never signed into a proof sent (and perhaps logged) with every request."""
    with recording_server() as (gw, seen):
        agent, auth = _agent_with_token()
        url = gw.replace("http://", "http://svc:hunter2@") + "/payments"
        with httpx.Client(auth=auth) as http:
            assert http.get(url).status_code == 200
        agent.close()
    proof = seen[0]["headers"]["dpop"]
    htu = _payload(proof)["htu"]
    assert "hunter2" not in htu, htu
    assert htu == f"{gw}/payments"


def test_the_call_after_an_approval_wait_is_not_sent_with_a_stale_token() -> None:
    """A token is replaced before anything is sent with it past its refresh point: the call
    sent again with its one-time override after an approval wait of minutes carries the token
    the cache holds then, not the one taken before the wait (stale, or bound to a certificate
    renewed meanwhile)."""
    clock = FrozenClock(T0)
    issued: list[str] = []

    def server(method: str, path: str, headers: dict[str, str]) -> Answer:
        if path == "/oauth/token":
            token = _jws({"jti": f"t{len(issued)}", "iat": clock.now()})
            issued.append(token)
            body = {"access_token": token, "token_type": "DPoP", "expires_in": 300}
            return 200, {"content-type": "application/json"}, json.dumps(body).encode()
        return _held_until(clock, T0 + 280, path, headers)

    with recording_server(server) as (url, seen):
        agent = AgentClient(url, PrivateKey("c", Ed25519SigningKey.generate()), clock=clock,
                            approvals=ApprovalPolicy(timeout=600, poll_initial=10, poll_max=10),
                            sleep=clock.advance)  # fmt: skip
        with httpx.Client(auth=agent.auth(audience="aegis-gateway")) as http:
            response = http.post(f"{url}/treasury/transfer", json={"amount": 250_000})
        assert response.status_code == 200
        agent.close()
    final = [s for s in seen if s["headers"].get("x-aegis-override") == "ovr-1"]
    assert len(final) == 1
    sent_with = final[0]["headers"]["authorization"].split(" ", 1)[1]
    # The first token (issued at T0, lifetime 300 s, margin 30 s) is stale from T0 + 270; the
    # call with the override left after T0 + 280.
    assert len(issued) >= 2
    assert sent_with == issued[-1], "the override call carried the token the cache had replaced"
