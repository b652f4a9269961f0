"""A small scripted HTTP(S) server on loopback that records every request it gets (a stand-in for
a gateway or a tool, in tests of what the SDK sends where)."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aegis.errors import REFUSAL_FIELD, refusal_mark

Answer = tuple[int, dict[str, str], bytes]


@contextmanager
def recording_server(
    answer: Callable[[str, str, dict[str, str]], Answer] | None = None,
    *,
    context: ssl.SSLContext | None = None,
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    class H(BaseHTTPRequestHandler):
        def _any(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append(
                {"method": self.command, "path": self.path, "headers": headers, "body": body}
            )
            status, hdrs, out = (answer or (lambda m, p, h: (200, {}, b"{}")))(
                self.command, self.path, headers
            )
            if hdrs.get(REFUSAL_FIELD) == _MARK:  # the gateway's refusal, marked as it marks it
                hdrs = {**hdrs, REFUSAL_FIELD: refusal_mark(headers.get("authorization", ""))}
            self.send_response(status)
            for k, v in hdrs.items():
                self.send_header(k, v)
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    if context is not None:
        srv.socket = context.wrap_socket(srv.socket, server_side=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    scheme = "https" if context is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


#: Stands for the gateway's mark of the request's credentials (filled in as the answer is sent).
_MARK = "<mark>"


def refusal(status: int, code: str, decision: str = "d-1", **extra: Any) -> Answer:
    """The gateway's refusal: its body, decision id and its mark for the request's
    credentials."""
    body = json.dumps(
        {"error": "x", "error_description": code, "code": code, "decision_id": decision, **extra}
    ).encode()
    fields = {"content-type": "application/json", "x-aegis-decision-id": decision,
              REFUSAL_FIELD: _MARK}  # fmt: skip
    return status, fields, body
