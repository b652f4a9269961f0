"""Envoy ext_authz v3 over a real gRPC socket: a client built from Envoy's own protos asks
``Authorization/Check`` and gets OK with the upstream headers, or Denied with the HTTP status, the
``WWW-Authenticate`` challenge and the JSON body; every answer comes from the one pipeline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from aegis.audit.attest import attestation_rules
from aegis.config import GatewaySettings
from aegis.errors import REFUSAL_FIELD, refusal_mark
from aegis.gateway import ext_authz_grpc
from aegis.gateway.ext_authz import ExtAuthz, TrustedPeers
from aegis.gateway.ext_authz_grpc import (
    AuthorizationService,
    check_to_request,
    peer_host,
    start_grpc_server,
)
from aegis.policy.decision import DEFAULT_DENY_REASON
from aegis.policy.loader import load_document
from aegis.tokens.verifier import verify_jwt
from tests.gateway.conftest import Agent, Env, dpop_headers, slow_registry
from tests.gateway.test_pipeline import POLICY

ROUTES: Any = [
    {"path_prefix": "/payments", "upstream": "http://127.0.0.1:9", "tool": "payments",
     "tenant": "acme", "env": "prod"},
    {"path_prefix": "/crm", "upstream": "http://127.0.0.1:9", "tool": "crm",
     "tenant": "acme", "env": "prod"},
]  # fmt: skip


def settings_with_routes(env: Env) -> GatewaySettings:
    data = env.settings.model_dump()
    data["routes"] = ROUTES
    return GatewaySettings.model_validate(data)


@asynccontextmanager
async def grpc_stub(
    ext: ExtAuthz, *, buffered: bool = False
) -> AsyncIterator[pb_grpc.AuthorizationStub]:
    """A client of ``ext``'s gRPC door on a loopback port (loopback is a trusted proxy);
    ``buffered``: Envoy sends every body (``envoy_buffers_body``)."""
    server, port = await start_grpc_server(
        AuthorizationService(ext, TrustedPeers(["127.0.0.1"]), buffered=buffered), "127.0.0.1", 0
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.AuthorizationStub(channel)
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def stub(env: Env) -> AsyncIterator[pb_grpc.AuthorizationStub]:
    async with grpc_stub(ExtAuthz(env.pipeline, settings_with_routes(env))) as client:
        yield client


def check(
    headers: list[tuple[str, str]] | dict[str, str],
    *,
    path: str = "/payments/charge",
    method: str = "POST",
    body: bytes = b"",
    raw_map: bool = False,
) -> pb.CheckRequest:
    http = ac.AttributeContext.HttpRequest(
        method=method, path=path, host="gw.example.com", scheme="https", protocol="HTTP/1.1",
        raw_body=body,
    )  # fmt: skip
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    if body:
        pairs = [*pairs, ("content-length", str(len(body)))]
    if raw_map:
        http.header_map.headers.extend(
            base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs
        )
    else:
        for k, v in pairs:
            http.headers[k] = f"{http.headers[k]},{v}" if k in http.headers else v
    return pb.CheckRequest(
        attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http))
    )


def denied(resp: pb.CheckResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert resp.WhichOneof("http_response") == "denied_response"
    assert resp.status.code != code_pb2.OK
    d = resp.denied_response
    return d.status.code, {h.header.key: h.header.value for h in d.headers}, json.loads(d.body)


async def test_allowed_call_is_ok_with_identity_headers(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)
    token = agent.token()
    # An underscored spelling is the same variable to a CGI or WSGI upstream: removed as well.
    forged = [
        ("x-aegis-agent-id", "admin"),
        ("x-aegis-role", "root"),
        ("x_aegis_agent_id", "admin"),
    ]
    resp = await stub.Check(check([*dpop_headers(agent, token), *forged]))
    assert resp.status.code == code_pb2.OK, resp
    ok = resp.ok_response
    up = {h.header.key: h.header.value for h in ok.headers}
    assert up["x-aegis-agent-id"] == "payer" and up["x-aegis-tenant"] == "acme"
    assert all(h.append_action == h.OVERWRITE_IF_EXISTS_OR_ADD for h in ok.headers)
    assert set(ok.headers_to_remove) == {
        "authorization",
        "dpop",
        "x-aegis-role",
        "x_aegis_agent_id",
    }
    back = {h.header.key: h.header.value for h in ok.response_headers_to_add}
    assert back["x-aegis-decision-id"] == up["x-aegis-decision-id"]
    assert REFUSAL_FIELD not in back and REFUSAL_FIELD not in up  # an allow is never marked
    claims = verify_jwt(
        back["x-aegis-attestation"], env.services.keyring.public_key,
        attestation_rules(env.services.config.issuer), env.services.clock.now(),
    ).payload  # fmt: skip
    assert (claims["agent_id"], claims["tool"], claims["decision"]) == (
        "payer",
        "payments",
        "allow",
    )
    record = next(r for r in env.audit.records() if r["decision_id"] == up["x-aegis-decision-id"])
    assert record["action"] == "allow" and record["path"] == "/payments/charge"


async def test_policy_denial_is_403_with_json_body(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)
    token = agent.token()
    resp = await stub.Check(check(dpop_headers(agent, token, path="/crm/x"), path="/crm/x"))
    status, headers, body = denied(resp)
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    assert (status, body["code"]) == (403, "access_denied")
    assert body["decision_id"] == headers["x-aegis-decision-id"] and body["message"]
    assert headers["content-type"] == "application/json"
    # Marked as the gateway's for the credentials it was sent with (the upstream never sees
    # them): a tool cannot answer in the gateway's name.
    assert headers[REFUSAL_FIELD] == refusal_mark(f"DPoP {token}")


async def test_bad_token_is_401_with_challenge(env: Env, stub: pb_grpc.AuthorizationStub) -> None:
    agent = Agent(env)
    token = agent.token()
    head, payload, sig = token.split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    resp = await stub.Check(check(dpop_headers(agent, forged)))
    status, headers, body = denied(resp)
    assert resp.status.code == code_pb2.UNAUTHENTICATED
    assert status == 401 and body["code"] in ("invalid_signature", "malformed_token")
    assert headers["www-authenticate"].startswith("DPoP error=")
    assert token not in json.dumps(body) and forged not in json.dumps(body)


async def test_replayed_proof_is_replay_detected(env: Env, stub: pb_grpc.AuthorizationStub) -> None:
    agent = Agent(env)
    token = agent.token()
    headers = dpop_headers(agent, token)
    assert (await stub.Check(check(headers))).status.code == code_pb2.OK
    status, _, body = denied(await stub.Check(check(headers)))
    assert (status, body["code"]) == (401, "replay_detected")


@pytest.mark.parametrize("raw_map", [False, True])
async def test_two_dpop_headers_are_refused_joined_or_not(
    env: Env, stub: pb_grpc.AuthorizationStub, raw_map: bool
) -> None:
    agent = Agent(env)
    token = agent.token()
    headers = [*dpop_headers(agent, token), ("dpop", agent.proof(token))]
    status, _, body = denied(await stub.Check(check(headers, raw_map=raw_map)))
    assert (status, body["code"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [("/other", 404, "not_found"), ("/payments/../admin", 400, "invalid_request"),
     ("/payments/%2e%2e/admin", 400, "invalid_request"),
     # Read as host "admin" + path "/payments/x" by a URL parser; served as a path upstream.
     ("//admin/payments/x", 400, "invalid_request"),
     ("/payments/x?action=read;action=delete", 400, "invalid_request"),
     ("/%EF%BC%8E%EF%BC%8E/payments/x", 400, "invalid_request"),
     ("http://gw.example.com/payments/x", 400, "invalid_request")],
)  # fmt: skip
async def test_unroutable_paths_are_denied(
    env: Env, stub: pb_grpc.AuthorizationStub, path: str, status: int, code: str
) -> None:
    agent = Agent(env)
    token = agent.token()
    got, _, body = denied(await stub.Check(check(dpop_headers(agent, token, path=path), path=path)))
    assert (got, body["code"]) == (status, code)


async def test_body_rules_see_the_body_and_sanitize_is_refused(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)

    async def call(amount: int, **kw: Any) -> pb.CheckResponse:
        body = json.dumps({"amount": amount, "memo": "m"}).encode()
        headers = [*dpop_headers(agent, agent.token()), ("content-type", "application/json")]
        return await stub.Check(check(headers, body=body, **kw))  # type: ignore[no-any-return]

    assert (await call(5)).status.code == code_pb2.OK
    status, _, body = denied(await call(-1))
    assert (status, body["code"]) == (403, "access_denied")
    # Sanitizing needs a rewrite that an ext_authz answer cannot carry: refused, not passed on.
    status, _, body = denied(await call(500))
    assert (status, body["code"]) == (403, "policy_error")


HEADER_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: header-rule}
spec:
  rules:
    - {id: pay, action: allow, reason: ok, match: {tools: ["payments"]}}
    - {id: blocked, action: deny, reason: blocked account, match: {tools: ["payments"]},
       when: {path: request.headers.x-account, eq: "666"}}
"""


@pytest.mark.parametrize(
    ("fields", "raw_map", "status"),
    [
        ([("x-account", "1")], False, 200),
        ([("x-account", "666")], False, 403),
        # Envoy's map joins repeats with ',': "666,1" is not "666" to policy, while the upstream
        # reads the first line. A comma in a field policy reads is refused there.
        ([("x-account", "666"), ("x-account", "1")], False, 400),
        ([("x-account", "666,1")], False, 400),
        ([("x-account", "666"), ("x-account", "1")], True, 400),  # header_map keeps each line
        ([("x-account", "1,2")], True, 200),  # one line holding a comma is one value there
        ([("x_account", "666")], True, 400),
    ],
)
async def test_a_header_policy_reads_sent_twice_or_respelled_is_refused(
    env: Env,
    stub: pb_grpc.AuthorizationStub,
    fields: list[tuple[str, str]],
    raw_map: bool,
    status: int,
) -> None:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(HEADER_RULE), now=0), actor="t", now=0
    )
    agent = Agent(env)
    request = check([*dpop_headers(agent, agent.token()), *fields], raw_map=raw_map)
    resp = await stub.Check(request)
    if status == 200:
        assert resp.status.code == code_pb2.OK, resp
        return
    got, _, body = denied(resp)
    assert got == status, body


def test_partial_or_missing_bodies_are_unseen() -> None:
    def body_of(headers: dict[str, str], body: bytes, protocol: str = "HTTP/1.1") -> bytes | None:
        req = check(headers)
        req.attributes.request.http.raw_body = body
        req.attributes.request.http.protocol = protocol
        return check_to_request(req, trusted=False).body

    assert body_of({"content-length": "0"}, b"") == b""
    assert body_of({"content-length": "3"}, b"abc") == b"abc"
    assert body_of({"content-length": "9"}, b"abc") is None  # Envoy did not buffer it all
    assert body_of({"content-length": "3", "x-envoy-auth-partial-body": "true"}, b"abc") is None
    assert body_of({"transfer-encoding": "chunked"}, b"") is None
    assert body_of({}, b"", protocol="HTTP/2") is None
    # Envoy removes Transfer-Encoding before the check: a chunked HTTP/1.1 body it did not
    # buffer arrives with no length and no body, as a request without one would.
    assert body_of({}, b"") is None
    assert body_of({}, b"abc") == b"abc"  # buffered whole by with_request_body


def test_a_request_without_body_or_length_has_none_where_envoy_buffers_every_body() -> None:
    req = check({})
    assert check_to_request(req, trusted=False, buffered=True).body == b""
    assert check_to_request(req, trusted=False).body is None


async def test_a_chunked_body_envoy_did_not_send_is_never_decided_as_empty(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """A POST of ``{"amount": 5000}`` sent chunked reaches the check with neither length nor
    body: a policy denying large amounts must not decide it as a call without a body."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)
    headers = [*dpop_headers(agent, agent.token()), ("content-type", "application/json")]
    status, _, body = denied(await stub.Check(check(headers)))
    assert (status, body["code"]) == (400, "invalid_request")
    assert "reads the request body" in body["message"]


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:%5B::1%5D:48584", "::1"),
     ("ipv6:[::1]:5", "::1"), ("unix:/tmp/s", "")],
)  # fmt: skip
def test_the_peer_address_is_read_from_grpcs_peer_string(peer: str, host: str) -> None:
    """gRPC percent-encodes the brackets of an IPv6 peer: a trusted Envoy on ::1 is ::1."""
    assert peer_host(peer) == host
    if host:
        assert host in TrustedPeers([host])


def test_forwarded_facts_are_read_only_from_trusted_peers() -> None:
    req = check({})
    req.attributes.source.certificate = "-----BEGIN%20CERTIFICATE-----..."
    req.attributes.source.address.socket_address.address = "203.0.113.7"
    assert check_to_request(req, trusted=False).certificate is None
    assert check_to_request(req, trusted=False).client is None
    trusted = check_to_request(req, trusted=True)
    assert trusted.certificate and trusted.client == "203.0.113.7"
    assert peer_host("ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert peer_host("ipv6:[::1]:5000") == "::1"
    assert peer_host("unix:/tmp/s") == ""
    peers = TrustedPeers(["127.0.0.1"])
    assert "127.0.0.1" in peers and "::ffff:127.0.0.1" in peers
    assert "127.0.0.2" not in peers and "" not in peers and "localhost" not in peers


async def test_a_forged_certificate_from_a_trusted_proxy_is_refused(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)
    req = check(dpop_headers(agent, agent.token()))
    req.attributes.source.certificate = "not%20a%20certificate"
    status, _, body = denied(await stub.Check(req))
    assert (status, body["code"]) == (401, "cert_invalid")


def test_shared_header_options_are_copied_into_each_answer() -> None:
    from aegis.gateway.ext_authz_grpc import _upstream_option

    first = pb.OkHttpResponse(headers=[_upstream_option("x-aegis-tenant", "acme")])
    first.headers[0].header.value = "changed"  # one answer edited after it was built
    second = pb.OkHttpResponse(headers=[_upstream_option("x-aegis-tenant", "acme")])
    assert second.headers[0].header.value == "acme"
    assert _upstream_option("x-aegis-tenant", "acme").header.value == "acme"
    assert _upstream_option("x-aegis-decision-id", "d1") is not _upstream_option(
        "x-aegis-decision-id", "d1"
    )  # a value that never repeats is not kept


async def test_a_body_larger_than_grpcs_default_limit_is_answered_413(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    # Over grpc's 4 MiB default a Check would fail as RESOURCE_EXHAUSTED, which Envoy's
    # failure_mode_allow lets through; the door answers it as the proxy would, 413.
    agent = Agent(env)
    token = agent.token()
    body = b"a" * (5 * 1024 * 1024)
    status, _, answer = denied(await stub.Check(check(dpop_headers(agent, token), body=body)))
    assert (status, answer["code"]) == (413, "payload_too_large")


@pytest.mark.parametrize("length", [b"\xb2", b"1\xb2", b"\xb9"])
async def test_a_content_length_of_non_ascii_digits_is_no_error(
    env: Env, stub: pb_grpc.AuthorizationStub, length: bytes
) -> None:
    # Raw header bytes read as latin-1: "\xb2" is "²", and "²".isdigit() holds but int("²")
    # raises. The Check must still be answered.
    agent = Agent(env)
    request = check(dpop_headers(agent, agent.token()), raw_map=True)
    request.attributes.request.http.header_map.headers.append(
        base_pb2.HeaderValue(key="content-length", raw_value=length)
    )
    resp = await stub.Check(request)
    assert resp.WhichOneof("http_response") in ("ok_response", "denied_response")


async def test_a_failure_outside_the_pipeline_is_a_denied_answer(
    env: Env, stub: pb_grpc.AuthorizationStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gRPC error is Envoy's "error", which failure_mode_allow turns into an allow: a failure
    while reading the request or building the answer is a Denied 500 instead."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    agent = Agent(env)
    for name in ("check_to_request", "to_response"):
        with monkeypatch.context() as patch:
            patch.setattr(ext_authz_grpc, name, broken)
            resp = await stub.Check(check(dpop_headers(agent, agent.token())))
        status, _, answer = denied(resp)
        assert (status, answer["code"]) == (500, "server_error")


#: Rules on the fields a reverse proxy sets: the host, the scheme and the client address.
FORWARDED_RULES = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: forwarded}
spec:
  rules:
    - {id: admin-host, action: deny, reason: the admin host is not for agents,
       match: {tools: ["payments"]}, when: {path: request.headers.host, regex: "^admin\\\\."}}
    - {id: plaintext, action: deny, reason: plaintext calls are refused,
       match: {tools: ["payments"]}, when: {path: request.headers.x-forwarded-proto, eq: http}}
    - {id: internal, action: allow, reason: an internal client, match: {tools: ["payments"]},
       when: {path: request.headers.x-forwarded-for, eq: "10.0.0.5"}}
    - {id: internal-claimed, action: allow, reason: a claimed internal client,
       match: {tools: ["payments"]}, when: {path: request.headers.x-real-ip, eq: "10.0.0.5"}}
"""


#: A caller's own forwarding claims, every one naming the internal address.
async def _decided(
    stub: pb_grpc.AuthorizationStub, request: pb.CheckRequest, denied_by: str | None
) -> None:
    """Check ``request``: OK when ``denied_by`` is None, else denied by that rule's reason."""
    resp = await stub.Check(request)
    if denied_by is None:
        assert resp.status.code == code_pb2.OK, resp
        return
    status, _, body = denied(resp)
    assert (status, body["code"], body["message"]) == (403, "access_denied", denied_by)


CLAIMS = [("x-forwarded-for", "10.0.0.5"), ("x-real-ip", "10.0.0.5"), ("forwarded", "for=10.0.0.5")]


@pytest.mark.parametrize(
    ("host", "scheme", "client", "claims", "denied_by"),
    [
        ("gw.example.com", "https", "10.0.0.5", [], None),
        # gRPC carries the host only as :authority; policy reads it as the proxy shows it.
        ("admin.example.com", "https", "10.0.0.5", [], "the admin host is not for agents"),
        ("gw.example.com", "http", "10.0.0.5", [], "plaintext calls are refused"),
        # The client is the address Envoy reported, never one the caller claims.
        ("gw.example.com", "https", "198.51.100.7", CLAIMS, DEFAULT_DENY_REASON),
    ],
)  # fmt: skip
async def test_policy_sees_the_host_and_the_doors_own_forwarded_fields(
    env: Env,
    stub: pb_grpc.AuthorizationStub,
    host: str,
    scheme: str,
    client: str,
    claims: list[tuple[str, str]],
    denied_by: str | None,
) -> None:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(FORWARDED_RULES), now=0), actor="t", now=0
    )
    agent = Agent(env)
    request = check([*dpop_headers(agent, agent.token()), *claims], raw_map=True)
    request.attributes.request.http.host = host
    request.attributes.request.http.scheme = scheme
    request.attributes.source.address.socket_address.address = client
    await _decided(stub, request, denied_by)


@pytest.mark.parametrize(
    ("scheme", "envoys", "denied_by"),
    [
        # h2c on a plaintext listener: the client's :scheme is http.scheme, Envoy's own
        # x-forwarded-proto names the connection, as the upstream is told.
        ("https", [("x-forwarded-proto", "http")], "plaintext calls are refused"),
        ("http", [("x-forwarded-proto", "https")], None),
        ("https", [("x-forwarded-proto", "https")], None),
        # Not one value of http or https: the scheme decided on.
        ("http", [], "plaintext calls are refused"),
        ("http", [("x-forwarded-proto", "https, http")], "plaintext calls are refused"),
        ("http", [("x-forwarded-proto", "HTTPS")], "plaintext calls are refused"),
        ("http", [("x-forwarded-proto", "https"), ("x-forwarded-proto", "https")], "plaintext"
         " calls are refused"),
    ],
)  # fmt: skip
async def test_policy_sees_envoys_own_forwarded_proto_over_the_clients_scheme(
    env: Env,
    stub: pb_grpc.AuthorizationStub,
    scheme: str,
    envoys: list[tuple[str, str]],
    denied_by: str | None,
) -> None:
    """For HTTP/2 and HTTP/3 Envoy passes the client's :scheme as http.scheme; an h2c client
    can claim https on a plaintext connection, which a rule on x-forwarded-proto must not take."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(FORWARDED_RULES), now=0), actor="t", now=0
    )
    agent = Agent(env)
    request = check([*dpop_headers(agent, agent.token()), *envoys], raw_map=True)
    request.attributes.request.http.scheme = scheme
    request.attributes.request.http.protocol = "HTTP/2"
    request.attributes.source.address.socket_address.address = "10.0.0.5"
    await _decided(stub, request, denied_by)


def test_envoys_forwarded_proto_is_read_only_from_trusted_peers() -> None:
    req = check({"x-forwarded-proto": "http"})
    req.attributes.request.http.scheme = "https"
    assert check_to_request(req, trusted=True).forwarded_proto == "http"
    assert check_to_request(req, trusted=False).forwarded_proto is None  # the scheme: https


async def test_forwarding_claims_envoy_does_not_set_are_removed_before_the_upstream(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """Policy never saw them; the upstream must not read them as the gateway's word. What Envoy
    sets itself (X-Forwarded-For with the client appended, -Proto, -Port, -Client-Cert) stays."""
    agent = Agent(env)
    envoys = [("x-forwarded-for", "10.0.0.5, 198.51.100.7"), ("x-forwarded-proto", "https"),
              ("x-forwarded-port", "443"), ("x-forwarded-client-cert", "Hash=00")]  # fmt: skip
    # Go chi's RealIP believes True-Client-IP, Rails' remote_ip Client-IP.
    claims = [("x-real-ip", "10.0.0.5"), ("forwarded", "for=10.0.0.5"),
              ("x-forwarded-host", "admin.example.com"), ("x_forwarded_for", "10.0.0.5"),
              ("true-client-ip", "10.0.0.1"), ("client-ip", "10.0.0.1"),
              ("cf-connecting-ip", "10.0.0.1"), ("x-original-host", "admin.example.com"),
              ("client-cert", ":MIIB:"), ("x-ssl-client-verify", "SUCCESS")]  # fmt: skip
    resp = await stub.Check(check([*dpop_headers(agent, agent.token()), *envoys, *claims]))
    assert resp.status.code == code_pb2.OK, resp
    assert set(resp.ok_response.headers_to_remove) == {
        "authorization",
        "dpop",
        "x-real-ip",
        "forwarded",
        "x-forwarded-host",
        "x_forwarded_for",
        "true-client-ip",
        "client-ip",
        "cf-connecting-ip",
        "x-original-host",
        "client-cert",
        "x-ssl-client-verify",
    }


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ([("content-length", "0"), ("transfer-encoding", "chunked")], "not both"),
        ([("x-note", "a\x01b")], "control character"),
        ([("x-note", "caf\xe9")], "outside ASCII"),  # the raw byte 0xE9, read as Latin-1
    ],
)
async def test_ambiguous_framing_and_unsafe_field_values_are_refused_and_audited(
    env: Env, stub: pb_grpc.AuthorizationStub, fields: list[tuple[str, str]], why: str
) -> None:
    agent = Agent(env)
    request = check(dpop_headers(agent, agent.token()), raw_map=True)
    request.attributes.request.http.header_map.headers.extend(
        base_pb2.HeaderValue(key=k, raw_value=v.encode("latin-1")) for k, v in fields
    )
    status, _, body = denied(await stub.Check(request))
    assert (status, body["code"]) == (400, "invalid_request") and why in body["message"]
    [record] = [r for r in env.audit.records() if r["decision_id"] == body["decision_id"]]
    assert (record["action"], record["code"]) == ("deny", "invalid_request")


async def test_a_protocol_upgrade_is_refused_and_audited(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """Allowed, Envoy would switch to a WebSocket and pass every later frame on undecided."""
    agent = Agent(env)
    upgrade = [("connection", "Upgrade"), ("upgrade", "websocket"),
               ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]  # fmt: skip
    request = check([*dpop_headers(agent, agent.token(), method="GET"), *upgrade], method="GET")
    status, _, body = denied(await stub.Check(request))
    assert (status, body["code"]) == (400, "invalid_request")
    assert "Upgrade" in body["message"]
    [record] = [r for r in env.audit.records(kind="gateway.refused")
                if r["decision_id"] == body["decision_id"]]  # fmt: skip
    assert (record["door"], record["status"], record["code"]) == (
        "ext_authz",
        400,
        "invalid_request",
    )


@pytest.mark.parametrize("raw_map", [False, True])
async def test_a_host_field_beside_another_authority_is_refused_and_audited(
    env: Env, stub: pb_grpc.AuthorizationStub, raw_map: bool
) -> None:
    """An HTTP/2 client may send a ``host`` field beside ``:authority``, and Envoy passes it on:
    the call was decided on ``:authority`` (gw.example.com) while an upstream may read the
    other. The same host sent twice, in any case, is no conflict."""
    agent = Agent(env)
    other = check([*dpop_headers(agent, agent.token()), ("host", "admin.internal")],
                  raw_map=raw_map)  # fmt: skip
    status, _, body = denied(await stub.Check(other))
    assert (status, body["code"]) == (400, "invalid_request") and ":authority" in body["message"]
    [record] = [r for r in env.audit.records(kind="gateway.refused")
                if r["decision_id"] == body["decision_id"]]  # fmt: skip
    assert (record["door"], record["status"]) == ("ext_authz", 400)
    same = check([*dpop_headers(agent, agent.token()), ("host", "GW.example.com")],
                 raw_map=raw_map)  # fmt: skip
    assert (await stub.Check(same)).status.code == code_pb2.OK


async def test_a_check_envoy_stops_waiting_for_is_decided_recorded_and_marked_undelivered(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """Envoy's timeout cancels the Check: the decision is still made, recorded and counted, and a
    second record says its answer never reached Envoy (which applied its own failure mode), so an
    allow on record is never the last word about a call Envoy refused."""
    agent = Agent(env)
    before = env.audit.count()
    with slow_registry(env):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(check(dpop_headers(agent, agent.token())), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(50):
            await asyncio.sleep(0.05)
            if env.audit.count() >= before + 2:
                break
    records = list(env.audit.records())[before:]
    decision = next(r for r in records if r["kind"] == "gateway.decision")
    failed = next(r for r in records if r["kind"] == "gateway.forward_failed")
    assert decision["action"] == "allow"
    assert (failed["decision_id"], failed["code"], failed["action"]) == (
        decision["decision_id"], "answer_not_delivered", "allow")  # fmt: skip
