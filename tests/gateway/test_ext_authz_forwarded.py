"""Forwarded facts at the ext_authz doors that a caller must not choose: the host and scheme a
DPoP ``htu`` is compared with, the host that picks a route in Envoy mode, a client certificate
header nginx passes on unless told to overwrite it, and Envoy's UTF-8-sanitised string body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from google.rpc import code_pb2

from aegis.clock import SystemClock
from aegis.config import GatewaySettings, load_config
from aegis.errors import AegisError, InvalidRequest
from aegis.gateway.app import build_pipeline
from aegis.gateway.ext_authz import ExtAuthz, XfccMode, vet_authority
from aegis.gateway.ext_authz_grpc import check_to_request
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from aegis.gateway.routing import RouteTable, bare_host
from aegis.gateway.server import build_ext_authz
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.profile import x5t_s256
from aegis.pki.service import PkiService
from aegis.policy.loader import load_document
from aegis.registry.service import AgentSpec
from aegis.server.services import Services, build_services
from aegis.telemetry.metrics import REGISTRY
from aegis.types import ClientAuthMethod, TenantStatus
from tests.gateway import test_ext_authz_grpc
from tests.gateway.conftest import Agent, Env, dpop_headers
from tests.gateway.harness import serve
from tests.gateway.helpers import door_status, mint_proof
from tests.gateway.test_ext_authz_grpc import ROUTES, check, denied, settings_with_routes
from tests.gateway.test_pipeline import POLICY

#: Authorities a proxy might pass on unvalidated; each would let the htu comparison (or the route)
#: read something other than what was routed and forwarded.
BAD_HOSTS = [
    "gw.example.com/payments/charge#",  # '/' then '#': htu path taken from the host
    "gw.example.com:443#",  # '#': htu path collapses to '/'
    "gw.example.com:1?",  # '?': likewise
    "evil.example@gw.example.com",  # '@': userinfo
    "gw.example.com extra",  # a space
    "",  # no host at all
    "gw.example.com:",  # an empty port
    "gw.example.com:44x",  # a port that is not digits
    "gw.example.com:123456",  # more than five digits
    "gw.example.com:99999",  # five digits, above 65535
    "[::1",  # an unclosed IP-literal
    "[not-ip]:443",  # an IP-literal that is no address
    "%61dmin.example.com",  # admin.example.com to a URL parser, another host to host rules
    "gw.example.com%3a443",
]
GOOD_HOSTS = [
    "gw.example.com",
    "gw.example.com:8443",
    "127.0.0.1:443",
    "[::1]:443",
    "GW.example.com",
]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_vet_authority_refuses_what_is_not_an_rfc3986_authority(host: str) -> None:
    with pytest.raises(InvalidRequest, match=r"request (host|port)") as info:
        vet_authority(host, "https")
    assert info.value.code == "invalid_request"


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_vet_authority_accepts_host_and_port(host: str) -> None:
    vet_authority(host, "https")
    vet_authority(host, "HTTP")


def test_vet_authority_refuses_other_schemes() -> None:
    for scheme in ("ftp", "", "https://x/", "javascript"):
        with pytest.raises(InvalidRequest, match="scheme") as info:
            vet_authority("gw.example.com", scheme)
        assert info.value.code == "invalid_request"


def test_bare_host_removes_only_a_port_of_digits() -> None:
    assert bare_host("GW.example.com:8443") == "gw.example.com"
    assert bare_host("gw.example.com:") == "gw.example.com"
    assert bare_host("gw.example.com") == "gw.example.com"
    assert bare_host("gw.example.com:x#") == "gw.example.com:x#"
    wide = "gw.example.com:\uff14\uff14\uff13"  # fullwidth digits are not a port
    assert bare_host(wide) == wide


def test_a_trailing_dot_names_the_same_host() -> None:
    """nginx drops one trailing dot before it picks a server block (and serves that block's
    upstream): the route must be the same host's, not a host-less one on the same prefix."""
    assert bare_host("Admin.Example.com.") == "admin.example.com"
    assert bare_host("admin.example.com.:8443") == "admin.example.com"
    routes = RouteTable(
        GatewaySettings.model_validate({
            "routes": [
                {"path_prefix": "/api", "upstream": "http://127.0.0.1:9", "tool": "admin",
                 "tenant": "acme", "env": "prod", "host": "admin.example.com"},
                {"path_prefix": "/api", "upstream": "http://127.0.0.1:9", "tool": "payments",
                 "tenant": "acme", "env": "prod"},
            ]
        }).routes
    )  # fmt: skip
    for host in ("admin.example.com", "admin.example.com.", "ADMIN.example.com.:443"):
        route = routes.match(host, "/api/x")
        assert route is not None and route.tool == "admin", host
    other = routes.match("other.example.com.", "/api/x")
    assert other is not None and other.tool == "payments"


# -- gRPC door ------------------------------------------------------------------------------------

#: The gRPC door on a loopback port, as test_ext_authz_grpc serves it.
stub = test_ext_authz_grpc.stub


def grpc_check(
    headers: list[tuple[str, str]], *, host: str, path: str, scheme: str = "https"
) -> pb.CheckRequest:
    req = check(headers, path=path)
    req.attributes.request.http.host = host
    req.attributes.request.http.scheme = scheme
    return req


async def test_grpc_a_proof_for_one_path_cannot_ride_a_host_onto_another(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """The proof's htu names /payments/charge; the call is /payments/refund. A host ending in
    ``/payments/charge#`` made the pipeline read the proof's path back out of the URL."""
    agent = Agent(env)
    token = agent.token()
    headers = dpop_headers(agent, token, path="/payments/charge")
    req = grpc_check(headers, host="x/payments/charge#", path="/payments/refund")
    status, _, body = denied(await stub.Check(req))
    assert (status, body["code"]) == (400, "invalid_request")
    # The same proof on its own path and an ordinary host:port is allowed.
    ok = await stub.Check(grpc_check(headers, host="gw.example.com:443", path="/payments/charge"))
    assert ok.status.code == code_pb2.OK, ok


@pytest.mark.parametrize(
    ("host", "authority"), [(h, False) for h in BAD_HOSTS] + [(h, True) for h in GOOD_HOSTS]
)
async def test_grpc_takes_only_authorities_as_hosts(
    env: Env, stub: pb_grpc.AuthorizationStub, host: str, authority: bool
) -> None:
    agent = Agent(env)
    req = grpc_check(dpop_headers(agent, agent.token()), host=host, path="/payments/charge")
    resp = await stub.Check(req)
    if authority:
        assert resp.status.code == code_pb2.OK, resp
    else:
        status, _, body = denied(resp)
        assert (status, body["code"]) == (400, "invalid_request")


async def test_grpc_refuses_schemes_other_than_http(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    agent = Agent(env)
    req = grpc_check(
        dpop_headers(agent, agent.token()), host="gw.example.com", path="/payments/charge",
        scheme="ftp",
    )  # fmt: skip
    status, _, body = denied(await stub.Check(req))
    assert (status, body["code"]) == (400, "invalid_request")


def test_grpc_string_body_without_raw_body_is_unseen() -> None:
    """Envoy's string ``body`` (``pack_as_bytes: false``) has each invalid UTF-8 byte replaced
    with ``!`` at the same length, so it passes the content-length check yet is not the body."""
    forwarded = b'{"amount": 5, "to": "acct\xff\xfe"}'
    sanitised = forwarded.decode("utf-8", "replace").replace("\ufffd", "!")
    assert len(sanitised.encode()) == len(forwarded)
    req = check({"content-length": str(len(forwarded))})
    req.attributes.request.http.body = sanitised
    assert check_to_request(req, trusted=True).body is None
    req.attributes.request.http.raw_body = forwarded
    assert check_to_request(req, trusted=True).body == forwarded


async def test_grpc_body_policy_refuses_a_string_body(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)
    body = json.dumps({"amount": 5, "memo": "m"})

    def headers() -> list[tuple[str, str]]:
        return [
            *dpop_headers(agent, agent.token()),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]

    req = check(headers())
    req.attributes.request.http.body = body
    status, _, answer = denied(await stub.Check(req))
    assert (status, answer["code"]) == (400, "invalid_request")
    # The same body as bytes (pack_as_bytes: true) is decided on.
    req = check(headers())
    req.attributes.request.http.raw_body = body.encode()
    assert (await stub.Check(req)).status.code == code_pb2.OK


async def test_grpc_body_policy_refuses_a_content_coded_body(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """Under ``content-encoding`` the upstream decodes the bytes first and acts on the result, so
    policy is not shown the encoded bytes read as JSON."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)
    body = json.dumps({"amount": 5, "memo": "m"}).encode()

    def request(coding: str | None) -> pb.CheckRequest:
        fields = [
            *dpop_headers(agent, agent.token()),
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ]
        req = check(fields + ([("content-encoding", coding)] if coding else []))
        req.attributes.request.http.raw_body = body
        return req

    for coding in ("br", "GZIP", "identity,deflate"):
        status, _, answer = denied(await stub.Check(request(coding)))
        assert (status, answer["code"]) == (400, "invalid_request"), coding
        assert "content-encoding" in answer["message"]
    assert (await stub.Check(request("identity"))).status.code == code_pb2.OK
    assert (await stub.Check(request(None))).status.code == code_pb2.OK


def _joined(fields: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in fields:
        out[k] = f"{out[k]},{v}" if k in out else v
    return out


@pytest.mark.parametrize(
    "extra",
    [
        [("content-encoding", "identity"), ("content-encoding", "br")],  # upstream: "identity, br"
        [("content-type", "text/plain")],  # a second type
        [("content-encoding", "br"), ("connection", "content-encoding")],  # dropped on the way
        [("connection", "Content-Type")],
        [("content-type", "application/x-www-form-urlencoded")],  # joined by Envoy's map
    ],
)
async def test_grpc_fields_the_body_is_read_by_must_be_single_and_forwarded(
    env: Env, stub: pb_grpc.AuthorizationStub, extra: list[tuple[str, str]]
) -> None:
    """Envoy's ``header_map`` (``encode_raw_headers``) gives every occurrence: policy must not
    read the body by one Content-Type or Content-Encoding while the upstream reads both, or
    neither."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(POLICY), now=0), actor="t", now=0
    )
    agent = Agent(env)
    body = json.dumps({"amount": 5, "memo": "m"}).encode()
    fields = [*dpop_headers(agent, agent.token()), ("content-type", "application/json"), *extra]
    status, _, answer = denied(await stub.Check(check(fields, body=body, raw_map=True)))
    assert (status, answer["code"]) == (400, "invalid_request"), answer
    # Envoy's default headers map joins repeats with ',': refused all the same.
    status, _, answer = denied(await stub.Check(check(_joined(fields), body=body)))
    assert (status, answer["code"]) == (400, "invalid_request"), answer
    fields = [*dpop_headers(agent, agent.token()), ("content-type", "application/json")]
    assert (await stub.Check(check(fields, body=body, raw_map=True))).status.code == code_pb2.OK


# -- HTTP door ------------------------------------------------------------------------------------


def door(
    env: Env, routes: Any = ROUTES, ext: ExtAuthz | None = None, **settings: Any
) -> Iterator[str]:
    data = env.settings.model_dump()
    data.update(routes=routes, ext_authz=settings)
    gateway = GatewaySettings.model_validate(data)
    core = ext or ExtAuthz(env.pipeline, gateway)
    with serve(create_ext_authz_http_app(core, gateway.ext_authz)) as url:
        yield url


@pytest.fixture
def envoy(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="envoy", path_prefix="/check", trusted_proxies=["127.0.0.1"])


@pytest.fixture
def nginx(env: Env) -> Iterator[str]:
    yield from door(env, http_mode="nginx", trusted_proxies=["127.0.0.1"])


def creds(agent: Agent, path: str = "/payments/charge", host: str | None = None) -> dict[str, str]:
    """A token and a proof for ``path`` at the public URL, or (a host-specific route) at
    ``https://host``."""
    if host is None:
        return dict(dpop_headers(agent, agent.token(), path=path))
    token = agent.token()
    return {"authorization": f"DPoP {token}",
            "dpop": mint_proof(agent.key, "POST", f"https://{host}{path}", token=token)}  # fmt: skip


def nginx_call(url: str, agent: Agent, target: str, **extra: str) -> httpx.Response:
    path = target.partition("?")[0]
    headers = {**creds(agent, path), "x-original-uri": target, "x-original-method": "POST", **extra}
    return httpx.get(f"{url}/auth", headers=headers)


def test_nginx_a_proof_for_one_path_cannot_ride_a_host_onto_another(env: Env, nginx: str) -> None:
    agent = Agent(env)
    headers = {
        **creds(agent, "/payments/charge"),
        "x-original-uri": "/payments/refund",
        "x-original-method": "POST",
        "x-forwarded-host": "gw.example.com:443/payments/charge#",
    }
    resp = httpx.get(f"{nginx}/auth", headers=headers)
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")


@pytest.mark.parametrize("host", [h for h in BAD_HOSTS if h])  # an empty one is "not sent"
def test_nginx_refuses_forwarded_hosts_that_are_not_authorities(
    env: Env, nginx: str, host: str
) -> None:
    resp = nginx_call(nginx, Agent(env), "/payments/charge", **{"x-forwarded-host": host})
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_nginx_allows_ordinary_forwarded_hosts(env: Env, nginx: str, host: str) -> None:
    resp = nginx_call(nginx, Agent(env), "/payments/charge", **{"x-forwarded-host": host})
    assert resp.status_code == 200, resp.text


def test_nginx_refuses_a_forwarded_scheme_other_than_http(env: Env, nginx: str) -> None:
    resp = nginx_call(nginx, Agent(env), "/payments/charge", **{"x-forwarded-proto": "gopher"})
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")


# h11 refuses a Host with a space or an empty one before the door sees it; the rest reach it.
ENVOY_BAD_HOSTS = [h for h in BAD_HOSTS if h and " " not in h]


@pytest.mark.parametrize("host", ENVOY_BAD_HOSTS)
def test_envoy_refuses_hosts_that_are_not_authorities(env: Env, envoy: str, host: str) -> None:
    resp = httpx.post(f"{envoy}/check/payments/charge", headers={**creds(Agent(env)), "host": host})
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_envoy_allows_ordinary_hosts(env: Env, envoy: str, host: str) -> None:
    resp = httpx.post(f"{envoy}/check/payments/charge", headers={**creds(Agent(env)), "host": host})
    assert resp.status_code == 200, resp.text


#: Two routes on one path, told apart by host: only the public one's tool is allowed.
SPLIT_ROUTES: Any = [
    {"path_prefix": "/api", "host": "public.example.com", "upstream": "http://127.0.0.1:9",
     "tool": "payments", "tenant": "acme", "env": "prod"},
    {"path_prefix": "/api", "host": "admin.example.com", "upstream": "http://127.0.0.1:9",
     "tool": "admin", "tenant": "acme", "env": "prod"},
]  # fmt: skip


def test_envoy_routes_by_the_check_host_never_a_forwarded_host(env: Env) -> None:
    """Envoy routes and forwards by ``:authority`` (the check request's Host); a client's
    ``X-Forwarded-Host`` passed on through ``allowed_headers`` must not pick another route."""
    agent = Agent(env)
    for url in door(env, SPLIT_ROUTES, http_mode="envoy", path_prefix="/check",
                    trusted_proxies=["127.0.0.1"]):  # fmt: skip
        admin = {**creds(agent, "/api/users", "admin.example.com"), "host": "admin.example.com"}
        resp = httpx.post(f"{url}/check/api/users", headers=admin)
        assert (door_status(resp), resp.json()["code"]) == (403, "access_denied")
        forged = {**creds(agent, "/api/users", "admin.example.com"), "host": "admin.example.com",
                  "x-forwarded-host": "public.example.com"}  # fmt: skip
        resp = httpx.post(f"{url}/check/api/users", headers=forged)
        assert (door_status(resp), resp.json()["code"]) == (403, "access_denied")
        # The public route's proof is for its own host.
        public = {**creds(agent, "/api/users", "public.example.com"), "host": "public.example.com"}
        assert httpx.post(f"{url}/check/api/users", headers=public).status_code == 200


# -- forwarded client certificates ----------------------------------------------------------------

TD = "mtls.example"


class Pki:
    """A real internal CA, an agent ``alpha`` with a certificate, and a token bound to it."""

    def __init__(self, tmp: Path, pki_yaml: str = "") -> None:
        config = load_config(write_config(tmp, pki_yaml), environ={})
        CertificateAuthority.init(CaFiles.from_config(config), config.kek(), SystemClock(), TD)
        self.services: Services = build_services(config)
        pki = self.services.extras["pki"]
        assert isinstance(pki, PkiService)
        self.pki = pki
        self.services.registry.register_agent(
            AgentSpec("alpha", "acme", "prod", "o@example.com", allowed_scopes=("payments:write",)),
            actor="t",
        )
        client, _ = self.services.registry.create_client(
            "alpha", auth_method=ClientAuthMethod.TLS_CLIENT_AUTH,
            tls_san_uri=f"spiffe://{TD}/tenant/acme/env/prod/agent/alpha", actor="t",
        )  # fmt: skip
        # Whoever steals the token can read the certificate (it is public), never its key.
        cert = self.pki.issue("alpha", ec.generate_private_key(ec.SECP256R1()).public_key())
        self.pem = cert.certificate.public_bytes(serialization.Encoding.PEM).decode()
        self.token = self.services.issuer.issue(
            agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
            scopes=("payments:write",), audience=("aegis-gateway",), lifetime=300,
            cnf={"x5t#S256": x5t_s256(cert.certificate)},
        ).token  # fmt: skip

    def door(self, xfcc_mode: XfccMode) -> Iterator[str]:
        settings = GatewaySettings.model_validate({
            "public_url": "https://gw.example.com", "allow": [{"tool": "payments"}],
            "routes": [{"path_prefix": "/payments", "upstream": "http://127.0.0.1:9",
                        "tool": "payments", "tenant": "acme", "env": "prod",
                        "allow_bearer": True, "require_client_cert": True}],
            "ext_authz": {"http_mode": "nginx", "trusted_proxies": ["127.0.0.1"]},
        })  # fmt: skip
        pipeline = build_pipeline(self.services, settings)
        ext = ExtAuthz(pipeline, settings, validator=self.pki.validator(), xfcc_mode=xfcc_mode)
        with serve(create_ext_authz_http_app(ext, settings.ext_authz)) as url:
            yield url


def write_config(tmp: Path, pki_yaml: str = "") -> Path:
    from tests.support.server import free_port, write_dev_config

    return write_dev_config(tmp, free_port(), f"pki:\n  trust_domain: {TD}\n{pki_yaml}")


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[Pki]:
    pki = Pki(tmp_path)
    yield pki
    asyncio.run(pki.services.aclose())


def cert_call(url: str, pki: Pki, **extra: str) -> httpx.Response:
    headers = {"authorization": f"Bearer {pki.token}", "x-original-uri": "/payments/charge",
               "x-original-method": "POST", **extra}  # fmt: skip
    return httpx.get(f"{url}/auth", headers=headers)


def test_nginx_ignores_a_certificate_header_unless_pki_says_nginx_sets_it(mtls: Pki) -> None:
    """Without ``pki.xfcc_mode: nginx`` an ``X-SSL-Client-Cert`` reaching the door is the one the
    client sent (``auth_request`` passes every header on): a public certificate would satisfy
    ``require_client_cert`` and a stolen ``cnf.x5t#S256`` token without the private key."""
    for url in mtls.door("none"):
        assert cert_call(url, mtls).json()["code"] == "cert_required"
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": quote(mtls.pem)})
        assert (door_status(resp), resp.json()["code"]) == (401, "cert_required")
    for url in mtls.door("envoy"):  # another proxy's header mode is not nginx's
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": quote(mtls.pem)})
        assert (door_status(resp), resp.json()["code"]) == (401, "cert_required")


def test_nginx_believes_the_certificate_header_when_pki_says_nginx_sets_it(mtls: Pki) -> None:
    for url in mtls.door("nginx"):
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": quote(mtls.pem)})
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-aegis-agent-id"] == "alpha"


def test_nginx_reads_only_the_certificate_header_pki_names(tmp_path: Path) -> None:
    """With ``pki.xfcc_header`` set, nginx puts the certificate in that header and passes the
    default ``X-SSL-Client-Cert`` on as the client sent it: the door (as ``aegis gateway``
    builds it) must read the named header only, or a caller names any public certificate."""
    pki = Pki(
        tmp_path,
        "  xfcc_mode: nginx\n  xfcc_header: X-Client-Cert\n  trusted_proxies: ['127.0.0.1']\n",
    )
    try:
        settings = GatewaySettings.model_validate({
            "public_url": "https://gw.example.com", "allow": [{"tool": "payments"}],
            "routes": [{"path_prefix": "/payments", "upstream": "http://127.0.0.1:9",
                        "tool": "payments", "tenant": "acme", "env": "prod",
                        "allow_bearer": True, "require_client_cert": True}],
            "ext_authz": {"http_mode": "nginx", "trusted_proxies": ["127.0.0.1"]},
        })  # fmt: skip
        ext = build_ext_authz(pki.services, settings, build_pipeline(pki.services, settings))
        with serve(create_ext_authz_http_app(ext, settings.ext_authz)) as url:
            forged = cert_call(url, pki, **{"x-ssl-client-cert": quote(pki.pem)})
            assert (door_status(forged), forged.json()["code"]) == (401, "cert_required")
            named = cert_call(url, pki, **{"x-client-cert": quote(pki.pem)})
            assert named.status_code == 200, named.text
            assert named.headers["x-aegis-agent-id"] == "alpha"
    finally:
        asyncio.run(pki.services.aclose())


@pytest.mark.parametrize(("xfcc_mode", "code"), [("none", 200), ("envoy", 401)])
def test_envoy_reads_xfcc_only_when_pki_says_envoy_sets_it(
    env: Env, xfcc_mode: XfccMode, code: int
) -> None:
    """A malformed XFCC value shows whether the door read the header at all."""
    gateway = settings_with_routes(env)
    ext = ExtAuthz(env.pipeline, gateway, xfcc_mode=xfcc_mode)
    agent = Agent(env)
    for url in door(env, ext=ext, http_mode="envoy", path_prefix="/check",
                    trusted_proxies=["127.0.0.1"]):  # fmt: skip
        headers = {**creds(agent), "x-forwarded-client-cert": 'Cert="not%20a%20cert"'}
        resp = httpx.post(f"{url}/check/payments/charge", headers=headers)
        assert resp.status_code == code, resp.text


# -- what the reverse proxy refuses, every door refuses -------------------------------------------


async def test_grpc_refuses_a_fragment_in_the_query_and_methods_the_proxy_refuses(
    env: Env, stub: pb_grpc.AuthorizationStub
) -> None:
    """``?action=delete#x``: policy would read ``action`` as ``delete#x`` while an upstream that
    drops the fragment reads ``delete``; the reverse proxy answers 400, and so does this door.
    A method the proxy answers 405 (``MOVE``, ``TRACE``, ``get``) is 405 here too."""
    agent = Agent(env)
    token = agent.token()
    headers = dpop_headers(agent, token, path="/payments/charge")
    ok = await stub.Check(check(headers, path="/payments/charge?action=delete"))
    assert ok.status.code == code_pb2.OK, ok
    token = agent.token()
    headers = dpop_headers(agent, token, path="/payments/charge")
    status, _, body = denied(await stub.Check(check(headers, path="/payments/charge?a=delete#x")))
    assert (status, body["code"]) == (400, "invalid_request")
    # Methods are case-sensitive (RFC 9110 §9.1): Envoy passes an HTTP/2 ":method: get" on as
    # sent, which the reverse proxy answers 405; decided as GET, it would reach the upstream as
    # "get", read however that upstream reads it.
    for method in ("MOVE", "TRACE", "CONNECT", "get", "Delete"):
        token = agent.token()
        headers = dpop_headers(agent, token, method=method.upper(), path="/payments/charge")
        status, sent, body = denied(await stub.Check(check(headers, method=method)))
        assert (status, body["code"]) == (405, "method_not_allowed"), method
        assert sent["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def test_nginx_refuses_a_fragment_in_the_query_and_methods_the_proxy_refuses(
    env: Env, nginx: str
) -> None:
    agent = Agent(env)
    assert nginx_call(nginx, agent, "/payments/charge?action=delete").status_code == 200
    resp = nginx_call(nginx, agent, "/payments/charge?action=delete#x")
    assert (door_status(resp), resp.json()["code"]) == (400, "invalid_request")
    resp = nginx_call(nginx, agent, "/payments/charge", **{"x-original-method": "MOVE"})
    assert (door_status(resp), resp.json()["code"]) == (405, "method_not_allowed")
    resp = nginx_call(nginx, agent, "/payments/charge", **{"x-original-method": "get"})
    assert (door_status(resp), resp.json()["code"]) == (405, "method_not_allowed")
    assert resp.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def test_a_required_certificate_must_name_the_tokens_agent(mtls: Pki) -> None:
    """require_client_cert with a token not bound to a certificate: a valid certificate of
    another agent (another tenant here) beside a stolen token must not satisfy it."""
    registry = mtls.services.registry
    registry.register_agent(AgentSpec("mallory", "globex", "prod", "m@example.com"), actor="t")
    theirs = mtls.pki.issue("mallory", ec.generate_private_key(ec.SECP256R1()).public_key())
    their_pem = theirs.certificate.public_bytes(serialization.Encoding.PEM).decode()
    client, _ = registry.create_client(
        "alpha", auth_method=ClientAuthMethod.CLIENT_SECRET_BASIC, actor="t"
    )
    unbound = mtls.services.issuer.issue(
        agent_id="alpha", client_id=client.client_id, tenant="acme", env="prod",
        scopes=("payments:write",), audience=("aegis-gateway",), lifetime=300,
    ).token  # fmt: skip
    for url in mtls.door("nginx"):
        headers = {"authorization": f"Bearer {unbound}", "x-original-uri": "/payments/charge",
                   "x-original-method": "POST"}  # fmt: skip
        other = httpx.get(f"{url}/auth", headers={**headers, "x-ssl-client-cert": quote(their_pem)})
        assert (door_status(other), other.json()["code"]) == (401, "invalid_token"), other.text
        own = httpx.get(f"{url}/auth", headers={**headers, "x-ssl-client-cert": quote(mtls.pem)})
        assert own.status_code == 200, own.text


def test_a_suspended_tenants_certificates_stop_passing(mtls: Pki) -> None:
    validator = mtls.pki.validator()
    der = x509.load_pem_x509_certificate(mtls.pem.encode()).public_bytes(serialization.Encoding.DER)
    assert validator.validate(der).agent_id == "alpha"
    mtls.services.registry.set_tenant_status("acme", TenantStatus.SUSPENDED, actor="t")
    mtls.services.cache.invalidate()
    with pytest.raises(AegisError) as refused:
        validator.validate(der)
    assert refused.value.code == "cert_revoked"


HOST_RULE = """
apiVersion: aegis/v1
kind: Policy
metadata: {name: by-host}
spec:
  rules:
    - {id: public-host, action: allow, match: {tools: [payments]},
       when: {path: request.headers.host, eq: gw.example.com}}
"""


def test_nginx_policy_sees_the_original_host_not_the_subrequests(env: Env, nginx: str) -> None:
    """The auth_request subrequest's Host names the auth location (and its X-Forwarded-For is
    the door's own): a rule on request.headers.host must read the host the client addressed."""
    env.policies.activate(
        "acme", "prod", env.policies.put(load_document(HOST_RULE), now=0), actor="t", now=0
    )
    agent = Agent(env)
    resp = nginx_call(nginx, agent, "/payments/charge", **{"x-forwarded-host": "gw.example.com"})
    assert resp.status_code == 200, resp.text
    other = nginx_call(nginx, agent, "/payments/charge", **{"x-forwarded-host": "gw.example.org"})
    assert (door_status(other), other.json()["code"]) == (403, "access_denied")


def _rejections(code: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "aegis_mtls_rejections_total", {"listener": "ext_authz", "code": code}
        )
        or 0.0
    )


def test_a_malformed_forwarded_certificate_at_ext_authz_is_counted_and_audited(
    mtls: Pki,
) -> None:
    """Refused (401 ``cert_invalid``) but, unlike every other refused certificate, neither
    counted in ``aegis_mtls_rejections_total`` nor written as ``mtls.rejected``: it was parsed
    outside the step that records refused certificates."""
    before = _rejections("cert_invalid")
    for url in mtls.door("nginx"):
        resp = cert_call(url, mtls, **{"x-ssl-client-cert": "junk"})
        assert (door_status(resp), resp.json()["code"]) == (401, "cert_invalid")
    log = mtls.services.extras["exchange_audit"]  # the pipeline's audit database
    records = [r for r in log.records(kind="mtls.rejected") if r["code"] == "cert_invalid"]
    assert _rejections("cert_invalid") == before + 1, "refused certificate not counted"
    assert len(records) == 1, "refused certificate not audited as mtls.rejected"
