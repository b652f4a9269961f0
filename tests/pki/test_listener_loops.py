"""The mTLS listener on both event loops the gateway runs on (asyncio's and uvloop), serving in its
own thread as in a deployment, called from another loop over real TLS sockets.

uvloop starts reading a new transport as soon as its protocol's ``connection_made`` returns; a
listener that parks a plain-TCP protocol on the socket until the handshake starts would let the
ClientHello be read and dropped there, and the handshake would hang until its timeout. Every
connection here must be answered, and a refused one must still be counted.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import uvloop

from tests.pki.conftest import Pki
from tests.pki.harness import client_ctx, fetch, gateway_server_context, rejections, serve

RUNNERS: dict[str, Callable[[Any], Any]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def _answer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    chain = scope["extensions"]["tls"]["client_cert_chain"]
    body = b'{"certs":%d}' % len(chain)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@contextmanager
def _listening(pki: Pki, runner: Callable[[Any], Any], name: str) -> Iterator[int]:
    ports: list[int] = []
    failed: list[BaseException] = []
    stopping: list[Callable[[], object]] = []

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        async with serve(_answer, gateway_server_context(pki), name=name) as listener:
            # Idle in its poll until told to stop, as a server waiting for callers is.
            stopping.append(lambda: loop.call_soon_threadsafe(done.set))
            ports.append(listener.port)
            await done.wait()

    def run() -> None:
        try:
            runner(main())
        except BaseException as exc:  # surfaced to the test below
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if ports or failed:
                break
            threading.Event().wait(0.01)
        assert ports, f"the listener did not start: {failed}"
        yield ports[0]
    finally:
        for stop in stopping:
            stop()
        thread.join(10)
    assert not failed, failed


@pytest.mark.parametrize("loop", sorted(RUNNERS))
async def test_every_connection_is_answered_on_either_loop(pki: Pki, loop: str) -> None:
    key, cert = pki.key_and_cert("alpha")
    good = client_ctx(pki, key, cert, pki.ca.current.cert)
    name = f"loops-{loop}"
    with _listening(pki, RUNNERS[loop], name) as port:
        results = []
        for _ in range(25):
            results.append(await fetch(port, good, "/x", timeout=3.0))
            if results[-1].status != 200:
                break
        bare = await fetch(port, client_ctx(pki, None), "/x", timeout=3.0)
        # Counted by the listener's thread once its side of the handshake has failed.
        for _ in range(200):
            if rejections(name, "cert_required"):
                break
            await asyncio.sleep(0.01)
    assert [(r.status, r.body) for r in results] == [(200, {"certs": 1})] * 25
    assert bare.status is None and bare.error  # refused in the handshake (or its first read)
    assert rejections(name, "cert_required") == 1
