"""Syslog sink: RFC 5424 messages over TLS (RFC 5425) with octet-counting framing (§4.3).

Each record is one message::

    <110>1 2026-12-01T21:00:00.123Z HOST aegis - gateway.decision [aegis@32473 seq="42" hash="…"] BOM{json}

facility 13 (log audit), severity 6 (informational); MSGID is the record kind; the structured data
element carries the chain position and hash (SD-ID ``aegis@32473``; 32473 is the enterprise number
RFC 5612 reserves for examples: use your own in production via a fork of this constant), so a
receiver can de-duplicate on ``seq``. The receiver's certificate is verified against ``ca_file``
and its name (TLS 1.2 or newer). Before each batch the connection is probed: a receiver that went
away is noticed before anything is written to a dead socket. A write that fails midway leaves the
cursor where it was, so the batch is sent again (at-least-once); ``seq`` makes that visible.
"""

from __future__ import annotations

import select
import socket
import ssl
from datetime import UTC, datetime
from typing import Final

from aegis.audit.ship import ShippedRecord, SinkDown, SinkRejected

__all__ = ["SD_ID", "SyslogSink", "format_5424"]

SD_ID: Final = "aegis@32473"
_PRI: Final = 13 * 8 + 6
_BOM: Final = "\ufeff"
#: RFC 5425 §4.3.1: receivers must take messages up to 2048 octets and should take 8192.
MAX_MESSAGE: Final = 64 * 1024


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_5424(record: ShippedRecord, *, hostname: str, app_name: str) -> bytes:
    stamp = datetime.fromtimestamp(record.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    msgid = "".join(c for c in record.kind if "!" <= c <= "~")[:32] or "-"
    sd = f'[{SD_ID} seq="{record.seq}" hash="{_sd_escape(record.hash)}"]'
    text = f"<{_PRI}>1 {stamp} {hostname or '-'} {app_name} - {msgid} {sd} {_BOM}{record.record}"
    return text.encode("utf-8")


class SyslogSink:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        context: ssl.SSLContext,
        server_name: str | None = None,
        app_name: str = "aegis",
        timeout: float = 5.0,
        name: str = "syslog",
    ) -> None:
        self.name, self._host, self._port, self._ctx = name, host, port, context
        self._server_name = server_name or host
        self._app, self._timeout = app_name, timeout
        self._hostname = socket.gethostname()[:255] or "-"
        self._sock: ssl.SSLSocket | None = None

    @staticmethod
    def context(
        ca_file: str, cert_file: str | None = None, key_file: str | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert_file is not None:
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def delivered(self) -> int:
        return 0  # a syslog receiver cannot be asked: the cursor file is the truth

    def _alive(self, sock: ssl.SSLSocket) -> bool:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        try:
            sock.setblocking(False)
            data = sock.recv(1)
        except ssl.SSLWantReadError:
            return True
        except OSError:
            return False
        finally:
            sock.setblocking(True)
            sock.settimeout(self._timeout)
        return bool(data)  # b"": the receiver closed the connection

    def _connect(self) -> ssl.SSLSocket:
        if self._sock is not None and self._alive(self._sock):
            return self._sock
        self.close()
        raw = socket.create_connection((self._host, self._port), timeout=self._timeout)
        try:
            sock = self._ctx.wrap_socket(raw, server_hostname=self._server_name)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(self._timeout)
        self._sock = sock
        return sock

    def send(self, records: list[ShippedRecord]) -> None:
        frames = []
        for r in records:
            msg = format_5424(r, hostname=self._hostname, app_name=self._app)
            if len(msg) > MAX_MESSAGE:
                raise SinkRejected(f"record {r.seq} is larger than {MAX_MESSAGE} octets")
            frames.append(b"%d %s" % (len(msg), msg))
        try:
            self._connect().sendall(b"".join(frames))
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise SinkDown(f"syslog receiver certificate refused: {exc.verify_message}") from exc
        except OSError as exc:
            self.close()
            raise SinkDown(f"syslog receiver {self._host}:{self._port} unreachable: {exc}") from exc

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None
