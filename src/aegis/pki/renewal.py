"""Agent certificate life cycle: enrol, then renew at two thirds of the lifetime (X509-SVID rotation).

:class:`CertificateManager` generates a fresh P-256 key for every certificate (a renewal never
reuses a key), asks ``POST /pki/v1/sign`` for a certificate, refreshes the trust bundle (so a CA
rotation reaches the agent with its next certificate) and builds new SSL contexts. The swap is one
reference assignment: connections already open keep the context, and the certificate, they were
made with (it stays valid for the remaining third), while every new handshake uses the new one.

A failed renewal is retried with a short backoff until the certificate expires; the manager never
keeps serving an expired certificate silently (``current`` raises once it has expired).

Enrolment is over HTTP by default; a process that holds the CA itself (the gateway, beside the
control plane) passes ``enrol=PkiService.local_enrolment(agent_id)`` instead, with the same
life cycle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote_plus

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aegis.clock import Clock
from aegis.errors import CODES, AegisError
from aegis.pki.pinning import ServerCheck, check_server, pin_server_spiffe_id
from aegis.pki.profile import serial_hex, x5t_s256
from aegis.pki.tls import client_context, server_context
from aegis.telemetry.logging import log_event

__all__ = [
    "RENEW_FRACTION",
    "CertificateManager",
    "Credential",
    "Credentials",
    "Enrol",
    "basic_credentials",
]

#: Renew once this fraction of the certificate's life (from when it was received) has passed.
RENEW_FRACTION: Final = 2 / 3
#: Client authentication for the sign endpoint: extra form fields and headers, fresh per call (a
#: private_key_jwt assertion is single-use).
Credentials = Callable[[], Awaitable[tuple[dict[str, str], dict[str, str]]]]
#: Enrolment: (PEM CSR, lifetime or None) -> (the sign endpoint's JSON answer, trust bundle PEM).
Enrol = Callable[[str, int | None], Awaitable[tuple[dict[str, Any], bytes]]]


def basic_credentials(client_id: str, secret: str) -> Credentials:
    """``client_secret_basic`` credentials for :class:`CertificateManager`."""
    # RFC 6749 §2.3.1: both parts are form-urlencoded before they are joined and base64-encoded.
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    header = "Basic " + base64.b64encode(raw).decode("ascii")

    async def creds() -> tuple[dict[str, str], dict[str, str]]:
        return {}, {"Authorization": header}

    return creds


def _refused(response: httpx.Response) -> AegisError:
    """The sign endpoint's refusal with its own stable code (``invalid_client``, ``csr_invalid``,
    ``conflict`` ...); anything unrecognisable is ``ca_unavailable``."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    code = body.get("code")
    description = str(body.get("error_description", ""))[:200]
    return AegisError(
        f"certificate enrolment refused ({response.status_code}): {description}",
        code=code if isinstance(code, str) and code in CODES else "ca_unavailable",
    )


@dataclass(frozen=True, slots=True)
class Credential:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    spiffe_id: str
    serial: str
    x5t_s256: str
    #: When this process received the certificate, and when it expires (epoch seconds).
    received_at: float
    not_after: float
    trust_pem: bytes = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)
    server_context: ssl.SSLContext | None = field(repr=False, default=None)
    #: Outbound contexts pinned to one server SPIFFE ID each, built on first use.
    pinned: dict[str, ssl.SSLContext] = field(repr=False, default_factory=dict)

    @property
    def renew_at(self) -> float:
        return self.received_at + RENEW_FRACTION * (self.not_after - self.received_at)

    def chain_pem(self) -> bytes:
        certs = (self.certificate, *self.chain)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class CertificateManager:
    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None,
        *,
        clock: Clock,
        trust_pem: bytes,
        verify: ssl.SSLContext | bool = True,
        lifetime: int | None = None,
        serving: bool = False,
        require_client_cert: bool = True,
        on_renew: list[Callable[[Credential], None]] | None = None,
        enrol: Enrol | None = None,
        verify_server: ServerCheck | None = None,
        outbound_epoch: Callable[[], object] | None = None,
    ) -> None:
        if (credentials is None) == (enrol is None):
            raise ValueError("give either credentials (enrol over HTTP) or enrol, not both")
        if credentials is not None:
            _refuse_cleartext(base_url)
        self._url = base_url.rstrip("/")
        self._credentials = credentials
        self._clock = clock
        self._trust = trust_pem
        self._verify = verify
        self._lifetime = lifetime
        self._serving = serving
        #: For ``serving``: False lets the handshake succeed without a client certificate, so
        #: each route can decide (the gateway's ``require_client_cert``).
        self._require_client_cert = require_client_cert
        #: Run on every server certificate met by the outbound contexts, inside the handshake
        #: (the gateway: issued here, not revoked, its agent active).
        self._verify_server = verify_server
        #: A value that changes whenever a certificate is revoked (read on a worker thread about
        #: once a second): then the outbound contexts are rebuilt, so the next calls open new
        #: connections, whose handshake runs ``verify_server`` again, instead of reusing pooled
        #: ones to a server whose certificate was revoked meanwhile.
        self._outbound_epoch = outbound_epoch
        self._epoch: object = None
        self.on_renew = list(on_renew or [])
        self._enrol: Enrol = enrol or self._enrol_http
        self._current: Credential | None = None
        self._task: asyncio.Task[None] | None = None
        self.renewals = 0

    @property
    def current(self) -> Credential:
        cred = self._current
        if cred is None:
            raise AegisError("no certificate yet; call obtain() or start()", code="cert_required")
        if self._clock.now() >= cred.not_after:
            raise AegisError(
                "the agent certificate expired before it could be renewed", code="cert_expired"
            )
        return cred

    def client_context(self) -> ssl.SSLContext:
        """The context for new outbound connections (the newest certificate)."""
        return self.current.client_context

    def _outbound(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        return ctx if self._verify_server is None else check_server(ctx, self._verify_server)

    def pinned_client_context(self, spiffe_id: str) -> ssl.SSLContext:
        """A context for new outbound connections (the newest certificate) that accepts only a
        server whose certificate names ``spiffe_id`` (:func:`aegis.pki.pinning.pin_server_spiffe_id`);
        built once per certificate and ID."""
        cred = self.current
        ctx = cred.pinned.get(spiffe_id)
        if ctx is None:
            base = client_context(cred.chain_pem(), cred.key, cred.trust_pem)
            ctx = pin_server_spiffe_id(base, spiffe_id, also=self._verify_server)
            cred.pinned[spiffe_id] = ctx
        return ctx

    def server_context(self) -> ssl.SSLContext:
        ctx = self.current.server_context
        if ctx is None:
            raise AegisError("this manager was not built with serving=True", code="cert_required")
        return ctx

    async def obtain(self) -> Credential:
        """Enrol or renew now: new key, CSR, sign, bundle; then swap atomically."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
        )
        body, trust = await self._enrol(
            csr.public_bytes(serialization.Encoding.PEM).decode(), self._lifetime
        )
        cert = x509.load_pem_x509_certificate(body["certificate"].encode())
        if cert.public_key() != key.public_key():
            raise AegisError("the ca returned a certificate for another key", code="cert_invalid")
        chain = tuple(x509.load_pem_x509_certificates(body["chain"].encode()))
        # What the certificate says, read from it: the thumbprint tokens are bound to and the
        # identity it names are never taken from the answer's word for them.
        facts = {"x5t#S256": x5t_s256(cert), "serial": serial_hex(cert)}
        facts["spiffe_id"] = _uri_san(cert)
        if any(body.get(k) != v for k, v in facts.items()):
            raise AegisError(
                "the ca's answer does not describe the certificate it returned",
                code="cert_invalid",
            )
        self._trust = trust
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
        cred = Credential(
            key=key,
            certificate=cert,
            chain=chain,
            spiffe_id=facts["spiffe_id"],
            serial=facts["serial"],
            x5t_s256=facts["x5t#S256"],
            received_at=self._clock.now(),
            not_after=cert.not_valid_after_utc.timestamp(),
            trust_pem=trust,
            client_context=self._outbound(client_context(pem, key, trust)),
            server_context=server_context(
                pem, key, trust, require_client_cert=self._require_client_cert
            )
            if self._serving
            else None,
        )
        self._current = cred  # the swap: one reference assignment
        self.renewals += 1
        log_event(
            "pki.certificate_renewed",
            serial=cred.serial,
            spiffe_id=cred.spiffe_id,
            not_after=cred.not_after,
        )
        for callback in self.on_renew:
            callback(cred)
        return cred

    async def _enrol_http(self, csr: str, lifetime: int | None) -> tuple[dict[str, Any], bytes]:
        assert self._credentials is not None
        form, headers = await self._credentials()
        form = {**form, "csr": csr}
        if lifetime is not None:
            form["lifetime"] = str(lifetime)
        async with httpx.AsyncClient(verify=self._verify, timeout=10.0) as http:
            response = await http.post(f"{self._url}/pki/v1/sign", data=form, headers=headers)
            if response.status_code != 201:
                raise _refused(response)
            bundle = await http.get(f"{self._url}/pki/v1/bundle")
        trust = bundle.content if bundle.status_code == 200 else self._trust
        return response.json(), trust

    async def start(self) -> Credential:
        cred = await self.obtain()
        if self._outbound_epoch is not None:
            self._epoch = await asyncio.to_thread(self._outbound_epoch)
        self._task = asyncio.create_task(self._run())
        return cred

    def refresh_outbound(self) -> None:
        """New outbound context objects for the current certificate: connections pooled under
        the old ones are not reused (a pool is keyed by its context), new ones are checked."""
        cred = self._current
        if cred is None:
            return
        fresh = self._outbound(client_context(cred.chain_pem(), cred.key, cred.trust_pem))
        self._current = dataclasses.replace(cred, client_context=fresh, pinned={})

    async def _recheck_outbound(self) -> None:
        if self._outbound_epoch is None:
            return
        try:
            epoch = await asyncio.to_thread(self._outbound_epoch)
        except Exception as exc:
            # Whether anything was revoked cannot be told: pooled connections are not reused
            # meanwhile, and each new one is checked again (fails closed likewise).
            log_event("pki.revocation_check_failed", level=logging.WARNING,
                      error=type(exc).__name__)  # fmt: skip
            self._epoch = None
            self.refresh_outbound()
            return
        if epoch != self._epoch:
            self._epoch = epoch
            self.refresh_outbound()
            log_event("pki.outbound_connections_renewed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            cred = self._current
            assert cred is not None
            wait = cred.renew_at - self._clock.now()
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                await self._recheck_outbound()
                continue
            try:
                await self.obtain()
            except Exception as exc:  # keep renewing, and keep the revocation checks running
                remaining = cred.not_after - self._clock.now()
                log_event("pki.renewal_failed", error=type(exc).__name__, remaining=remaining)
                await asyncio.sleep(max(0.2, min(5.0, remaining / 10)))
                await self._recheck_outbound()  # revocations still count while renewal fails


_LOOPBACK: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def _refuse_cleartext(url: str) -> None:
    """Enrolment sends the client's credentials and receives the trust bundle the agent trusts
    from then on: over ``https`` only, or to this host's loopback (the SDK's rule)."""
    parts = httpx.URL(url)
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.host in _LOOPBACK):
        raise ValueError(
            f"{parts.scheme}://{parts.host}: enrolment credentials are sent over https only (or "
            "to loopback); use an https URL"
        )


def _uri_san(cert: x509.Certificate) -> str:
    """The one URI SAN (the SPIFFE ID) of an issued certificate, or "" when it has not one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""
