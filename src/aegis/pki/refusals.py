"""A bounded audit trail of refused TLS handshakes.

A handshake costs its sender almost nothing: no certificate, no token, not even an HTTP request.
Written one durable audit record each, a flood of them (or a load balancer's TCP probes, a port
scan) would queue behind every call's own record and fill the log. So each listener writes the
first :data:`PER_CLIENT` refusals of a client address, and the first :data:`PER_LISTENER` in all,
in every window of :data:`WINDOW` seconds, as ``mtls.rejected`` records; the rest of the window
is counted and written once, when the window closes, as one ``mtls.rejected_summary`` record:
how many, by code and by client address (the :data:`TOP_CLIENTS` busiest, and how many
addresses in all). Every refusal is still counted in ``aegis_mtls_rejections_total``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Final

from aegis.pki.middleware import AuditSink, audit_refusal
from aegis.telemetry.logging import log_event

__all__ = ["SUMMARY_KIND", "HandshakeRefusals"]

#: Seconds of one window.
WINDOW: Final = 60.0
#: Records of one client address per window; one listener's in all.
PER_CLIENT: Final = 10
PER_LISTENER: Final = 100
#: Client addresses named in a summary (the busiest); addresses tracked per window at most.
TOP_CLIENTS: Final = 20
MAX_TRACKED: Final = 10_000
SUMMARY_KIND: Final = "mtls.rejected_summary"


class HandshakeRefusals:
    """Writes a listener's handshake refusals within the bounds above (one event loop)."""

    def __init__(self, audit: AuditSink | None, *, listener: str) -> None:
        self._audit, self._listener = audit, listener
        self._start: float | None = None  # loop.time() the window opened
        self._written: Counter[str] = Counter()  # records of each client this window
        self._total = 0
        self._by_code: Counter[str] = Counter()  # what was only counted this window
        self._by_client: Counter[str] = Counter()
        self._flush: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def refused(self, record: dict[str, Any]) -> None:
        """One refused handshake (``record`` has at least ``code`` and ``client``)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None or now - self._start >= WINDOW:
            self._close_window()
            self._start = now
        client = str(record.get("client"))
        if self._total < PER_LISTENER and self._written[client] < PER_CLIENT:
            self._total += 1
            if client in self._written or len(self._written) < MAX_TRACKED:
                self._written[client] += 1
            log_event("mtls.handshake_refused", **record)
            await audit_refusal(self._audit, record)
            return
        self._by_code[str(record.get("code"))] += 1
        if client in self._by_client or len(self._by_client) < MAX_TRACKED:
            self._by_client[client] += 1
        else:
            self._by_client["other"] += 1
        if self._flush is None:
            self._flush = loop.call_at(self._start + WINDOW, self._close_window)

    def _close_window(self) -> None:
        """Write the closing window's summary, if anything in it was only counted."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._by_code:
            summary = {
                "listener": self._listener,
                "stage": "tls_handshake",
                "window_seconds": WINDOW,
                "suppressed": sum(self._by_code.values()),
                "by_code": dict(self._by_code),
                "clients": len(self._by_client),
                "by_client": dict(self._by_client.most_common(TOP_CLIENTS)),
            }
            log_event("mtls.handshake_refusals_summarised", level=logging.WARNING, **summary)
            if self._audit is not None:
                task = asyncio.ensure_future(self._write(summary))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
        self._written.clear()
        self._total = 0
        self._by_code.clear()
        self._by_client.clear()

    async def _write(self, summary: dict[str, Any]) -> None:
        assert self._audit is not None
        try:
            await self._audit(SUMMARY_KIND, summary)
        except Exception as exc:  # as audit_refusal: logged, the refusals stand
            log_event("mtls.audit_failed", level=logging.ERROR, error=type(exc).__name__)

    async def close(self) -> None:
        """Write what the current window only counted, and wait for it (listener stop)."""
        self._close_window()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
