"""Mutual TLS end to end on loopback: a real listener, real ``ssl`` clients, real nginx.

Every refused certificate is refused with its own reason, before any route runs, and counted.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from tests.pki.conftest import Pki, build_pki
from tests.pki.forge import forge_ca, forge_leaf
from tests.pki.harness import (
    client_ctx,
    close_writer,
    control_plane,
    fetch,
    gateway_app,
    gateway_server_context,
    rejections,
    serve,
)

from aegis.audit.log import AuditLog
from aegis.errors import Unavailable
from aegis.pki.ca import ca_passphrase
from aegis.pki.middleware import MTLS_AUDIT_KIND
from aegis.pki.profile import x5t_s256
from aegis.types import AgentStatus, ClientAuthMethod


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return build_pki(tmp_path)


def _name() -> str:
    return f"it-{uuid.uuid4().hex[:8]}"


async def _counted(name: str, code: str) -> float:
    for _ in range(
        100
    ):  # a refused handshake is counted by the server task, just after the client sees it
        if rejections(name, code):
            return rejections(name, code)
        await asyncio.sleep(0.02)
    return rejections(name, code)


async def test_a_valid_agent_certificate_reaches_the_app_with_its_identity(pki: Pki) -> None:
    name = _name()
    key, cert = pki.key_and_cert("alpha")
    async with serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw:
        result = await fetch(gw.port, client_ctx(pki, key, cert, pki.ca.current.cert))
    assert result.status == 200, result
    assert result.body is not None
    peer = result.body["peer"]
    assert peer["spiffe_id"] == "spiffe://example.org/tenant/t1/env/prod/agent/alpha"
    assert (peer["agent"], peer["tenant"], peer["env"]) == ("alpha", "t1", "prod")
    assert peer["serial"] == format(cert.serial_number, "x")
    assert peer["source"] == "tls"


# Refused during the handshake by OpenSSL: counted by the listener, the route never runs.
HANDSHAKE_CASES = [
    "no certificate",
    "another ca",
    "expired by one second",
    "not yet valid",
    "wrong eku",
    "intermediate without the ca bit",
]


@pytest.mark.parametrize("case", HANDSHAKE_CASES)
async def test_handshake_rejections_are_counted_by_reason(pki: Pki, case: str) -> None:
    name = _name()
    now = pki.clock.now()
    chain = [pki.ca.current.cert]
    if case == "no certificate":
        key, cert, code = None, None, "cert_required"
    elif case == "another ca":
        other_root = forge_ca("Other Root")
        other = forge_ca("Other Issuing", other_root)
        key, cert = forge_leaf(pki, issuer=other)
        chain, code = [other[0]], "cert_untrusted"
    elif case == "expired by one second":
        key, cert = forge_leaf(pki, not_before=now - 600, not_after=now - 1)
        code = "cert_expired"
    elif case == "not yet valid":
        key, cert = forge_leaf(pki, not_before=now + 300, not_after=now + 900)
        code = "cert_not_yet_valid"
    elif case == "wrong eku":
        key, cert = forge_leaf(pki, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        code = "cert_wrong_usage"
    else:
        root_key = serialization.load_pem_private_key(
            pki.ca.files.root_key.read_bytes(), password=ca_passphrase(pki.kek)
        )
        assert isinstance(root_key, ec.EllipticCurvePrivateKey)
        root = (pki.ca.root, root_key)
        not_ca = forge_ca("Aegis Issuing CA lookalike", root, ca=False)
        key, cert = forge_leaf(pki, issuer=not_ca)
        chain, code = [not_ca[0]], "cert_untrusted"
    ctx = client_ctx(pki, key, *([cert, *chain] if cert is not None else []))
    async with serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw:
        result = await fetch(gw.port, ctx)
        assert result.status is None, f"{case}: the request was served: {result}"
        assert await _counted(name, code) == 1, f"{case}: not counted as {code}"


# Past the handshake, refused by the Aegis rules: a 401/403 naming the reason, serial and SPIFFE ID.
async def test_application_level_rejections_carry_reason_serial_and_spiffe_id(pki: Pki) -> None:
    name = _name()
    revoked_key, revoked = pki.key_and_cert("gamma")
    cases = {
        "revoked": (revoked_key, revoked, "cert_revoked", 401),
        "ca certificate as a leaf": (*forge_leaf(pki, ca=True), "cert_wrong_usage", 401),
        "spiffe id naming another tenant": (
            *forge_leaf(pki, agent="alpha", tenant="t2"),
            "cert_agent_mismatch",
            403,
        ),
        "spiffe id naming an unknown agent": (
            *forge_leaf(pki, agent="ghost", tenant="t1"),
            "cert_agent_mismatch",
            403,
        ),
        "two uri sans": (
            *forge_leaf(
                pki,
                uris=[
                    "spiffe://example.org/tenant/t1/env/prod/agent/alpha",
                    "spiffe://example.org/tenant/t1/env/prod/agent/gamma",
                ],
            ),
            "spiffe_id_invalid",
            401,
        ),
    }
    pki.registry.set_agent_status("gamma", AgentStatus.SUSPENDED, actor="test")
    async with serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw:
        for case, (key, cert, code, status) in cases.items():
            result = await fetch(gw.port, client_ctx(pki, key, cert, pki.ca.current.cert))
            assert (result.status, (result.body or {}).get("code")) == (status, code), (
                f"{case}: {result}"
            )
            assert result.body is not None
            assert result.body["serial"] == format(cert.serial_number, "x"), case
            if code != "spiffe_id_invalid":
                assert result.body["spiffe_id"].startswith("spiffe://example.org/tenant/"), case
            assert rejections(name, code) >= 1, case


async def test_every_refusal_is_audited_with_serial_and_spiffe_id(pki: Pki) -> None:
    """Refusals in the handshake and after it each leave an ``mtls.rejected`` audit record (the
    real hash-chained log), with the certificate's serial and SPIFFE ID once they are known."""
    name = _name()
    audit = AuditLog(f"sqlite:///{pki.directory / 'audit.db'}", clock=pki.clock)
    revoked_key, revoked = pki.key_and_cert("gamma")
    pki.registry.set_agent_status("gamma", AgentStatus.SUSPENDED, actor="test")
    now = pki.clock.now()
    expired_key, expired = forge_leaf(pki, not_before=now - 600, not_after=now - 1)
    app = gateway_app(pki, name=name, audit=audit.append_async)
    async with serve(app, gateway_server_context(pki), name=name, audit=audit.append_async) as gw:
        refused = await fetch(gw.port, client_ctx(pki, revoked_key, revoked, pki.ca.current.cert))
        assert (refused.body or {}).get("code") == "cert_revoked"
        handshake = await fetch(gw.port, client_ctx(pki, expired_key, expired, pki.ca.current.cert))
        assert handshake.status is None
        assert await _counted(name, "cert_expired") == 1
        ok_key, ok = pki.key_and_cert("alpha")
        assert (
            await fetch(gw.port, client_ctx(pki, ok_key, ok, pki.ca.current.cert))
        ).status == 200
    records = [r for r in audit.records(kind=MTLS_AUDIT_KIND) if r["listener"] == name]
    by_stage = {r["stage"]: r for r in records}
    assert len(records) == 2, records  # the accepted call is the pipeline's to audit, not this
    peer = by_stage["peer_certificate"]
    assert (peer["code"], peer["serial"], peer["spiffe_id"]) == (
        "cert_revoked",
        format(revoked.serial_number, "x"),
        "spiffe://example.org/tenant/t1/env/prod/agent/gamma",
    )
    assert (peer["path"], peer["certificate_source"], peer["client"]) == (
        "/whoami",
        "tls",
        "127.0.0.1",
    )
    tls = by_stage["tls_handshake"]
    assert (tls["code"], tls["client"]) == ("cert_expired", "127.0.0.1")
    assert audit.verify_chain().ok
    audit.close()


async def test_a_failing_audit_sink_never_lets_a_refused_certificate_through(pki: Pki) -> None:
    async def broken(kind: str, record: dict[str, object]) -> None:
        raise Unavailable("the audit log cannot be written", code="audit_unavailable")

    name = _name()
    key, cert = forge_leaf(pki, ca=True)
    async with serve(gateway_app(pki, name=name, audit=broken), gateway_server_context(pki), name=name) as gw:  # fmt: skip
        result = await fetch(gw.port, client_ctx(pki, key, cert, pki.ca.current.cert))
    assert (result.status, (result.body or {}).get("code")) == (401, "cert_wrong_usage")


async def test_revocation_applies_to_open_connections_at_once(pki: Pki) -> None:
    name = _name()
    key, cert = pki.key_and_cert("alpha")
    ctx = client_ctx(pki, key, cert, pki.ca.current.cert)
    async with serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw:
        assert (await fetch(gw.port, ctx)).status == 200
        pki.registry.set_agent_status("alpha", AgentStatus.RETIRED, actor="test")
        result = await fetch(gw.port, ctx)
    assert (result.status, (result.body or {}).get("code")) == (401, "cert_revoked")


async def test_token_bound_to_certificate_a_is_refused_on_a_connection_with_certificate_b(
    pki: Pki,
) -> None:
    """tls_client_auth at the token endpoint (RFC 8705 §2.1) mints a token bound to certificate A
    (§3); the gateway accepts it with A and refuses it with B, another valid certificate of the
    same agent."""
    name = _name()
    key_a, cert_a = pki.key_and_cert("alpha")
    key_b, cert_b = pki.key_and_cert("alpha")
    client, _ = pki.registry.create_client(
        "alpha",
        auth_method=ClientAuthMethod.TLS_CLIENT_AUTH,
        tls_san_uri="spiffe://example.org/tenant/t1/env/prod/agent/alpha",
        actor="test",
    )
    cp = control_plane(pki, name=name)
    ctx_a = client_ctx(pki, key_a, cert_a, pki.ca.current.cert)
    ctx_b = client_ctx(pki, key_b, cert_b, pki.ca.current.cert)
    body = f"grant_type=client_credentials&client_id={client.client_id}"
    form = {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": str(len(body))}
    cp_ctx = gateway_server_context(pki, require_client_cert=False)
    async with serve(cp.app, cp_ctx, name=name) as as_server:
        issued = await fetch(
            as_server.port, ctx_a, "/oauth/token", method="POST", headers=form, body=body
        )
        no_cert = await fetch(
            as_server.port,
            client_ctx(pki, None),
            "/oauth/token",
            method="POST",
            headers=form,
            body=body,
        )
    assert issued.status == 200, issued
    assert no_cert.status == 401, no_cert
    assert issued.body is not None
    token = issued.body["access_token"]
    assert cp.verifier.verify(token).cnf == {"x5t#S256": x5t_s256(cert_a)}
    gateway = gateway_app(pki, name=name, verifier=cp.verifier)
    bearer = {"Authorization": f"Bearer {token}"}
    async with serve(gateway, gateway_server_context(pki), name=name) as gw:
        with_a = await fetch(gw.port, ctx_a, "/call", headers=bearer)
        with_b = await fetch(gw.port, ctx_b, "/call", headers=bearer)
    assert (with_a.status, with_a.body) == (200, {"ok": True, "agent": "alpha"})
    assert with_b.status == 401
    assert with_b.body is not None
    assert (with_b.body["code"], with_b.body["reason"]) == ("invalid_token", "cert_token_mismatch")


# -- behind nginx ------------------------------------------------------------------------------

NGINX_CONF = """
worker_processes 1;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_bind {proxy_addr};
            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;
        }}
    }}
}}
"""
PROXY_ADDR = "127.0.0.3"  # nginx connects from here; the app trusts only this address


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _wait_for_port(port: int, proc: asyncio.subprocess.Process | None = None) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await close_writer(writer)
            return
        except OSError:
            if proc is not None and proc.returncode is not None:
                break
            await asyncio.sleep(0.025)
    raise AssertionError(f"nothing is listening on 127.0.0.1:{port}")


async def test_forwarded_certificate_honoured_from_nginx_and_ignored_from_anyone_else(
    pki: Pki, tmp_path: Path
) -> None:
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.fail("nginx is not installed: run `apt-get install -y nginx` (CI installs it)")
    name = _name()
    app = gateway_app(pki, name=name, trusted_proxies=[PROXY_ADDR], mode="nginx")
    upstream_port, nginx_port = _free_port(), _free_port()
    upstream = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=upstream_port,
            proxy_headers=False,
            lifespan="off",
            log_level="warning",
        )
    )
    serving = asyncio.create_task(upstream.serve())
    gw_key, gw_cert = pki.key_and_cert("gw")
    cert_path, key_path = pki.write_pair("nginx-gw", gw_key, gw_cert, pki.ca.current.cert)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pki.ca.bundle_pem())
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp_path,
            port=nginx_port,
            cert=cert_path,
            key=key_path,
            bundle=bundle,
            upstream=upstream_port,
            proxy_addr=PROXY_ADDR,
        )
    )
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        str(tmp_path),
        "-c",
        str(conf),
        "-g",
        "daemon off; user root;",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await _wait_for_port(upstream_port)
        await _wait_for_port(nginx_port, proc)
        key, cert = pki.key_and_cert("alpha")
        spoof_key, spoof = pki.key_and_cert("beta")
        ctx = client_ctx(pki, key, cert, pki.ca.current.cert)
        # Through nginx: the certificate nginx verified is the caller; a header the caller set
        # itself is overwritten by nginx's proxy_set_header.
        spoofed = quote(spoof.public_bytes(serialization.Encoding.PEM).decode(), safe="")
        via = await fetch(nginx_port, ctx, headers={"X-SSL-Client-Cert": spoofed})
        assert via.status == 200, via
        assert via.body is not None
        assert via.body["peer"]["agent"] == "alpha"
        assert via.body["peer"]["source"] == "forwarded"
        assert via.body["forwarded_headers_seen"] == {}
        # Revocation is the app's decision, made behind the proxy too.
        pki.store.revoke_serial(format(cert.serial_number, "x"), "key_compromise")
        revoked = await fetch(nginx_port, ctx)
        assert (revoked.status, (revoked.body or {}).get("code")) == (401, "cert_revoked")
        # nginx refuses a client without a certificate itself.
        bare = await fetch(nginx_port, client_ctx(pki, None))
        assert bare.status == 400
        # Straight to the app from an address that is not the proxy: the header is ignored.
        reader, writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        valid = quote(
            pki.key_and_cert("alpha")[1].public_bytes(serialization.Encoding.PEM).decode(), safe=""
        )
        writer.write(
            f"GET /whoami HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-SSL-Client-Cert: {valid}\r\n\r\n".encode()
        )
        raw = await reader.read()
        await close_writer(writer)
        assert raw.startswith(b"HTTP/1.1 401"), raw[:200]
        assert b'"code":"cert_required"' in raw
        del spoof_key
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        upstream.should_exit = True
        await asyncio.wait_for(serving, 10)
    assert proc.returncode == 0, err.decode()
