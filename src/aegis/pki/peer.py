"""Peer certificate validation: RFC 5280 path validation plus the X509-SVID and Aegis rules.

One function decides who is on the other end of a connection, whatever brought the certificate
(a TLS handshake here, or a trusted proxy's header). In order, each failure with its stable code:

1. the DER parses                                           ``cert_invalid``
2. now within notBefore..notAfter (the injected clock)      ``cert_not_yet_valid`` / ``cert_expired``
3. X509-SVID leaf: one SPIFFE URI SAN in our trust domain,  ``spiffe_id_invalid``
   not a CA, digitalSignature, clientAuth                   ``cert_wrong_usage``
4. a valid path to an Aegis root (cryptography's verifier)  ``cert_untrusted``
5. issued here: serial known with this exact thumbprint     ``cert_untrusted``
6. not revoked                                              ``cert_revoked``
7. the registry agent exists, is active, its tenant is active,
   and its tenant and environment are the ones the SPIFFE
   ID names; the client that enrolled it (if any) is enabled
   and was not disabled since; for serverAuth, the agent is
   still registered as serving                              ``cert_agent_mismatch`` / ``cert_revoked``
                                                            / ``cert_wrong_usage``

Every error carries the serial and SPIFFE ID once they are known.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from aegis.clock import Clock
from aegis.errors import AegisError, NotFound
from aegis.pki.profile import is_serving, serial_hex, x5t_s256
from aegis.pki.spiffe import check_leaf_svid
from aegis.pki.store import CertificateRecord, CertificateStore
from aegis.registry.cache import RegistryCache
from aegis.types import Agent, AgentStatus, Client, Tenant, TenantStatus

__all__ = ["PeerIdentity", "PeerValidator", "TrustBundle"]

#: Certificates remembered as having passed checks 1-4 (the cache is cleared when full).
MAX_PASSED_CERTIFICATES: Final = 4096


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end: set from a verified peer certificate, never from client input."""

    spiffe_id: str
    agent_id: str
    tenant: str
    env: str
    serial: str
    #: RFC 8705 §3.1 thumbprint of the DER certificate, for ``cnf.x5t#S256``.
    x5t_s256: str
    not_after: float
    #: ``tls`` (this process terminated TLS) or ``forwarded`` (a trusted proxy did).
    source: str = "tls"
    der: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class _Seen:
    """What checks 1-4 established about a certificate."""

    serial: str
    spiffe_id: str
    agent: str
    tenant: str
    env: str
    thumbprint: str
    not_after: float


class TrustBundle:
    """Roots (self-signed) and intermediates, replaceable atomically during a CA rotation."""

    def __init__(self, pem: bytes) -> None:
        self._lock = threading.Lock()
        self.replace(pem)

    def replace(self, pem: bytes) -> None:
        try:
            certs = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise AegisError(
                "trust bundle is not pem certificates", code="config_invalid"
            ) from None
        roots = [c for c in certs if c.subject == c.issuer]
        if not roots:
            raise AegisError("trust bundle has no root certificate", code="config_invalid")
        store = verification.Store(roots)
        with self._lock:
            self._state = (store, [c for c in certs if c.subject != c.issuer], pem)

    def current(self) -> tuple[verification.Store, list[x509.Certificate]]:
        store, intermediates, _ = self._state
        return store, intermediates

    @property
    def pem(self) -> bytes:
        return self._state[2]


def _fail(
    message: str, code: str, serial: str | None = None, spiffe_id: str | None = None
) -> AegisError:
    details = {k: v for k, v in (("serial", serial), ("spiffe_id", spiffe_id)) if v}
    return AegisError(message, code=code, **details)


#: What cryptography raises on a certificate it cannot read: malformed DER, a repeated extension,
#: a general name of a type it does not support (x400Address, EDIPartyName).
_UNPARSABLE: Final = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def _issued_by_one_of(cert: x509.Certificate, issuers: list[x509.Certificate]) -> bool:
    """Whether one of ``issuers`` (the Aegis intermediates) signed ``cert``: the identity it
    names was then written by the CA, even where the certificate is refused for another reason
    (expired, a CA flag, a wrong usage)."""
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return True
    return False


class PeerValidator:
    def __init__(
        self,
        bundle: TrustBundle,
        store: CertificateStore,
        cache: RegistryCache,
        *,
        trust_domain: str,
        clock: Clock,
        eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        refresh: Callable[[], None] | None = None,
    ) -> None:
        self.bundle = bundle
        #: Called before each validation; cheap (PkiService rate-limits its file checks).
        self._refresh = refresh
        self._store = store
        self._cache = cache
        self._td = trust_domain
        self._clock = clock
        self._eku = eku
        #: Certificates that passed checks 1-4, by their exact DER: what those checks
        #: established, the trust store the path was built to, and the time window in which
        #: the answer holds (the latest notBefore and the earliest notAfter on the verified
        #: path, leaf included). Checks 1-4 are a function of the DER, the trust store, the
        #: validator's settings and the time, so inside that window and with the same store the
        #: answer is the same; path validation and parsing cost a few hundred microseconds per
        #: call otherwise, for every request on an mTLS route or with a forwarded certificate.
        #: Checks 5-7 (issued here, not revoked, the agent active) run on every call. A bundle
        #: replaced since (CA rotation) or a time outside the window is a full validation, with
        #: its own errors. Only passes are kept, so only certificates that chain to an Aegis
        #: root can fill it, and it is bounded.
        self._passed: dict[bytes, tuple[_Seen, verification.Store, float, float]] = {}

    def validate(self, der: bytes, *, source: str = "tls") -> PeerIdentity:
        seen = self._inspect(der)
        record = self._check_record(seen, self._store.lookup(seen.serial))
        try:
            agent = self._cache.agent(seen.agent)
            tenant = self._cache.tenant(agent.tenant_id)
        except NotFound:
            raise self._unregistered(seen) from None
        if record.enrolled_by is not None:
            try:
                client: Client | None = self._cache.client(record.enrolled_by)
            except NotFound:
                client = None
            self._enrolled(seen, record, client)
        return self._conclude(seen, record, agent, tenant, source, der)

    async def validate_async(self, der: bytes, *, source: str = "tls") -> PeerIdentity:
        """:meth:`validate`, with the certificate record and the agent, when not cached, read
        off the event loop (the same checks in the same order)."""
        seen = self._inspect(der)
        record = self._check_record(seen, await self._store.lookup_async(seen.serial))
        try:
            agent = await self._cache.agent_async(seen.agent)
            tenant = await self._cache.tenant_async(agent.tenant_id)
        except NotFound:
            raise self._unregistered(seen) from None
        if record.enrolled_by is not None:
            try:
                client: Client | None = await self._cache.client_async(record.enrolled_by)
            except NotFound:
                client = None
            self._enrolled(seen, record, client)
        return self._conclude(seen, record, agent, tenant, source, der)

    def _inspect(self, der: bytes) -> _Seen:
        """Checks 1-4, which need no stored record."""
        if self._refresh is not None:
            self._refresh()
        store, intermediates = self.bundle.current()
        hit = self._passed.get(der) if type(der) is bytes else None
        if hit is not None:
            seen, trusted, start, end = hit
            if trusted is store and start <= self._clock.now() <= end:
                return seen
        sid: str | None = None
        try:
            cert = x509.load_der_x509_certificate(der)
            serial = serial_hex(cert)
            _ = cert.extensions  # parse every extension now: a malformed one is cert_invalid
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                uris = san.get_values_for_type(x509.UniformResourceIdentifier)
                sid = uris[0] if len(uris) == 1 else None
            except x509.ExtensionNotFound:
                pass
        except _UNPARSABLE:
            raise _fail("peer certificate is not valid der", "cert_invalid") from None

        # Until a signature vouches for it, nothing the certificate says (its serial, its SPIFFE
        # ID) is reported as who presented it: anyone could make a refusal read as another
        # agent's. One an Aegis intermediate signed is the CA's word, whatever else is wrong.
        # Asked only on a refusal: a certificate that passes pays no second signature check.
        def shown() -> tuple[str, str | None]:
            return (serial, sid) if _issued_by_one_of(cert, intermediates) else ("", None)

        now = self._clock.now()
        if now < cert.not_valid_before_utc.timestamp():
            raise _fail(
                "peer certificate is not valid yet; check the clocks",
                "cert_not_yet_valid",
                *shown(),
            )
        if now > cert.not_valid_after_utc.timestamp():
            raise _fail("peer certificate has expired; renew it", "cert_expired", *shown())
        try:
            ident = check_leaf_svid(cert, self._td, eku=self._eku)
        except AegisError as exc:
            raise _fail(exc.message, exc.code, *shown()) from None
        except _UNPARSABLE:
            raise _fail("peer certificate is not valid der", "cert_invalid", shown()[0]) from None
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(datetime.fromtimestamp(now, tz=UTC))
            .max_chain_depth(2)
            .build_client_verifier()
        )
        try:
            path = verifier.verify(cert, intermediates).chain
        except (verification.VerificationError, *_UNPARSABLE) as exc:
            vouched = _issued_by_one_of(cert, intermediates)
            raise _fail(
                f"peer certificate does not chain to an aegis root: {str(exc)[:200]}",
                "cert_untrusted",
                serial if vouched else "",
                str(ident) if vouched else None,
            ) from None
        sid = str(ident)
        seen = _Seen(
            serial, sid, ident.agent, ident.tenant, ident.env, x5t_s256(der),
            cert.not_valid_after_utc.timestamp(),
        )  # fmt: skip
        if type(der) is bytes:
            start = max(c.not_valid_before_utc.timestamp() for c in (cert, *path))
            end = min(c.not_valid_after_utc.timestamp() for c in (cert, *path))
            if len(self._passed) >= MAX_PASSED_CERTIFICATES:
                self._passed.clear()
            self._passed[der] = (seen, store, start, end)
        return seen

    @staticmethod
    def _check_record(seen: _Seen, record: CertificateRecord | None) -> CertificateRecord:
        """Checks 5-6: issued here with this exact thumbprint, and not revoked."""
        serial, sid = seen.serial, seen.spiffe_id
        if record is None or record.x5t_s256 != seen.thumbprint or record.spiffe_id != sid:
            raise _fail("peer certificate was not issued by this ca", "cert_untrusted", serial, sid)
        if record.revoked_at is not None:
            raise _fail("peer certificate is revoked; enrol again", "cert_revoked", serial, sid)
        return record

    @staticmethod
    def _unregistered(seen: _Seen) -> AegisError:
        return _fail(
            "the agent this certificate names is not registered",
            "cert_agent_mismatch",
            seen.serial,
            seen.spiffe_id,
        )

    def _conclude(
        self,
        seen: _Seen,
        record: CertificateRecord,
        agent: Agent,
        tenant: Tenant,
        source: str,
        der: bytes,
    ) -> PeerIdentity:
        """Check 7, on the agent's and its tenant's registry records."""
        serial, sid = seen.serial, seen.spiffe_id
        if (agent.tenant_id, agent.env) != (seen.tenant, seen.env):
            raise _fail(
                "the certificate's spiffe id names another tenant or environment than the agent's",
                "cert_agent_mismatch",
                serial,
                sid,
            )
        if agent.status is not AgentStatus.ACTIVE:
            raise _fail(f"agent {agent.id} is {agent.status.value}", "cert_revoked", serial, sid)
        if self._eku == ExtendedKeyUsageOID.SERVER_AUTH and not is_serving(agent):
            # The usage is the certificate's, the role the registry's: an agent no longer
            # registered as serving does not pass as a server on a certificate it got before.
            raise _fail(
                f"agent {agent.id} is no longer registered as serving (role server or attribute "
                "serving: true)",
                "cert_wrong_usage",
                serial,
                sid,
            )
        # Suspending a tenant ends its tokens and its new certificates; its certificates already
        # out must stop passing as well.
        if tenant.status is not TenantStatus.ACTIVE:
            raise _fail(f"tenant {tenant.id} is {tenant.status.value}", "cert_revoked", serial, sid)
        # As for tokens (iat before the mark): what ended the agent's credentials (a suspension,
        # quarantine, the tenant's suspension) ends certificates issued before it, even once the
        # agent is active again.
        if record.issued_at < agent.tokens_not_before:
            raise _fail(
                "peer certificate was issued before the agent's credentials were last ended; "
                "enrol again",
                "cert_revoked",
                serial,
                sid,
            )
        return PeerIdentity(
            sid, seen.agent, seen.tenant, seen.env, serial, seen.thumbprint, seen.not_after,
            source, der,
        )  # fmt: skip

    @staticmethod
    def _enrolled(seen: _Seen, record: CertificateRecord, client: Client | None) -> None:
        """Check 7, on the client that enrolled the certificate (``client`` None: it no longer
        exists): disabling a client (a leaked secret's answer) ends the certificates enrolled
        with its credentials, as it ends its tokens, even once it is enabled again."""
        if client is None or not client.active or record.issued_at < client.tokens_not_before:
            raise _fail(
                f"peer certificate was enrolled by client {record.enrolled_by}, since disabled "
                "or removed; enrol again",
                "cert_revoked",
                seen.serial,
                seen.spiffe_id,
            )
