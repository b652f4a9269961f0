"""HTTP ext_authz over a real socket: Envoy's HTTP service mode (the check request is the original
request) and nginx ``auth_request`` (the original method and URI in headers, believed only from a
trusted proxy). 200 allows with ``x-aegis-*`` headers; a refusal answers its status and JSON."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from aegis.config import ExtAuthzSettings, GatewaySettings
from aegis.errors import REFUSAL_FIELD, refusal_mark
from aegis.gateway.ext_authz import ExtAuthz
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from aegis.policy.decision import DEFAULT_DENY_REASON
from aegis.policy.loader import load_document
from tests.gateway.conftest import Agent, Env, slow_registry
from tests.gateway.harness import serve
from tests.gateway.helpers import door_status
from tests.gateway.test_ext_authz_grpc import FORWARDED_RULES, HEADER_RULE, ROUTES
from tests.gateway.test_pipeline import POLICY


def door(env: Env, **ext: Any) -> Iterator[str]:
    data = env.settings.model_dump()
    data.update(routes=ROUTES, ext_authz=ext)
    settings = GatewaySettings.model_validate(data)
    app = create_ext_authz_http_app(ExtAuthz(env.pipeline, settings), settings.ext_authz)
    with serve(app) as url:
        yield url


@pytest.fixture
def envoy(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="envoy", path_prefix="/check")


@pytest.fixture
def nginx(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="nginx", trusted_proxies=["127.0.0.1"])


@pytest.fixture
def untrusted_nginx(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="nginx", trusted_proxies=["192.0.2.1"])


def creds(agent: Agent, path: str = "/payments/charge", method: str = "POST") -> dict[str, str]:
    token = agent.token()
    return {"authorization": f"DPoP {token}", "dpop": agent.proof(token, method, path)}


def test_envoy_mode_allows_with_identity_headers(env: Env, envoy: str) -> None:
    agent = Agent(env)
    forged = {"x-aegis-agent-id": "admin", "x-aegis-role": "root", "x_aegis_tenant": "evil"}
    resp = httpx.post(f"{envoy}/check/payments/charge", headers={**creds(agent), **forged})
    assert resp.status_code == 200, resp.text
    # Envoy overwrites x-aegis-agent-id from this answer and removes the rest, an underscored
    # spelling included (the same variable to a CGI or WSGI upstream).
    assert (
        resp.headers["x-envoy-auth-headers-to-remove"]
        == "authorization,dpop,x-aegis-role,x_aegis_tenant"
    )
    assert resp.headers["x-aegis-agent-id"] == "payer"
    assert resp.headers["x-aegis-tenant"] == "acme"
    assert resp.headers["x-aegis-attestation"].count(".") == 2
    record = next(
        r for r in env.audit.records() if r["decision_id"] == resp.headers["x-aegis-decision-id"]
    )
    assert (record["action"], record["path"], record["method"]) == (
        "allow",
        "/payments/charge",
        "POST",
    )


def test_envoy_mode_refusals_carry_status_challenge_and_json(env: Env, envoy: str) -> None:
    agent = Agent(env)
    headers = creds(agent)
    assert httpx.post(f"{envoy}/check/payments/charge", headers=headers).status_code == 200
    replay = httpx.post(f"{envoy}/check/payments/charge", headers=headers)
    assert replay.status_code == 401
    assert replay.json()["code"] == "replay_detected"
    assert replay.json()["decision_id"] == replay.headers["x-aegis-decision-id"]
    assert replay.headers[REFUSAL_FIELD] == refusal_mark(headers["authorization"])
    assert replay.headers["www-authenticate"].startswith("DPoP error=")
    denied = httpx.post(f"{envoy}/check/crm/x", headers=creds(agent, "/crm/x"))
    assert (door_status(denied), denied.json()["code"]) == (403, "access_denied")
    assert "x-aegis-agent-id" not in denied.headers
    none = httpx.post(f"{envoy}/check/payments/charge")
    assert (door_status(none), none.json()["code"]) == (401, "unauthenticated")
    # The proof was made for the path without Envoy's prefix; outside the prefix nothing routes.
    outside = httpx.post(f"{envoy}/payments/charge", headers=creds(agent))
    assert (door_status(outside), outside.json()["code"]) == (404, "not_found")
    h = creds(agent)
    two = [*h.items(), ("dpop", h["dpop"])]
    twice = httpx.post(f"{envoy}/check/payments/charge", headers=two)
    assert (door_status(twice), twice.json()["code"]) == (400, "invalid_request")
    dots = httpx.post(f"{envoy}/check/payments/%2e%2e/admin", headers=creds(agent))
    assert (door_status(dots), dots.json()["code"]) == (400, "invalid_request")


def test_nginx_mode_reads_the_original_request_from_trusted_headers(env: Env, nginx: str) -> None:
    agent = Agent(env)
    headers = {
        **creds(agent),
        "x-original-uri": "/payments/charge?x=1",
        "x-original-method": "POST",
    }
    resp = httpx.get(f"{nginx}/auth", headers=headers)
    assert resp.status_code == 200, resp.text
    record = next(
        r for r in env.audit.records() if r["decision_id"] == resp.headers["x-aegis-decision-id"]
    )
    assert (record["method"], record["path"]) == ("POST", "/payments/charge")
    # The method is part of the proof (htm): the same call announced as a GET is refused.
    headers = {**creds(agent), "x-original-uri": "/payments/charge", "x-original-method": "GET"}
    assert httpx.get(f"{nginx}/auth", headers=headers).status_code == 401
    for target in ("//admin/payments/charge", "http://evil.example/payments/charge"):
        odd = {**creds(agent), "x-original-uri": target, "x-original-method": "POST"}
        assert door_status(httpx.get(f"{nginx}/auth", headers=odd)) in (400, 404)
    missing = httpx.get(f"{nginx}/auth", headers=creds(agent))
    assert (door_status(missing), missing.json()["code"]) == (400, "invalid_request")
    twice = httpx.get(
        f"{nginx}/auth",
        headers=[*creds(agent).items(), ("x-original-uri", "/payments/charge"),
                 ("x-original-uri", "/crm/x"), ("x-original-method", "POST")],
    )  # fmt: skip
    assert door_status(twice) == 400


def test_nginx_mode_refuses_peers_that_are_not_trusted_proxies(
    env: Env, untrusted_nginx: str
) -> None:
    agent = Agent(env)
    headers = {**creds(agent), "x-original-uri": "/payments/charge", "x-original-method": "POST"}
    resp = httpx.get(f"{untrusted_nginx}/auth", headers=headers)
    assert (door_status(resp), resp.json()["code"]) == (403, "access_denied")


def test_a_forwarded_address_does_not_make_a_peer_a_trusted_proxy(
    env: Env, untrusted_nginx: str
) -> None:
    """Only 192.0.2.1 is a trusted proxy; a caller on loopback claiming to be it in
    ``X-Forwarded-For`` (which uvicorn's default would have believed from 127.0.0.1) is not."""
    agent = Agent(env)
    headers = {**creds(agent), "x-original-uri": "/payments/charge", "x-original-method": "POST",
               "x-forwarded-for": "192.0.2.1", "x-forwarded-proto": "https"}  # fmt: skip
    resp = httpx.get(f"{untrusted_nginx}/auth", headers=headers)
    assert (door_status(resp), resp.json()["code"]) == (403, "access_denied")


def test_nginx_mode_never_shows_a_body_to_policy(env: Env, nginx: str) -> None:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)
    headers = {**creds(agent), "x-original-uri": "/payments/charge", "x-original-method": "POST"}
    # nginx withholds the body, so a policy that reads it cannot decide: refused, never allowed.
    resp = httpx.get(f"{nginx}/auth", headers=headers)
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")


def test_nginx_mode_needs_trusted_proxies() -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        ExtAuthzSettings(http_port=9000, http_mode="nginx")
    with pytest.raises(ValueError, match="ext_authz ports"):
        GatewaySettings.model_validate({"port": 9000, "ext_authz": {"grpc_port": 9000}})
    with pytest.raises(ValueError, match="not an IP"):
        ExtAuthzSettings(trusted_proxies=("nginx.local",))


CATCH_ALL_ROUTES: Any = [
    {"path_prefix": "/", "upstream": "http://127.0.0.1:9", "tool": "payments",
     "tenant": "acme", "env": "prod"},
    {"path_prefix": "/billing", "upstream": "http://127.0.0.1:9", "tool": "billing",
     "tenant": "acme", "env": "prod", "require_client_cert": True},
]  # fmt: skip


@pytest.fixture
def catch_all(env: Env) -> Iterator[str]:
    data = env.settings.model_dump()
    data.update(routes=CATCH_ALL_ROUTES, ext_authz={"http_mode": "envoy", "path_prefix": "/check"})
    settings = GatewaySettings.model_validate(data)
    app = create_ext_authz_http_app(ExtAuthz(env.pipeline, settings), settings.ext_authz)
    with serve(app) as url:
        yield url


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/billing/charge", 401, "cert_required"),
        # Served as /billing/charge by case-insensitive, ;parameter- or dot-dropping upstreams,
        # but sent to the catch-all's upstream by a proxy in front that compares exactly: the
        # two readings choose different routes, so neither is decided.
        ("/Billing/charge", 400, "invalid_request"),
        ("/billing;x/charge", 400, "invalid_request"),
        ("/billing./charge", 400, "invalid_request"),
        # nginx decodes before it compares, Envoy does not.
        ("/b%69lling/charge", 400, "invalid_request"),
        # Envoy's prefix: /billing (and nginx's location /billing) match these as strings.
        ("/billingX/charge", 400, "invalid_request"),
        ("/billing-archive", 400, "invalid_request"),
        # Rails serves /billing.json as /billing, which a proxy in front sends to the catch-all.
        ("/billing.json", 400, "invalid_request"),
    ],
)
def test_a_path_another_route_may_claim_is_not_decided_as_the_catch_all(
    env: Env, catch_all: str, path: str, status: int, code: str
) -> None:
    agent = Agent(env)
    resp = httpx.post(f"{catch_all}/check{path}", headers=creds(agent, path))
    assert (door_status(resp), resp.json()["code"]) == (status, code), resp.text
    record = next(
        r for r in env.audit.records() if r.get("decision_id") == resp.json()["decision_id"]
    )
    assert record["action"] == "deny"
    assert httpx.post(f"{catch_all}/check/other", headers=creds(agent, "/other")).status_code == 200


def test_refusals_before_any_route_are_audited(env: Env, envoy: str, untrusted_nginx: str) -> None:
    answers = [
        (httpx.post(f"{envoy}/check/nowhere", headers=creds(Agent(env))), 404, "not_found"),
        (httpx.request("TRACE", f"{envoy}/check/payments/x"), 405, "method_not_allowed"),
        # Methods outside any list (WebDAV, extensions) reach the door too, not the router's
        # plain-text 405: Envoy checks with the call's own method.
        (httpx.request("PROPFIND", f"{envoy}/check/payments/x"), 405, "method_not_allowed"),
        (httpx.request("PURGE", f"{envoy}/check/payments/x"), 405, "method_not_allowed"),
        (httpx.get(f"{untrusted_nginx}/auth"), 403, "access_denied"),
    ]
    records = {r["decision_id"]: r for r in env.audit.records(kind="gateway.refused")}
    for resp, status, code in answers:
        assert (door_status(resp), resp.json()["code"]) == (status, code), resp.text
        record = records[resp.json()["decision_id"]]
        assert (record["door"], record["status"], record["code"]) == ("ext_authz", status, code)


@pytest.fixture
def trusted_envoy(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="envoy", path_prefix="/check", trusted_proxies=["127.0.0.1"])


def _forwarded_rules(env: Env) -> None:
    version = env.policies.put(load_document(FORWARDED_RULES), now=0)
    env.policies.activate("acme", "prod", version, actor="t", now=0)


@pytest.mark.parametrize(
    ("fields", "denied_by"),
    [
        # The client is the rightmost X-Forwarded-For entry, the one Envoy appended.
        ({"x-forwarded-for": "198.51.100.7, 10.0.0.5", "x-forwarded-proto": "https"}, None),
        # Over plaintext Envoy sets X-Forwarded-Proto: http; policy sees it, as at the proxy.
        ({"x-forwarded-for": "10.0.0.5", "x-forwarded-proto": "http"},
         "plaintext calls are refused"),
        ({"x-forwarded-for": "10.0.0.5, 198.51.100.7", "x-forwarded-proto": "https",
          "x-real-ip": "10.0.0.5", "forwarded": "for=10.0.0.5"}, DEFAULT_DENY_REASON),
        ({"x-forwarded-for": "10.0.0.5", "x-forwarded-proto": "https",
          "host": "admin.example.com"}, "the admin host is not for agents"),
    ],
)  # fmt: skip
def test_envoy_mode_policy_sees_the_doors_forwarded_fields_never_the_callers(
    env: Env, trusted_envoy: str, fields: dict[str, str], denied_by: str | None
) -> None:
    _forwarded_rules(env)
    resp = httpx.post(
        f"{trusted_envoy}/check/payments/charge", headers={**creds(Agent(env)), **fields}
    )
    _assert_decided(resp, denied_by)


def _assert_decided(resp: httpx.Response, denied_by: str | None) -> None:
    if denied_by is None:
        assert resp.status_code == 200, resp.text
        return
    assert (door_status(resp), resp.json()["message"]) == (403, denied_by), resp.text


def test_envoy_mode_removes_the_forwarding_claims_envoy_does_not_set(
    env: Env, trusted_envoy: str
) -> None:
    claims = {"x-forwarded-for": "10.0.0.5", "x-forwarded-proto": "https",
              "x-forwarded-host": "admin.example.com", "forwarded": "for=10.0.0.5",
              "x-real-ip": "10.0.0.5"}  # fmt: skip
    resp = httpx.post(
        f"{trusted_envoy}/check/payments/charge", headers={**creds(Agent(env)), **claims}
    )
    assert resp.status_code == 200, resp.text
    assert (
        resp.headers["x-envoy-auth-headers-to-remove"]
        == "authorization,dpop,forwarded,x-forwarded-host,x-real-ip"
    )


@pytest.mark.parametrize(
    ("fields", "denied_by"),
    [
        ({"x-forwarded-for": "10.0.0.5"}, None),  # nginx's $remote_addr
        ({"x-forwarded-for": "10.0.0.5", "x-forwarded-proto": "http"},
         "plaintext calls are refused"),
        # nginx passes the caller's own claims on to the subrequest: policy never reads them.
        ({"x-forwarded-for": "198.51.100.7", "x-real-ip": "10.0.0.5",
          "forwarded": "for=10.0.0.5"}, DEFAULT_DENY_REASON),
    ],
)  # fmt: skip
def test_nginx_mode_policy_sees_the_doors_forwarded_fields_never_the_callers(
    env: Env, nginx: str, fields: dict[str, str], denied_by: str | None
) -> None:
    _forwarded_rules(env)
    headers = {**creds(Agent(env)), "x-original-uri": "/payments/charge",
               "x-original-method": "POST", "x-forwarded-host": "gw.example.com",
               "x-forwarded-proto": "https", **fields}  # fmt: skip
    _assert_decided(httpx.get(f"{nginx}/auth", headers=headers), denied_by)


#: A WebSocket handshake's fields (RFC 6455 §4.1).
@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xa0"])
def test_a_field_value_outside_ascii_is_refused_and_audited(
    env: Env, envoy: str, nginx: str, value: bytes
) -> None:
    """Read as Latin-1 here; an upstream reading UTF-8 (or a proxy re-encoding it) reads other
    characters than policy judged. (Control characters the door's own server refuses.)"""
    agent = Agent(env)
    envoy_check = (f"{envoy}/check/payments/charge", creds(agent))
    nginx_check = (f"{nginx}/auth", {**creds(agent), "x-original-uri": "/payments/charge",
                                     "x-original-method": "POST"})  # fmt: skip
    for url, headers in (envoy_check, nginx_check):
        resp = httpx.post(url, headers={**headers, "x-note": value})
        assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request"), resp.text
        assert "outside ASCII" in resp.json()["message"]
        [record] = [r for r in env.audit.records()
                    if r["decision_id"] == resp.json()["decision_id"]]  # fmt: skip
        assert (record["action"], record["code"]) == ("deny", "invalid_request")


HANDSHAKE = {"connection": "Upgrade", "upgrade": "websocket", "sec-websocket-version": "13",
             "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}  # fmt: skip


@pytest.mark.parametrize(
    "fields",
    [
        {"upgrade": "websocket"},  # passed on without Connection: the server reads plain HTTP
        HANDSHAKE,  # taken by the server for a handshake: answered as one
    ],
)
def test_a_protocol_upgrade_is_refused_and_audited(
    env: Env, envoy: str, nginx: str, fields: dict[str, str]
) -> None:
    agent = Agent(env)
    envoy_check = (f"{envoy}/check/payments/charge", creds(agent, method="GET"))
    nginx_check = (f"{nginx}/auth", {**creds(agent, method="GET"),
                                     "x-original-uri": "/payments/charge",
                                     "x-original-method": "GET"})  # fmt: skip
    for url, headers in (envoy_check, nginx_check):
        resp = httpx.get(url, headers={**headers, **fields})
        assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request"), resp.text
        assert "Upgrade" in resp.json()["message"]
        [record] = [r for r in env.audit.records(kind="gateway.refused")
                    if r["decision_id"] == resp.json()["decision_id"]]  # fmt: skip
        assert (record["door"], record["code"]) == ("ext_authz", "invalid_request")


@pytest.mark.parametrize(("value", "status"), [("666,1", 400), ("1", 200), ("666", 403)])
def test_envoy_mode_reads_a_field_holding_a_comma_as_joined_repeats(
    env: Env, envoy: str, value: str, status: int
) -> None:
    """Envoy's HTTP check request joins ``X-Account: 666`` and ``X-Account: 1`` into one line,
    ``666,1``, while the upstream reads the first: a field policy reads must not hold a comma
    there, as at the gRPC door."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(HEADER_RULE), now=0), actor="t", now=0
    )
    agent = Agent(env)
    resp = httpx.post(
        f"{envoy}/check/payments/charge", headers={**creds(agent), "x-account": value}
    )
    assert resp.status_code == status, resp.text


def test_an_answer_the_proxy_stopped_waiting_for_is_recorded_undelivered(
    env: Env, envoy: str
) -> None:
    """As at the gRPC door: when Envoy's HTTP ext_authz (200 ms by default) or nginx gives up
    and applies its failure mode, a second record says the answer was never delivered. The
    audit log held only an allow for a call that never reached the upstream."""
    agent = Agent(env)
    before = env.audit.count()
    with slow_registry(env):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{envoy}/check/payments/charge", headers=creds(agent), timeout=0.2)
        for _ in range(40):
            time.sleep(0.05)
            if env.audit.count() >= before + 2:
                break
    records = list(env.audit.records())[before:]
    decision = next(r for r in records if r["kind"] == "gateway.decision")
    assert decision["action"] == "allow"
    [undelivered] = [r for r in records if r["kind"] == "gateway.forward_failed"]
    assert (undelivered["code"], undelivered["decision_id"]) == (
        "answer_not_delivered",
        decision["decision_id"],
    )
