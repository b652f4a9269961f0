"""A real nginx (the Debian package) in front of a tool server, with ``auth_request`` pointed at the
Aegis HTTP ext_authz door: allowed calls reach the upstream with the verified identity, refused
calls get nginx's 401/403 and never reach it. nginx runs from its own temporary prefix on a free
loopback port, in the foreground, and is stopped at the end."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.gateway.harness import AgentClient, Upstream, serve
from tests.support.server import RunningServer, free_port, run_server

from aegis.audit.log import AuditLog
from aegis.config import GatewaySettings
from aegis.errors import refusal_mark
from aegis.gateway.app import build_pipeline
from aegis.gateway.ext_authz import ExtAuthz
from aegis.gateway.ext_authz_http import create_ext_authz_http_app
from aegis.policy.store import MemoryPolicyStore

NGINX = "/usr/sbin/nginx"
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nginx_present() -> None:
    # A missing nginx is a broken test machine, not a reason to pass silently (CI installs it).
    if not os.path.exists(NGINX):
        pytest.fail("nginx is not installed: run `apt-get install -y nginx` (CI installs it)")


CONF = """
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      auth_request /_aegis;
      auth_request_set $aegis_agent $upstream_http_x_aegis_agent_id;
      auth_request_set $aegis_tenant $upstream_http_x_aegis_tenant;
      auth_request_set $aegis_decision $upstream_http_x_aegis_decision_id;
      auth_request_set $aegis_attestation $upstream_http_x_aegis_attestation;
      auth_request_set $aegis_nonce $upstream_http_dpop_nonce;
      auth_request_set $aegis_status $upstream_http_x_aegis_status;
      auth_request_set $aegis_error $upstream_http_x_aegis_error;
      auth_request_set $aegis_retry $upstream_http_retry_after;
      auth_request_set $aegis_allow $upstream_http_allow;
      auth_request_set $aegis_refusal $upstream_http_x_aegis_refusal;
      error_page 401 403 = @aegis_refused;
      add_header DPoP-Nonce $aegis_nonce always;
      proxy_set_header X-Aegis-Agent-Id $aegis_agent;
      proxy_set_header X-Aegis-Tenant $aegis_tenant;
      proxy_set_header X-Aegis-Decision-Id $aegis_decision;
      proxy_set_header X-Aegis-Attestation $aegis_attestation;
      proxy_set_header X-Aegis-Override "";
      proxy_set_header Authorization "";
      proxy_set_header DPoP "";
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host:$server_port;
      proxy_set_header X-Real-IP "";
      proxy_set_header Forwarded "";
      proxy_set_header X-Forwarded-Prefix "";
      proxy_set_header X-Forwarded-Port "";
      proxy_set_header X-Original-URI "";
      proxy_set_header X-Original-Method "";
      proxy_set_header X-Original-URL "";
      proxy_set_header X-Rewrite-URL "";
      proxy_set_header X-Original-Path "";
      proxy_set_header X-Script-Name "";
      proxy_set_header X-SSL-Client-Cert "";
      proxy_set_header Client-Cert "";
      proxy_set_header Client-Cert-Chain "";
      add_header X-Aegis-Decision-Id $aegis_decision always;
      proxy_pass http://127.0.0.1:{upstream};
    }}
    location @aegis_refused {{
      default_type application/json;
      add_header Cache-Control no-store always;
      add_header DPoP-Nonce $aegis_nonce always;
      add_header Retry-After $aegis_retry always;
      add_header Allow $aegis_allow always;
      add_header X-Aegis-Decision-Id $aegis_decision always;
      add_header X-Aegis-Refusal $aegis_refusal always;
      if ($aegis_status = 400) {{ return 400 $aegis_error; }}
      if ($aegis_status = 401) {{ return 401 $aegis_error; }}
      if ($aegis_status = 404) {{ return 404 $aegis_error; }}
      if ($aegis_status = 405) {{ return 405 $aegis_error; }}
      if ($aegis_status = 408) {{ return 408 $aegis_error; }}
      if ($aegis_status = 409) {{ return 409 $aegis_error; }}
      if ($aegis_status = 413) {{ return 413 $aegis_error; }}
      if ($aegis_status = 422) {{ return 422 $aegis_error; }}
      if ($aegis_status = 429) {{ return 429 $aegis_error; }}
      if ($aegis_status = 500) {{ return 500 $aegis_error; }}
      if ($aegis_status = 503) {{ return 503 $aegis_error; }}
      return 403 $aegis_error;
    }}
    location = /_aegis {{
      internal;
      proxy_pass http://127.0.0.1:{aegis}/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI $request_uri;
      proxy_set_header X-Original-Method $request_method;
      proxy_set_header X-Forwarded-Host $host:$server_port;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
    }}
  }}
}}
"""


@dataclasses.dataclass
class Front:
    srv: RunningServer
    url: str
    upstream: Upstream


def _wait_for(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text() if log.exists() else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start within 10 s")


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    upstream = Upstream()
    tmp = tmp_path_factory.mktemp("nginx")
    with run_server(tmp_path_factory.mktemp("cp")) as srv, serve(upstream.app) as up:
        port = free_port()
        settings = GatewaySettings.model_validate(
            {
                "public_url": f"http://127.0.0.1:{port}",
                "routes": [
                    {"path_prefix": "/payments", "upstream": up, "tool": "payments",
                     "tenant": "acme", "env": "prod"},
                    {"path_prefix": "/crm", "upstream": up, "tool": "crm",
                     "tenant": "acme", "env": "prod"},
                ],
                "allow": [{"tool": "payments"}],
                "ext_authz": {"http_port": free_port(), "http_mode": "nginx",
                              "trusted_proxies": ["127.0.0.1"]},
            }
        )  # fmt: skip
        audit = AuditLog(srv.config.database_url(), clock=srv.services.clock)
        pipeline = build_pipeline(
            srv.services, settings, policy_store=MemoryPolicyStore(), audit=audit
        )
        app = create_ext_authz_http_app(ExtAuthz(pipeline, settings), settings.ext_authz)
        with serve(app) as aegis:
            conf = tmp / "nginx.conf"
            conf.write_text(
                CONF.format(
                    user="user root;" if os.geteuid() == 0 else "",
                    tmp=tmp,
                    port=port,
                    upstream=up.rsplit(":", 1)[1],
                    aegis=aegis.rsplit(":", 1)[1],
                )
            )
            proc = subprocess.Popen(
                [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_for(port, proc, tmp / "error.log")
                yield Front(srv, f"http://127.0.0.1:{port}", upstream)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                audit.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _post(front: Front, agent: AgentClient, token: str, path: str, **kw: str) -> httpx.Response:
    url = f"{front.url}{path}"
    headers = {**agent.headers(token, "POST", url), **kw}
    return httpx.post(url, json={"amount": 12}, headers=headers, timeout=10)


def test_allowed_call_reaches_upstream_with_verified_identity(front: Front) -> None:
    agent = AgentClient(front.srv, "nginx-payer")
    token = agent.access_token()
    before = len(front.upstream.seen)
    resp = _post(front, agent, token, "/payments/charge", **{"x-aegis-agent-id": "admin"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["ok"] is True
    assert len(front.upstream.seen) == before + 1
    seen = front.upstream.seen[-1]
    assert seen["path"] == "/payments/charge" and seen["body"] == b'{"amount":12}'
    assert seen["headers"]["x-aegis-agent-id"] == agent.id  # not the forged value
    assert seen["headers"]["x-aegis-tenant"] == "acme"
    assert seen["headers"]["x-aegis-decision-id"] == resp.headers["x-aegis-decision-id"]
    assert seen["headers"]["x-aegis-attestation"].count(".") == 2
    assert "authorization" not in seen["headers"] and "dpop" not in seen["headers"]


def test_refused_calls_never_reach_the_upstream(front: Front) -> None:
    agent = AgentClient(front.srv, "nginx-refused")
    token = agent.access_token()
    before = len(front.upstream.seen)
    denied = _post(front, agent, token, "/crm/lookup")  # no policy or allow entry for crm
    assert denied.status_code == 403
    url = f"{front.url}/payments/charge"
    headers = agent.headers(token, "POST", url)
    assert httpx.post(url, json={}, headers=headers, timeout=10).status_code == 200
    replay = httpx.post(url, json={}, headers=headers, timeout=10)
    assert replay.status_code == 401
    assert replay.headers["www-authenticate"].startswith("DPoP error=")
    bad = httpx.post(url, json={}, headers={"authorization": "DPoP x.y.z"}, timeout=10)
    assert bad.status_code == 401
    anonymous = httpx.post(url, json={}, timeout=10)
    assert anonymous.status_code == 401
    # Only the one allowed call got through.
    assert len(front.upstream.seen) == before + 1


def test_what_the_client_claims_about_itself_goes_nowhere(front: Front) -> None:
    """An auth_request subrequest carries every client header: the documented /_aegis location
    overwrites each one the door believes, and the upstream sees only what Aegis decided."""
    agent = AgentClient(front.srv, "nginx-claims")
    token = agent.access_token()
    claims = {
        "x-forwarded-for": "10.9.9.9",
        "x-aegis-tenant": "globex",
        "x-aegis-override": "forged",
        "x-ssl-client-cert": "-----BEGIN%20CERTIFICATE-----",
        # The same variable as X-Aegis-Agent-Id to a CGI or WSGI upstream: nginx's defaults
        # (underscores_in_headers off) drop it.
        "x_aegis_agent_id": "admin",
        # The door reads nginx's own X-Original-URI, never these: an upstream that serves the
        # path they name (IIS, Symfony), or mounts itself at the prefix (Flask, Spring), would
        # serve another call than the one decided.
        "x-original-uri": "/admin/delete-everything",
        "x-original-method": "DELETE",
        "x-forwarded-prefix": "/admin",
        "x-real-ip": "10.9.9.9",
    }
    resp = _post(front, agent, token, "/payments/charge", **claims)
    assert resp.status_code == 200, resp.text
    seen = front.upstream.seen[-1]["headers"]
    assert seen["x-aegis-tenant"] == "acme"
    assert "x-aegis-override" not in seen
    assert seen["x-aegis-agent-id"] == agent.id and "x_aegis_agent_id" not in seen
    for claim in ("x-original-uri", "x-original-method", "x-forwarded-prefix", "x-real-ip",
                  "x-ssl-client-cert"):  # fmt: skip
        assert claim not in seen, claim
    assert seen["x-forwarded-for"] == "127.0.0.1"
    decision_id = resp.headers["x-aegis-decision-id"]
    audit = AuditLog(front.srv.config.database_url(), clock=front.srv.services.clock)
    try:
        (record,) = [
            r for r in audit.records(kind="gateway.decision") if r["decision_id"] == decision_id
        ]
    finally:
        audit.close()
    assert record["client"] == "127.0.0.1"  # nginx's view of the peer, not the claimed 10.9.9.9


def test_every_refusal_reaches_the_client_with_its_status_and_json_body(front: Front) -> None:
    """auth_request passes only 401 and 403 on (any other status was nginx's own 500 page): the
    door answers 403 with the real status and body in fields the documented error_page answers
    with, so a 400 stays a 400 and every refusal is the gateway's JSON."""
    agent = AgentClient(front.srv, "nginx-statuses")
    token = agent.access_token()
    denied = _post(front, agent, token, "/crm/lookup")
    assert denied.status_code == 403 and denied.json()["code"] == "access_denied"
    assert denied.headers["x-aegis-decision-id"] == denied.json()["decision_id"]
    assert denied.headers["cache-control"] == "no-store"
    # The gateway's mark for the credentials sent (which the upstream never sees) reaches the
    # client: an SDK retries, refreshes or waits only on marked answers.
    assert denied.headers["x-aegis-refusal"] == refusal_mark(f"DPoP {token}")
    url = f"{front.url}/payments/charge"
    anonymous = httpx.post(url, json={}, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthenticated"
    assert anonymous.headers.get_list("www-authenticate") == [anonymous.headers["www-authenticate"]]
    assert anonymous.headers["www-authenticate"].startswith("DPoP")
    bad_url = f"{front.url}/payments/x%2Fy"  # an encoded '/': refused before any decision
    bad = httpx.post(bad_url, json={}, headers=agent.headers(token, "POST", bad_url), timeout=10)
    assert bad.status_code == 400, bad.text
    assert bad.json()["code"] == "invalid_request"
    odd = httpx.request("PROPFIND", url, headers=agent.headers(token, "PROPFIND", url), timeout=10)
    assert odd.status_code == 405, odd.text
    assert odd.json()["code"] == "method_not_allowed" and "POST" in odd.headers["allow"]
    assert "x-aegis-error" not in denied.headers and "x-aegis-status" not in denied.headers
