"""A certificate credential that renews itself (``tls_client_auth`` with X509-SVID rotation).

:class:`RenewingCertificate` is driven by a started :class:`~aegis.pki.renewal.CertificateManager`,
which renews the agent's certificate at two thirds of its lifetime. Every httpx client the SDK
builds for it gets a :class:`RotatingAsyncTransport` (or :class:`RotatingTransport`): after each
renewal the next request goes through a new transport whose connections present the new
certificate, while requests already in flight finish on the old one (the old certificate stays
valid for the last third of its life); the old transport is closed when its last response is
closed. The ``AgentClient`` also drops every cached token bound (``cnf.x5t#S256``) to another
certificate, so the next call fetches one bound to the new certificate.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

import httpx

from aegis.pki.renewal import CertificateManager
from aegis.pki.renewal import Credential as Issued
from aegis.pki.tls import client_context
from aegis.sdk.revocation import ServerRevocations, guard_server

__all__ = ["RenewingCertificate", "RotatingAsyncTransport", "RotatingTransport"]

T = TypeVar("T")


@dataclass(eq=False)
class _Slot(Generic[T]):
    transport: T
    inflight: int = 0
    retired: bool = False
    closed: bool = False


class _Rotation(Generic[T]):
    """The current transport, the retired ones still serving requests, and the swap."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._current: _Slot[T] = _Slot(make())
        self._slots: list[_Slot[T]] = [self._current]
        #: Called once when this transport is closed (it unhooks it from the manager).
        self.detach: Callable[[], None] = lambda: None
        self.rotations = 0

    def _acquire(self) -> _Slot[T]:
        with self._lock:
            slot = self._current
            slot.inflight += 1
            return slot

    def _release(self, slot: _Slot[T]) -> bool:
        """True when ``slot`` is retired and idle now, and so is for the caller to close."""
        with self._lock:
            slot.inflight -= 1
            return self._claim(slot)

    def _claim(self, slot: _Slot[T]) -> bool:
        if not slot.retired or slot.inflight or slot.closed:
            return False
        slot.closed = True
        self._slots.remove(slot)
        return True

    def _swap(self) -> _Slot[T] | None:
        fresh = _Slot(self._make())
        with self._lock:
            old, self._current = self._current, fresh
            self._slots.append(fresh)
            old.retired = True
            self.rotations += 1
            return old if self._claim(old) else None

    def _drain_all(self) -> list[T]:
        with self._lock:
            slots, self._slots = self._slots, []
            for slot in slots:
                slot.closed = True
            return [s.transport for s in slots]

    @property
    def retired_open(self) -> int:
        """Retired transports not yet closed (they still have requests in flight)."""
        with self._lock:
            return sum(1 for s in self._slots if s.retired)


class _AsyncTracked(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, done: Callable[[], Awaitable[None]]) -> None:
        self._stream, self._done, self._open = stream, done, True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._open:
                self._open = False
                await self._done()


class RotatingAsyncTransport(_Rotation[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    def __init__(self, make: Callable[[], httpx.AsyncBaseTransport]) -> None:
        super().__init__(make)
        self._closing: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        slot = self._acquire()
        try:
            response = await slot.transport.handle_async_request(request)
        except BaseException:
            await self._finished(slot)
            raise
        stream = cast(httpx.AsyncByteStream, response.stream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_AsyncTracked(stream, lambda: self._finished(slot)),
            extensions=response.extensions,
        )

    async def _finished(self, slot: _Slot[httpx.AsyncBaseTransport]) -> None:
        if self._release(slot):
            await slot.transport.aclose()

    def rotate(self, issued: Issued) -> None:
        """The manager's ``on_renew`` hook (it runs on the event loop)."""
        old = self._swap()
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.transport.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        self.detach()
        for transport in self._drain_all():
            await transport.aclose()
        if self._closing:
            await asyncio.gather(*self._closing)


class _SyncTracked(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, done: Callable[[], None]) -> None:
        self._stream, self._done, self._open = stream, done, True

    def __iter__(self) -> Iterator[bytes]:
        yield from self._stream

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            if self._open:
                self._open = False
                self._done()


class RotatingTransport(_Rotation[httpx.BaseTransport], httpx.BaseTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        slot = self._acquire()
        try:
            response = slot.transport.handle_request(request)
        except BaseException:
            self._finished(slot)
            raise
        stream = cast(httpx.SyncByteStream, response.stream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_SyncTracked(stream, lambda: self._finished(slot)),
            extensions=response.extensions,
        )

    def _finished(self, slot: _Slot[httpx.BaseTransport]) -> None:
        if self._release(slot):
            slot.transport.close()

    def rotate(self, issued: Issued) -> None:
        old = self._swap()
        if old is not None:
            old.transport.close()

    def close(self) -> None:
        self.detach()
        for transport in self._drain_all():
            transport.close()


@dataclass(eq=False)
class RenewingCertificate:
    """``tls_client_auth`` with a certificate that ``manager`` keeps renewed. Start the manager
    (``await manager.start()``) before building the ``AgentClient``; stop it after closing it."""

    client_id: str
    manager: CertificateManager = field(repr=False)
    #: The SPIFFE IDs of the servers this agent talks to (see :class:`~aegis.sdk.Certificate`).
    servers: tuple[str, ...] = ()
    #: Refuse a revoked server certificate (see :class:`~aegis.sdk.Certificate`).
    revocations: ServerRevocations | None = None

    def apply(self, form: dict[str, str], headers: dict[str, str], issuer: str, now: float) -> None:
        form["client_id"] = self.client_id  # RFC 8705 §2: the certificate authenticates it

    def ssl_context(self) -> None:
        return None  # the transports below take the newest context for each new connection

    def _context(self, m: CertificateManager) -> ssl.SSLContext:
        """The newest certificate's context for new connections, pinned to ``servers`` and
        refusing revoked server certificates (when asked)."""
        if not self.servers and self.revocations is None:
            return m.client_context()
        cred = m.current
        ctx = client_context(cred.chain_pem(), cred.key, cred.trust_pem)
        return guard_server(ctx, self.servers, self.revocations)

    def _hook(self, rotation: _Rotation[T], rotate: Callable[[Issued], None]) -> None:
        hooks = self.manager.on_renew
        hooks.append(rotate)

        def detach() -> None:
            if rotate in hooks:
                hooks.remove(rotate)

        rotation.detach = detach

    def async_transport(self) -> RotatingAsyncTransport:
        m = self.manager
        transport = RotatingAsyncTransport(
            lambda: httpx.AsyncHTTPTransport(verify=self._context(m))
        )
        self._hook(transport, transport.rotate)
        return transport

    def transport(self) -> RotatingTransport:
        m = self.manager
        transport = RotatingTransport(lambda: httpx.HTTPTransport(verify=self._context(m)))
        self._hook(transport, transport.rotate)
        return transport
