"""Mutual-TLS handshakes per second (TLS 1.3, P-256 certificates from the Aegis CA), full and resumed.

Server: the gateway's TLS front (``MTLSListener``: the handshake with a required client
certificate, then HTTP/1.1) and its transport identity step (``PeerCertificateMiddleware`` with
the real ``PeerValidator``: path validation, SPIFFE rules, the issued-certificate record and the
registry, through their short caches) in its own process pinned to one core, answering
``GET /ping``.
Clients, one connection at a time, each doing handshake + one request + close:

* Python ``ssl`` (what the SDK uses) against the listener;
* ``openssl s_time`` (C) against the listener;
* ``openssl s_time`` against ``openssl s_server -WWW`` with the same certificates: the floor,
  what OpenSSL alone does on this machine, measured in the same run.

Resumed handshakes reuse the TLS 1.3 session ticket (the client certificate is not re-sent).
Also, in process: the CPU of one peer validation on first sight of a certificate and for one
that passed before (the per-request cost on an mTLS route).
Everything is on loopback and bounded (``--seconds`` per measurement).

    .venv/bin/python bench/bench_mtls.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import SystemClock
from aegis.config import AegisConfig
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.profile import LeafRequest, build_leaf
from aegis.pki.service import PkiService
from aegis.pki.store import CertificateStore
from aegis.pki.tls import client_context, server_context
from aegis.registry.cache import RegistryCache
from aegis.registry.service import AgentSpec, RegistryService
from aegis.stores import open_registry_store

TRUST_DOMAIN = "bench.example"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def _material(tmp: Path) -> dict[str, Path]:
    """A CA, a serving certificate for the listener and a client certificate, as files."""
    clock = SystemClock()
    files = CaFiles(
        tmp, tmp / "root.pem", tmp / "root.key.pem", tmp / "int.pem", tmp / "int.key.pem"
    )
    ca = CertificateAuthority.init(files, os.urandom(32), clock, TRUST_DOMAIN)
    now = clock.now()
    out: dict[str, Path] = {"bundle": tmp / "bundle.pem", "db": tmp / "bench.db"}
    out["bundle"].write_bytes(ca.bundle_pem())
    # The client is a registered agent with a certificate issued (and recorded) by the CA, so
    # the listener's validator accepts it exactly as the gateway would.
    url = f"sqlite:///{out['db']}"
    store = open_registry_store(url)
    registry = RegistryService(store, clock=clock, pepper=os.urandom(32))
    registry.register_agent(AgentSpec("client", "t", "e", "bench@example.com"), actor="bench")
    settings = AegisConfig.model_validate({"pki": {"trust_domain": TRUST_DOMAIN}}).pki
    pki = PkiService(
        ca,
        CertificateStore(url, clock=clock),
        RegistryCache(store, clock=clock),
        settings=settings,
        clock=clock,
        pepper=os.urandom(32),
    )
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        if server:
            sid = f"spiffe://{TRUST_DOMAIN}/tenant/t/env/e/agent/{name}"
            req = LeafRequest(key.public_key(), sid, name, "t", now - 10, now + 3600, server)
            cert = build_leaf(req, ca.current.cert, ca.current.key)
        else:
            cert = pki.issue(name, key.public_key(), lifetime=3600).certificate
        pem = serialization.Encoding.PEM
        out[name] = tmp / f"{name}.pem"
        out[name].write_bytes(cert.public_bytes(pem) + ca.current.cert.public_bytes(pem))
        out[f"{name}_key"] = tmp / f"{name}.key"
        out[f"{name}_key"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return out


def _validator(files: dict[str, Path]) -> Any:
    """The gateway's peer validator over the bench CA, certificate store and registry."""
    from aegis.pki.peer import PeerValidator, TrustBundle

    clock, url = SystemClock(), f"sqlite:///{files['db']}"
    return PeerValidator(
        TrustBundle(files["bundle"].read_bytes()),
        CertificateStore(url, clock=clock),
        RegistryCache(open_registry_store(url), clock=clock),
        trust_domain=TRUST_DOMAIN,
        clock=clock,
    )


def _serve_listener(files: dict[str, Path], port: int, ready: Any) -> None:
    _pin(0)
    from aegis.pki.listener import MTLSListener
    from aegis.pki.middleware import PeerCertificateMiddleware

    key = serialization.load_pem_private_key(files["server_key"].read_bytes(), None)
    ctx = server_context(files["server"].read_bytes(), key, files["bundle"].read_bytes())  # type: ignore[arg-type]
    validator = _validator(files)

    async def ping(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"pong"})

    async def main() -> None:
        app = PeerCertificateMiddleware(ping, validator, listener="bench")
        listener = MTLSListener(app, context=lambda: ctx, port=port, name="bench")
        await listener.start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _validation_cpu(files: dict[str, Path], n: int = 2000) -> tuple[float, float]:
    """CPU per ``PeerValidator.validate`` of the client certificate (checks 1-7, the record and
    agent from their short caches), in microseconds: on first sight (parsing and RFC 5280 path
    validation) and for a certificate that passed before (what every later request on an mTLS
    route, or with the same forwarded certificate, costs)."""
    validator = _validator(files)
    leaf = x509.load_pem_x509_certificates(files["client"].read_bytes())[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    validator.validate(der)
    out = []
    for forget in (True, False):
        t = time.thread_time()
        for _ in range(n):
            if forget:
                validator._passed.clear()
            validator.validate(der)
        out.append((time.thread_time() - t) / n * 1e6)
    return out[0], out[1]


def _python_client(port: int, files: dict[str, Path], seconds: float, resume: bool) -> float:
    key = serialization.load_pem_private_key(files["client_key"].read_bytes(), None)
    ctx = client_context(files["client"].read_bytes(), key, files["bundle"].read_bytes())  # type: ignore[arg-type]
    session = None
    count = 0
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            ctx.wrap_socket(
                raw, server_hostname="bench", session=session if resume else None
            ) as tls,
        ):
            tls.sendall(b"GET /ping HTTP/1.0\r\nHost: bench\r\n\r\n")
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"the listener refused the call: {answer[:200]!r}")
            if resume:
                session = tls.session
                if count > 2 and not tls.session_reused:
                    raise SystemExit(
                        "resumption did not happen; the figure would be a full handshake"
                    )
        count += 1
    return count / (time.perf_counter() - start)


def _s_time(
    openssl: str, port: int, files: dict[str, Path], seconds: float, resume: bool, cwd: Path
) -> float:
    args = [
        openssl,
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-www",
        "/ping",
        "-time",
        str(int(seconds)),
        "-cert",
        str(files["client"]),
        "-key",
        str(files["client_key"]),
        "-CAfile",
        str(files["bundle"]),
        "-reuse" if resume else "-new",
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=cwd).stdout
    match = re.search(r"([\d.]+) connections/user sec", out)
    total = re.search(r"(\d+) connections in ([\d.]+)s", out)
    if total is None or match is None:
        raise SystemExit(f"could not read openssl s_time output:\n{out}")
    return int(total.group(1)) / float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    opts = parser.parse_args()
    openssl = shutil.which("openssl")
    if openssl is None:
        raise SystemExit("openssl is not installed")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        files = _material(tmp)
        (tmp / "ping").write_text("pong")
        port, floor_port = _free_port(), _free_port()
        ready = multiprocessing.get_context("fork").Event()
        server = multiprocessing.get_context("fork").Process(
            target=_serve_listener, args=(files, port, ready), daemon=True
        )
        server.start()
        s_server = (
            subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    "0",
                    openssl,
                    "s_server",
                    "-quiet",
                    "-WWW",
                    "-accept",
                    str(floor_port),
                    "-cert",
                    str(files["server"]),
                    "-key",
                    str(files["server_key"]),
                    "-CAfile",
                    str(files["bundle"]),
                    "-Verify",
                    "2",
                ],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if shutil.which("taskset")
            else subprocess.Popen(
                [
                    openssl,
                    "s_server",
                    "-quiet",
                    "-WWW",
                    "-accept",
                    str(floor_port),
                    "-cert",
                    str(files["server"]),
                    "-key",
                    str(files["server_key"]),
                    "-CAfile",
                    str(files["bundle"]),
                    "-Verify",
                    "2",
                ],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        try:
            if not ready.wait(20):
                raise SystemExit("the listener did not start")
            time.sleep(0.3)  # let s_server bind
            _pin(1)
            rows = []
            first, seen = _validation_cpu(files)
            for label, resume in (("full", False), ("resumed", True)):
                py = _python_client(port, files, opts.seconds, resume)
                ours = _s_time(openssl, port, files, opts.seconds, resume, tmp)
                floor = _s_time(openssl, floor_port, files, opts.seconds, resume, tmp)
                rows.append((label, py, ours, floor))
        finally:
            server.terminate()
            server.join(5)
            s_server.terminate()
            s_server.wait(5)
    print(
        f"mTLS handshakes/s (TLS 1.3, P-256, client cert required, 1 connection at a time, {opts.seconds:g} s each)"
    )
    print(
        f"{'':9}{'python ssl → listener':>24}{'s_time → listener':>20}{'s_time → s_server':>20}{'listener/s_server':>20}"
    )
    for label, py, ours, floor in rows:
        print(f"{label:9}{py:>24.0f}{ours:>20.0f}{floor:>20.0f}{ours / floor:>19.0%}")
    print(
        f"peer validation CPU per call (checks 1-7, in process): first sight {first:.1f} us,"
        f" a certificate that passed before {seen:.1f} us ({first / seen:.0f}x)"
    )


if __name__ == "__main__":
    main()
