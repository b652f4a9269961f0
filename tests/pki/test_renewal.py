"""Certificates renew at two thirds of their life under load, with no failed call."""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time

import pytest
from starlette.applications import Starlette

from aegis.errors import AegisError
from aegis.pki.api import PkiEndpoints
from aegis.pki.renewal import CertificateManager, basic_credentials
from aegis.types import AgentStatus
from tests.pki.conftest import Pki
from tests.pki.harness import fetch, gateway_app, gateway_server_context, serve

# Seconds (not_after is whole seconds, so a certificate lives 5 to 6 s): renewals at ~3.5 s and
# ~7 s. Each renewal has the last third of the life, 1.7 s or more, to finish while five workers
# keep the event loop busy; under that load it takes up to ~0.4 s on a shared 2-core machine, so
# a shorter life turns a slow runner into a spurious "expired before it could be renewed".
LIFETIME = 6
#: The load stops once the server has seen the first certificate and two renewals; this bounds
#: the wait if it never does (the assertions below then say what is missing).
RUN_FOR = 15.0


async def test_renewal_under_load_drops_no_call(pki: Pki) -> None:
    name = "renewal"
    ca_app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    ca_ctx = gateway_server_context(pki, require_client_cert=False)
    trust = pki.ca.bundle_pem()
    verify = ssl.create_default_context(cadata=trust.decode())
    verify.check_hostname = False  # the control plane's certificate names a SPIFFE ID, not a host
    async with (
        serve(ca_app, ca_ctx, name="ca") as ca,
        serve(gateway_app(pki, name=name), gateway_server_context(pki), name=name) as gw,
    ):
        manager = CertificateManager(
            f"https://127.0.0.1:{ca.port}",
            basic_credentials(*pki.secrets["alpha"]),
            clock=pki.clock,
            trust_pem=trust,
            verify=verify,
            lifetime=LIFETIME,
        )
        asked = pki.clock.now()
        first = await manager.start()
        life = first.not_after - first.received_at
        # not_after is whole seconds after an instant between asking and receiving: a slow
        # enrolment shortens the life as received by exactly its own duration, no more.
        assert LIFETIME - 1 - (first.received_at - asked) < life <= LIFETIME
        assert abs(first.renew_at - (first.received_at + life * 2 / 3)) < 1e-6
        serials: set[str] = set()
        failures: list[str] = []
        calls = 0
        deadline = time.monotonic() + RUN_FOR

        async def worker(path: str) -> None:
            nonlocal calls
            while not failures and len(serials) < 3 and time.monotonic() < deadline:
                try:
                    context = manager.client_context()
                except AegisError as exc:  # recorded, not raised: every worker then stops cleanly
                    failures.append(f"{path}: {exc.code}")
                    break
                result = await fetch(gw.port, context, path)
                calls += 1
                if result.status != 200 or result.body is None:
                    failures.append(f"{path}: {result}")
                else:
                    serials.add(result.body["peer"]["serial"])

        await asyncio.gather(
            *(worker(p) for p in ("/whoami", "/whoami", "/whoami", "/slow", "/slow"))
        )
        await manager.stop()
    assert failures == []
    assert calls > 25
    assert manager.renewals >= 3  # the first certificate and at least two renewals
    assert len(serials) >= 3  # the server saw every renewed certificate in use
    # Each renewal happened before the previous certificate expired.
    records = sorted(pki.store.for_agent("alpha"), key=lambda r: r.issued_at)
    for before, after in itertools.pairwise(records):
        assert after.issued_at < before.not_after
        assert (
            after.issued_at
            >= before.issued_at + (before.not_after - before.issued_at) * 2 / 3 - 0.5
        )


async def test_failed_renewal_keeps_the_certificate_until_it_expires_then_refuses(pki: Pki) -> None:
    ca_app = Starlette(routes=PkiEndpoints(pki.service, max_body_bytes=65536).routes())
    trust = pki.ca.bundle_pem()
    verify = ssl.create_default_context(cadata=trust.decode())
    verify.check_hostname = False
    async with serve(
        ca_app, gateway_server_context(pki, require_client_cert=False), name="ca2"
    ) as ca:
        manager = CertificateManager(
            f"https://127.0.0.1:{ca.port}",
            basic_credentials(*pki.secrets["alpha"]),
            clock=pki.clock,
            trust_pem=trust,
            verify=verify,
            # The check below runs until 0.5 s past renew_at, which must come before not_after:
            # a third of the life as received, at least (4 - 1 - enrolment time) / 3 seconds.
            lifetime=4,
        )
        first = await manager.start()
        # The agent is suspended: renewal is refused, and its live certificate is revoked too.
        pki.registry.set_agent_status("alpha", AgentStatus.SUSPENDED, actor="test")
        while pki.clock.now() < first.renew_at + 0.5:
            assert manager.current is first
            await asyncio.sleep(0.2)
        assert manager.renewals == 1
        await asyncio.sleep(max(0.0, first.not_after - pki.clock.now()) + 0.1)
        with pytest.raises(AegisError) as info:
            manager.client_context()
        assert info.value.code == "cert_expired"
        await manager.stop()


async def test_revocation_checks_go_on_when_renewal_fails_unexpectedly(pki: Pki) -> None:
    """The renewal task is what reads the revocation mark; an error renewal did not plan for
    (a CA file unreadable mid-rotation, say) must not end it, or revocations would stop
    reaching pooled upstream connections. A mark that moves renews the outbound context."""
    real = pki.service.local_enrolment("alpha")
    calls = itertools.count()
    reads = [0]
    failed: list[tuple[int, ssl.SSLContext]] = []

    async def enrol(csr: str, lifetime: int | None) -> tuple[dict[str, object], bytes]:
        if next(calls):
            if not failed:
                failed.append((reads[0], manager.client_context()))
            raise PermissionError("the CA's previous certificate is being replaced")
        return await real(csr, lifetime)

    def mark() -> int:
        reads[0] += 1
        return reads[0]  # moves at every read

    manager = CertificateManager(
        "", None, clock=pki.clock, trust_pem=pki.ca.bundle_pem(), enrol=enrol,
        lifetime=LIFETIME, outbound_epoch=mark,
    )  # fmt: skip
    first = await manager.start()
    while pki.clock.now() < first.renew_at + 1.2:  # renewal fails from renew_at on
        await asyncio.sleep(0.2)
    assert manager.renewals == 1 and manager.current.serial == first.serial and failed
    read_then, context_then = failed[0]
    assert reads[0] > read_then  # still read after renewal failed ...
    assert manager.client_context() is not context_then  # ... and acted on
    await manager.stop()


async def test_an_unreadable_revocation_mark_renews_the_outbound_context(pki: Pki) -> None:
    """Whether anything was revoked cannot be told while the store does not answer: pooled
    connections are not reused meanwhile, so each new one is checked (and fails closed)."""
    down = [False]

    def mark() -> int:
        if down[0]:
            raise OSError("the certificate store does not answer")
        return 1

    manager = CertificateManager(
        "", None, clock=pki.clock, trust_pem=pki.ca.bundle_pem(),
        enrol=pki.service.local_enrolment("alpha"), lifetime=LIFETIME, outbound_epoch=mark,
    )  # fmt: skip
    await manager.start()
    context = manager.client_context()
    await asyncio.sleep(1.5)  # the mark reads the same: the context is kept
    assert manager.client_context() is context
    down[0] = True
    await asyncio.sleep(1.5)
    assert manager.client_context() is not context
    await manager.stop()


@pytest.mark.parametrize("url", ["http://aegis.example.com", "ftp://aegis.example.com"])
def test_enrolment_credentials_are_never_sent_in_clear(url: str) -> None:
    """Enrolment sends the client's secret and takes the trust bundle the agent trusts from
    then on: a control plane over http elsewhere is refused before anything is sent."""
    from aegis.clock import SystemClock
    from aegis.pki.renewal import CertificateManager, basic_credentials

    with pytest.raises(ValueError, match="https only"):
        CertificateManager(url, basic_credentials("c", "enrol-s3cret"), clock=SystemClock(),
                           trust_pem=b"")  # fmt: skip
    loopback = CertificateManager("http://127.0.0.1:9", basic_credentials("c", "s"),
                                  clock=SystemClock(), trust_pem=b"")  # fmt: skip
    assert loopback is not None


@pytest.mark.parametrize("field", ["x5t#S256", "serial", "spiffe_id"])
async def test_what_a_certificate_says_is_read_from_it_not_from_the_answer(
    pki: Pki, field: str
) -> None:
    """Tokens are bound to the thumbprint and the agent acts as the SPIFFE ID the manager
    holds: an answer whose words for them differ from the certificate it carries is refused,
    never believed."""
    from aegis.errors import AegisError

    real = pki.service.local_enrolment("alpha")

    async def lying(csr: str, lifetime: int | None) -> tuple[dict[str, object], bytes]:
        body, trust = await real(csr, lifetime)
        return {**body, field: "spiffe://example.org/other" if field == "spiffe_id" else "x"}, trust

    honest = CertificateManager("", None, clock=pki.clock, trust_pem=pki.ca.bundle_pem(),
                                enrol=real, lifetime=LIFETIME)  # fmt: skip
    got = await honest.obtain()
    assert got.spiffe_id.endswith("/agent/alpha") and got.x5t_s256
    manager = CertificateManager("", None, clock=pki.clock, trust_pem=pki.ca.bundle_pem(),
                                 enrol=lying, lifetime=LIFETIME)  # fmt: skip
    with pytest.raises(AegisError) as info:
        await manager.obtain()
    assert info.value.code == "cert_invalid"
