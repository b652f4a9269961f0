"""Real local receivers for the export tests: a syslog-over-TLS server and an OTLP/HTTP collector.

Both run in a thread on loopback, record what arrives, and can be stopped and started again on the
same port (the "receiver went away" case). The TLS certificates come from a throwaway test CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """``(ca.pem, server.pem, server.key)`` for a server named ``localhost`` / 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("audit test CA"))
        .issuer_name(_name("audit test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


class SyslogTlsReceiver:
    """Accepts RFC 5425 connections and parses octet-counted RFC 5424 messages."""

    def __init__(self, cert: Path, key: Path, port: int = 0) -> None:
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(cert, key)
        self.port = port
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[ssl.SSLSocket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._running = True
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while self._running:
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                raw.settimeout(5)
                conn = self._ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            self._conns.append(conn)
            t = threading.Thread(target=self._read, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, conn: ssl.SSLSocket) -> None:
        buf = b""
        conn.settimeout(0.1)
        while self._running:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            buf += chunk
            while b" " in buf:
                length, _, rest = buf.partition(b" ")
                if len(rest) < int(length):
                    break
                with self._lock:
                    self.messages.append(rest[: int(length)])
                buf = rest[int(length) :]

    def stop(self) -> None:
        self._running = False
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        self._conns = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for t in self._threads:
            t.join(timeout=2)
        self._threads = []

    def seqs(self) -> list[int]:
        with self._lock:
            out = []
            for m in self.messages:
                start = m.index(b'seq="') + 5
                out.append(int(m[start : m.index(b'"', start)]))
            return out


class OtlpCollector:
    """An OTLP/HTTP logs endpoint that parses each JSON-encoded request (the OTLP "JSON Protobuf
    Encoding"); ``status`` sets the answer, ``refuse_next`` answers that many requests 400 first
    (a passing refusal), and ``poison`` rejects the records whose body holds it with an OTLP
    partial success, keeping the others (:attr:`kept`)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        #: The body of a 200 answer (an ExportLogsServiceResponse in the JSON encoding).
        self.answer = b""
        self.refuse_next = 0
        self.poison: str | None = None
        #: Each request's record count, refused ones included.
        self.sizes: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                status, answer = outer.status, outer.answer
                if self.path == "/v1/logs" and self.headers["content-type"] == "application/json":
                    request = json.loads(body)
                    outer.sizes.append(len(_records(request)))
                    if outer.refuse_next:
                        outer.refuse_next -= 1
                        status = 400
                    elif outer.poison is not None:
                        status, answer = 200, outer._partly(request)
                    if status == 200:
                        outer.requests.append(request)
                    self.send_response(status)
                else:
                    self.send_response(415)
                answer = answer if status == 200 else b""
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/logs"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _partly(self, request: dict[str, Any]) -> bytes:
        """Keep the records without :attr:`poison` (moved into their own request), reject the
        rest, and say how many in a partial success."""
        records = _records(request)
        kept = [r for r in records if self.poison not in r["body"]["stringValue"]]
        request["resourceLogs"] = [{"scopeLogs": [{"logRecords": kept}]}]
        rejected = len(records) - len(kept)
        return json.dumps({"partialSuccess": {"rejectedLogRecords": str(rejected)}} if rejected
                          else {}).encode()  # fmt: skip

    def seqs(self) -> list[int]:
        """The seq of every record kept, in arrival order."""
        return [
            # proto3 JSON: int64 is a decimal string.
            int({a["key"]: a["value"] for a in lr["attributes"]}["aegis.audit.seq"]["intValue"])
            for req in self.requests
            for lr in _records(req)
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)


def _records(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        lr for rl in request["resourceLogs"] for sl in rl["scopeLogs"] for lr in sl["logRecords"]
    ]
