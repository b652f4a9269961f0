"""Agent certificate issuance and revocation (RFC 5280 profile, X509-SVID identities), free of HTTP.

* ``sign``: a CSR from an agent that proves who it is with its OAuth client credentials (any method
  :class:`~aegis.oauth.client_auth.ClientAuthenticator` accepts) or with a one-time bootstrap token
  for its first enrolment. The CSR is checked before anything is spent or written; the identity in
  the certificate comes from the registry, never from the CSR.
* Leaving ``active`` (suspend, quarantine, retire) revokes every live certificate of the agent at
  once (:meth:`PkiService.on_agent_status`, a registry status listener), and a tenant leaving
  ``active`` revokes those of all its agents (:meth:`PkiService.on_tenant_status`); the peer
  validator also refuses certificates of inactive agents and tenants, so revocation never waits
  for a CRL to propagate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from aegis.clock import Clock
from aegis.config import AegisConfig, PkiSettings
from aegis.crypto.keys import jwk_thumbprint
from aegis.errors import AegisError, ClientAuthError, Conflict, InvalidRequest, NotFound
from aegis.oauth.client_auth import ClientAuthenticator
from aegis.pki.ca import CaFiles, CertificateAuthority
from aegis.pki.peer import PeerValidator, TrustBundle
from aegis.pki.profile import (
    AgentKey,
    LeafRequest,
    build_crl,
    build_leaf,
    is_serving,
    parse_csr,
    serial_hex,
    x5t_s256,
)
from aegis.pki.renewal import Enrol
from aegis.pki.spiffe import agent_spiffe_id
from aegis.pki.store import CertificateRecord, CertificateStore
from aegis.registry.cache import RegistryCache
from aegis.registry.secrets import hash_secret, new_secret
from aegis.registry.service import RegistryService
from aegis.telemetry.logging import log_event
from aegis.telemetry.metrics import CERTS_ISSUED
from aegis.tokens.issuer import refuse_unsettled
from aegis.types import Agent, AgentStatus, Client, Tenant, TenantStatus

__all__ = ["BOOTSTRAP_PREFIX", "IssuedCertificate", "PkiService", "is_serving", "open_pki"]

BOOTSTRAP_PREFIX = "aegis_bt_"
#: Agent certificates are backdated this much to absorb small clock differences between hosts.
BACKDATE = 10.0


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    #: The issuing intermediate, to send after the leaf in a TLS handshake.
    chain: tuple[x509.Certificate, ...]
    record: CertificateRecord

    def to_json(self) -> dict[str, Any]:
        pem = serialization.Encoding.PEM
        return {
            "certificate": self.certificate.public_bytes(pem).decode(),
            "chain": "".join(c.public_bytes(pem).decode() for c in self.chain),
            "serial": self.record.serial,
            "spiffe_id": self.record.spiffe_id,
            "not_before": int(self.record.not_before),
            "not_after": int(self.record.not_after),
            "x5t#S256": self.record.x5t_s256,
        }


class PkiService:
    def __init__(
        self,
        ca: CertificateAuthority,
        store: CertificateStore,
        cache: RegistryCache,
        *,
        settings: PkiSettings,
        clock: Clock,
        pepper: bytes,
        authenticator: ClientAuthenticator | None = None,
    ) -> None:
        self.ca = ca
        self.store = store
        self._cache = cache
        self._settings = settings
        self._clock = clock
        self._pepper = pepper
        self._auth = authenticator
        if authenticator is not None:
            authenticator.certificate_now = self.certificate_now
        #: Bundles handed to validators, replaced together when the CA files change.
        self._bundles: list[TrustBundle] = []
        self._checked = clock.monotonic()

    #: How often (seconds) the CA files are checked for a rotation made by another process.
    REFRESH_INTERVAL = 1.0

    def refresh(self) -> None:
        """Pick up ``aegis ca rotate`` from another process, and drop the previous intermediate
        when its overlap ends: sign with the current one, trust exactly the current bundle."""
        now = self._clock.monotonic()
        if now - self._checked < self.REFRESH_INTERVAL:
            return
        self._checked = now
        if self.ca.refresh():
            pem = self.ca.bundle_pem()
            for bundle in self._bundles:
                bundle.replace(pem)
            log_event("pki.ca_reloaded", intermediate=serial_hex(self.ca.current.cert))

    # -- issuance --------------------------------------------------------------------------

    def issue(
        self,
        agent_id: str,
        public_key: AgentKey,
        *,
        lifetime: int | None = None,
        via: str = "operator",
        client_id: str | None = None,
    ) -> IssuedCertificate:
        """Issue a certificate for a registered, active agent of an active tenant. ``client_id``:
        the client whose credentials asked for it, recorded so that disabling that client ends
        the certificate as it ends the client's tokens (a leaked secret's enrolment with it)."""
        self.refresh()
        try:
            agent = self._cache.agent(agent_id)
        except NotFound:
            raise ClientAuthError(f"agent {agent_id} is not registered") from None
        if agent.status is not AgentStatus.ACTIVE:
            raise Conflict(
                f"agent {agent_id} is {agent.status.value}; certificates need an active agent"
            )
        if self._cache.tenant(agent.tenant_id).status is not TenantStatus.ACTIVE:
            raise Conflict(f"tenant {agent.tenant_id} is suspended")
        s = self._settings
        wanted = s.leaf_default_lifetime if lifetime is None else lifetime
        if wanted <= 0:
            raise InvalidRequest("lifetime must be a positive number of seconds")
        now = self._clock.now()
        # A certificate issued before the agent's (or enrolling client's) mark is refused for
        # it: while a mark lies ahead (a key removal sets it a cache lifetime ahead), none is.
        marks = [agent.tokens_not_before]
        if client_id is not None:
            marks.append(self._cache.client(client_id).tokens_not_before)
        refuse_unsettled(max(marks), now, "a certificate", whole_seconds=False)
        not_after = min(now + min(wanted, s.leaf_max_lifetime), self.ca.not_after_cap())
        if not_after <= now:
            raise AegisError("the issuing ca has expired; rotate it", code="ca_unavailable")
        spiffe_id = agent_spiffe_id(s.trust_domain, agent.tenant_id, agent.env, agent.id)
        issuer = self.ca.current
        req = LeafRequest(
            public_key,
            spiffe_id,
            agent.id,
            agent.tenant_id,
            now - BACKDATE,
            not_after,
            is_serving(agent),
        )
        cert = build_leaf(req, issuer.cert, issuer.key)
        record = CertificateRecord(
            serial=serial_hex(cert),
            agent_id=agent.id,
            tenant_id=agent.tenant_id,
            env=agent.env,
            spiffe_id=spiffe_id,
            issuer_ski=issuer.ski,
            x5t_s256=x5t_s256(cert),
            not_before=cert.not_valid_before_utc.timestamp(),
            not_after=cert.not_valid_after_utc.timestamp(),
            issued_at=now,
            enrolled_by=client_id,
        )
        self.store.record(record)
        # A suspension (of the agent or its tenant) that committed after the checks above, and
        # whose listener ran before this record was written, revoked every certificate of the
        # agent but this one, which the CRL would then never list. Read both again, from the
        # store, now that the record is there: a change committed later finds it and revokes it.
        now_agent = self._cache.agent_from_store(agent.id)
        now_tenant = self._cache.tenant_from_store(agent.tenant_id)
        left = now_agent.status if now_agent.status is not AgentStatus.ACTIVE else (
            now_tenant.status if now_tenant.status is not TenantStatus.ACTIVE else None
        )  # fmt: skip
        if left is not None:
            self.store.revoke_serial(record.serial, left.value)
            raise Conflict(
                f"agent {agent.id} (or its tenant) became {left.value} while its certificate was "
                "issued; the certificate is revoked"
            )
        # Likewise an update that withdrew its serving role or ended its credentials (a key
        # removed), whose listener revoked the agent's certificates before this one was there.
        if (req.server and not is_serving(now_agent)) or (
            now_agent.tokens_not_before > agent.tokens_not_before
        ):
            self.store.revoke_serial(record.serial, "privilege_withdrawn")
            raise Conflict(
                f"agent {agent.id} was changed while its certificate was issued (its serving "
                "role withdrawn or a key removed); the certificate is revoked: enrol again"
            )
        # Likewise a disable of the enrolling client (the answer to a leaked secret), whose
        # listener revokes what the client enrolled: one it ran before this record was written.
        if client_id is not None and not self._cache.client_from_store(client_id).active:
            self.store.revoke_serial(record.serial, "privilege_withdrawn")
            raise Conflict(
                f"client {client_id} was disabled while its certificate was issued; the "
                "certificate is revoked"
            )
        CERTS_ISSUED.labels(auth=via).inc()
        return IssuedCertificate(cert, (issuer.cert,), record)

    async def sign(
        self, form: Mapping[str, str], authorization: str | None, source: str
    ) -> IssuedCertificate:
        """``POST /pki/v1/sign``: check the CSR, authenticate, then issue."""
        key = parse_csr(form.get("csr", ""))
        lifetime = None
        if "lifetime" in form:
            # Checked whole before the bootstrap token is spent: a lifetime of 0 must not burn
            # the single-use token its corrected retry needs. At most 9 digits (the CA caps the
            # lifetime anyway; int() refuses a string of over 4300 with a plain ValueError).
            raw = form["lifetime"]
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or int(raw) <= 0:
                raise InvalidRequest(
                    "lifetime must be a positive whole number of seconds (9 digits at most)"
                )
            lifetime = int(raw)
        if "bootstrap_token" in form:
            if authorization or "client_secret" in form or "client_assertion" in form:
                raise InvalidRequest("use either a bootstrap token or client credentials, not both")
            token = form["bootstrap_token"]
            spent = self.store.consume_bootstrap(hash_secret(self._pepper, token))
            if spent is None:
                raise ClientAuthError(
                    "bootstrap token is unknown, used or expired; ask for a new one"
                )
            agent_id, created_at = spent
            # Like the agent's tokens: a suspension or quarantine since the bootstrap token was
            # made ends it, even once the agent is active again.
            if created_at < self._cache.agent(agent_id).tokens_not_before:
                raise ClientAuthError(
                    "bootstrap token was made before the agent's credentials were last ended; "
                    "ask for a new one"
                )
            return self.issue(agent_id, key, lifetime=lifetime, via="bootstrap_token")
        if self._auth is None:
            raise ClientAuthError("client authentication is not configured on this server")
        fields = {k: v for k, v in form.items() if k not in ("csr", "lifetime")}
        auth = await self._auth.authenticate(fields, authorization, source, consume=False)
        issued = self.issue(
            auth.client.agent_id, key, lifetime=lifetime, via=auth.method.value,
            client_id=auth.client.client_id,
        )  # fmt: skip
        await self._auth.consume(auth)
        return issued

    def local_enrolment(self, agent_id: str) -> Enrol:
        """Enrolment for a process that holds this CA (the gateway's own certificate): the same
        checks and records as ``POST /pki/v1/sign``, without HTTP or client credentials."""

        async def enrol(csr: str, lifetime: int | None) -> tuple[dict[str, Any], bytes]:
            issued = self.issue(agent_id, parse_csr(csr), lifetime=lifetime, via="local")
            return issued.to_json(), self.ca.bundle_pem()

        return enrol

    def new_bootstrap_token(self, agent_id: str, *, lifetime: float | None = None) -> str:
        """A single-use enrolment token for ``agent_id``; shown once, stored as a keyed hash."""
        agent = self._cache.agent(agent_id)
        if agent.status is not AgentStatus.ACTIVE:
            raise Conflict(f"agent {agent_id} is {agent.status.value}")
        # One made before the agent's mark is refused at enrolment (and spent): none is made
        # while the mark lies ahead.
        refuse_unsettled(
            agent.tokens_not_before, self._clock.now(), "a bootstrap token", whole_seconds=False
        )
        token = new_secret(BOOTSTRAP_PREFIX)
        ttl = self._settings.bootstrap_token_lifetime if lifetime is None else lifetime
        self.store.add_bootstrap(
            hash_secret(self._pepper, token), agent_id, self._clock.now() + ttl
        )
        return token

    def validator(
        self, *, eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH
    ) -> PeerValidator:
        """A peer validator trusting this CA's current bundle (``serverAuth`` for upstreams)."""
        bundle = TrustBundle(self.ca.bundle_pem())
        self._bundles.append(bundle)
        return PeerValidator(
            bundle,
            self.store,
            self._cache,
            trust_domain=self._settings.trust_domain,
            clock=self._clock,
            eku=eku,
            refresh=self.refresh,
        )

    # -- revocation ------------------------------------------------------------------------

    def listen(self, registry: RegistryService) -> None:
        """Register this CA's status listeners on ``registry``, so that an agent or a tenant
        leaving ``active`` revokes its certificates at once."""
        registry.status_listeners.append(self.on_agent_status)
        registry.tenant_listeners.append(self.on_tenant_status)
        registry.client_listeners.append(self.on_client_status)
        registry.update_listeners.append(self.on_agent_update)

    def on_agent_status(self, agent: Agent) -> None:
        """Registry status listener: leaving ``active`` revokes the agent's live certificates."""
        if agent.status is not AgentStatus.ACTIVE:
            self.store.revoke_agent(agent.id, agent.status.value)

    def on_tenant_status(self, tenant: Tenant) -> None:
        """Registry tenant listener: a tenant leaving ``active`` revokes the live certificates of
        every agent it holds, as if each agent had left ``active``. Its tokens end with the
        status change; its certificates must too, or mTLS peers that check only the chain and
        the CRL (nginx, Envoy) and connections pooled to its tools would outlive it."""
        if tenant.status is not TenantStatus.ACTIVE:
            self.store.revoke_tenant(tenant.id, tenant.status.value)

    def certificate_now(self, serial: str, agent: Agent) -> None:
        """A client certificate as the store holds it now (the peer validator reads cached
        records): on record, not revoked, issued at or after ``agent``'s mark (``agent`` as
        read now), and its enrolling client still enabled and not disabled since. Raises
        ``ClientAuthError``."""
        record = self.store.get(serial)
        if record is None or record.revoked_at is not None:
            raise ClientAuthError("the client certificate is revoked")
        if record.issued_at < agent.tokens_not_before:
            raise ClientAuthError("the client certificate was issued before the agent's "
                                  "credentials were last ended")  # fmt: skip
        if record.enrolled_by is not None:
            try:
                client = self._cache.client_from_store(record.enrolled_by)
            except NotFound:
                raise ClientAuthError("the client that enrolled the certificate is gone") from None
            if not client.active or record.issued_at < client.tokens_not_before:
                raise ClientAuthError("the client that enrolled the certificate was disabled")

    def on_agent_update(self, before: Agent, after: Agent) -> None:
        """Registry update listener: a change that ends what the agent holds revokes its live
        certificates in the store, so the CRL lists them and the revocation mark moves (gateway
        connections pooled to the agent renew, and their new handshakes are refused).

        * Its serving role withdrawn (role ``server`` or attribute ``serving: true`` removed):
          its certificates carry serverAuth, and peers that check only the chain and the CRL
          (nginx, Envoy, the SDK's server checks) would go on taking it for a server.
        * One of its keys removed (its ``tokens_not_before`` moves): which key enrolled a
          certificate is not recorded, so every earlier certificate ends, as its tokens do
          (the validator already refuses them: issued before ``tokens_not_before``).

        The agent enrols again for a certificate of its present registration."""
        withdrawn = is_serving(before) and not is_serving(after)
        kept = {jwk_thumbprint(j) for j in after.jwks}
        if withdrawn or any(jwk_thumbprint(j) not in kept for j in before.jwks):
            self.store.revoke_agent(after.id, "privilege_withdrawn")

    def on_client_status(self, client: Client) -> None:
        """Registry client listener: a disabled client's credentials enrolled nothing that
        lives on. Disabling is the answer to a leaked secret; the certificates enrolled with it
        are revoked in the store and so listed in the CRL, for the peers that check only the
        chain and the CRL (nginx, Envoy, the SDK's server checks) and for connections pooled to
        a tool serving with one."""
        if not client.active:
            self.store.revoke_enrolled_by(client.client_id, "privilege_withdrawn")

    def crl_der(self) -> bytes:
        """The current intermediate's CRL, DER (RFC 5280 §5), short ``nextUpdate``."""
        self.refresh()
        return self._crl(0).public_bytes(serialization.Encoding.DER)

    def crl_pem(self) -> bytes:
        """Every trusted intermediate's CRL, PEM, concatenated (for nginx ``ssl_crl``)."""
        self.refresh()
        pem = serialization.Encoding.PEM
        return b"".join(self._crl(i).public_bytes(pem) for i in range(len(self.ca.intermediates())))

    def bundle_pem(self) -> bytes:
        """The trust bundle as of now (root, then every intermediate still trusted)."""
        self.refresh()
        return self.ca.bundle_pem()

    def _crl(self, index: int) -> x509.CertificateRevocationList:
        issuer = self.ca.intermediates()[index]
        revoked = [
            (r.serial, r.revoked_at or 0.0, r.revocation_reason)
            for r in self.store.revoked_by(issuer.ski)
        ]
        lifetime = float(self._settings.crl_lifetime)
        return build_crl(issuer.cert, issuer.key, revoked, now=self._clock.now(), lifetime=lifetime)


def open_pki(
    config: AegisConfig,
    *,
    clock: Clock,
    cache: RegistryCache,
    registry: RegistryService,
    authenticator: ClientAuthenticator | None,
) -> PkiService | None:
    """The PKI service if ``aegis ca init`` has created a CA, else None (the routes stay off).

    Registers the revocation listener on ``registry`` so leaving ``active`` revokes at once.
    """
    files = CaFiles.from_config(config)
    if not files.cert.exists():
        return None
    ca = CertificateAuthority(files, config.kek(), clock, config.pki.trust_domain)
    store = CertificateStore(
        config.database_url(), clock=clock, ttl=config.stores.registry_cache_ttl
    )
    service = PkiService(
        ca,
        store,
        cache,
        settings=config.pki,
        clock=clock,
        pepper=config.pepper(),
        authenticator=authenticator,
    )
    service.listen(registry)
    return service
