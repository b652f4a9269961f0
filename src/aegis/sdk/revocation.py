"""Revoked server certificates, from the Aegis CA's CRLs (RFC 5280 §5), for an agent's client.

An agent's TLS context judges a server by its chain (the Aegis bundle) and, pinned, by its SPIFFE
ID; alone, it accepts a server certificate revoked with ``aegis ca revoke`` until it expires.
:class:`ServerRevocations` closes that gap: it reads every trusted intermediate's CRL from the
control plane (``GET /pki/v1/crl.pem``), keeps each one only when an intermediate of the agent's
own bundle signed it, and refuses in the handshake, before any application data (credentials
included) is sent:

* a server certificate its issuer's CRL lists;
* failing closed, any server certificate while it holds no current CRL of the certificate's
  issuer (none read yet, or past the CRL's ``nextUpdate``: the CA signs CRLs valid for
  ``pki.crl_lifetime``, 300 s by default).

Pass it as ``revocations=`` to :class:`~aegis.sdk.Certificate` or
:class:`~aegis.sdk.RenewingCertificate`, and keep it current: ``start()`` refreshes it on a
daemon thread every ``every`` seconds (and ``stop()`` ends that), or call ``refresh()`` yourself.
A refresh that fails keeps the CRLs read before; their ``nextUpdate`` bounds how long. The CRLs
are signed, so the connection they are read over needs no pin: it verifies the control plane's
chain against the bundle, and does not itself consult the CRLs (which it is reading).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from aegis.pki.pinning import check_server, pin_server_spiffe_ids
from aegis.sdk.auth import refuse_cleartext

__all__ = ["InvalidCrl", "ServerRevocations", "guard_server"]

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
#: Bounds on what is read from the control plane: a CRL of many thousand entries fits.
_MAX_CRL_BYTES = 4 * 1024 * 1024
_MAX_CRLS = 8


class InvalidCrl(ValueError):
    """A CRL document that is not one the agent's bundle vouches for (nothing is installed)."""


@dataclass(frozen=True, slots=True)
class _Crl:
    revoked: frozenset[int]
    this_update: float
    next_update: float


class ServerRevocations:
    """The revocations of the Aegis CA for the servers an agent talks to (see the module)."""

    def __init__(
        self,
        control_plane: str,
        bundle: bytes | Callable[[], bytes],
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
        server_id: str | None = None,
    ) -> None:
        refuse_cleartext(control_plane)
        self._url = control_plane.rstrip("/") + "/pki/v1/crl.pem"
        self._bundle = bundle if callable(bundle) else (lambda: bundle)
        self._every, self._clock, self._timeout = every, clock, timeout
        #: The control plane's SPIFFE ID, pinned on the connection the CRLs are read over.
        self._server_id = server_id
        #: Per issuing key (its key identifier, RFC 5280 §4.2.1.2), the newest CRL it signed
        #: that was read. By key, not by name: the intermediates of a rotation overlap share
        #: their subject, and one's CRL must never vouch for the other's certificates.
        self._crls: dict[bytes, _Crl] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The read under way (or one that outlived its deadline), see :meth:`refresh`.
        self._fetching: threading.Thread | None = None
        #: Why the latest refresh failed (None: it did not), for the refusal message.
        self.last_error: str | None = None

    # -- reading the CRLs ---------------------------------------------------------------------

    def refresh(self) -> None:
        """Read the CRLs from the control plane and install those the bundle vouches for;
        raises (``httpx.HTTPError``, :class:`InvalidCrl`, ``TimeoutError``) and keeps the
        previous ones otherwise.

        The whole read, connection and headers included, is bounded by ``timeout``: httpx
        bounds each network read only, and a server sending a byte at a time would hold a
        refresh for days. The read runs on a thread of its own, waited for until the deadline;
        one that outlives it is left to end by itself, and no other is started meanwhile."""
        try:
            if self._fetching is not None and self._fetching.is_alive():
                raise TimeoutError(f"an earlier read of {self._url} has still not ended")
            bundle = self._bundle()
            got: list[bytes | BaseException] = []
            self._fetching = threading.Thread(
                target=self._fetch, args=(bundle, got), name="aegis-crl-fetch", daemon=True
            )
            self._fetching.start()
            self._fetching.join(self._timeout)
            if not got:
                raise TimeoutError(f"the CRLs were not read within {self._timeout:g} s")
            if isinstance(got[0], BaseException):
                raise got[0]
            self.load(got[0], bundle)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        self.last_error = None

    def _fetch(self, bundle: bytes, got: list[bytes | BaseException]) -> None:
        """The CRLs' bytes as sent (a content coding is refused, so that a small answer cannot
        inflate past the cap), or why not, appended to ``got``."""
        try:
            ctx = ssl.create_default_context(cadata=bundle.decode("ascii"))
            ctx.check_hostname = False  # Aegis certificates name SPIFFE IDs, not hosts
            if self._server_id is not None:
                pin_server_spiffe_ids(ctx, (self._server_id,))
            data = bytearray()
            with (
                httpx.Client(verify=ctx, timeout=self._timeout) as http,
                http.stream("GET", self._url, headers={"Accept-Encoding": "identity"}) as answer,
            ):
                answer.raise_for_status()
                coding = answer.headers.get("content-encoding", "identity").strip().lower()
                if coding != "identity":
                    raise InvalidCrl(f"the CRLs came content-coded ({coding[:32]})")
                for chunk in answer.iter_raw():
                    data += chunk
                    if len(data) > _MAX_CRL_BYTES:
                        raise InvalidCrl(f"the CRLs at {self._url} exceed {_MAX_CRL_BYTES} bytes")
            got.append(bytes(data))
        except BaseException as exc:  # handed to refresh(), which raises it
            got.append(exc)

    def load(self, pem: bytes, bundle: bytes | None = None) -> None:
        """Install the CRLs of ``pem`` (one or more, PEM): each must be signed by an
        intermediate of ``bundle`` (default: the bundle given), be current, and be no older than
        the one already held for its issuer. Any failure installs none of them."""
        cas = _cas(bundle if bundle is not None else self._bundle())
        blocks = _PEM_CRL.findall(pem)
        if not blocks or len(blocks) > _MAX_CRLS:
            raise InvalidCrl(f"expected 1 to {_MAX_CRLS} PEM CRLs, found {len(blocks)}")
        now = self._clock()
        read: dict[bytes, _Crl] = {}
        for block in blocks:
            try:
                crl = x509.load_pem_x509_crl(block)
            except ValueError as exc:
                raise InvalidCrl(f"a CRL does not parse: {exc}") from None
            name = crl.issuer.public_bytes()
            signer = next(
                (key_id for subject, key_id, ca in cas if subject == name and _signed_by(crl, ca)),
                None,
            )
            if signer is None:
                raise InvalidCrl("a CRL is not signed by an intermediate of the trust bundle")
            this_update = crl.last_update_utc.timestamp()
            next_update = crl.next_update_utc
            if next_update is None or next_update.timestamp() <= now:
                raise InvalidCrl("a CRL is past its nextUpdate (or has none)")
            revoked = frozenset(r.serial_number for r in crl)
            read[signer] = _Crl(revoked, this_update, next_update.timestamp())
        with self._lock:
            for name, entry in read.items():
                held = self._crls.get(name)
                # An older CRL (a replayed answer) never replaces a newer one: it could omit a
                # revocation made since.
                if held is None or entry.this_update >= held.this_update:
                    self._crls[name] = entry

    # -- checking a server --------------------------------------------------------------------

    def check(self, der: bytes | None) -> None:
        """Refuse (``ssl.SSLCertVerificationError``) the server's DER leaf if its issuer's CRL
        lists it, or if no current CRL of its issuer is held (fail closed)."""
        if not der:
            raise ssl.SSLCertVerificationError("the server presented no certificate")
        leaf = x509.load_der_x509_certificate(der)
        issuer_key = _authority_key_id(leaf)
        with self._lock:
            crl = self._crls.get(issuer_key) if issuer_key is not None else None
        if crl is None or crl.next_update <= self._clock():
            why = f" (last refresh: {self.last_error})" if self.last_error else ""
            raise ssl.SSLCertVerificationError(
                "no current CRL of the server certificate's issuer is held, so it cannot be "
                f"told unrevoked; refresh the revocations from {self._url}{why}"
            )
        if leaf.serial_number in crl.revoked:
            raise ssl.SSLCertVerificationError(
                f"the server's certificate (serial {leaf.serial_number:x}) is revoked"
            )

    # -- keeping it current -------------------------------------------------------------------

    def start(self) -> None:
        """Refresh now (errors are raised), then every ``every`` seconds on a daemon thread
        (errors are kept in ``last_error``; the CRLs already held stay until their nextUpdate)."""
        self.refresh()
        if self._thread is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(self._every):
                # A failure is kept in last_error; the next round tries again.
                with contextlib.suppress(Exception):
                    self.refresh()

        self._thread = threading.Thread(target=run, name="aegis-crl", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=self._timeout + 1)


def guard_server(
    ctx: ssl.SSLContext, servers: tuple[str, ...], revocations: ServerRevocations | None
) -> ssl.SSLContext:
    """``ctx`` refusing, in the handshake, a server not named by ``servers`` (when given) and a
    server certificate ``revocations`` does not hold unrevoked (when given)."""
    also = revocations.check if revocations is not None else None
    if servers:
        return pin_server_spiffe_ids(ctx, servers, also=also)
    return check_server(ctx, also) if also is not None else ctx


def _cas(bundle: bytes) -> list[tuple[bytes, bytes, x509.Certificate]]:
    """The CA certificates of the bundle: (subject, key identifier, certificate) each. Several
    may share a subject (the intermediates of a rotation overlap)."""
    return [
        (c.subject.public_bytes(), _key_id(c), c)
        for c in x509.load_pem_x509_certificates(bundle)
        if _is_ca(c)
    ]


def _key_id(cert: x509.Certificate) -> bytes:
    """The certificate's subject key identifier, or the RFC 5280 method 1 one of its key."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        key = cert.public_key()
        return x509.SubjectKeyIdentifier.from_public_key(key).digest


def _authority_key_id(leaf: x509.Certificate) -> bytes | None:
    """The key identifier of the leaf's issuer (its authority key identifier), if it names one:
    Aegis leaves do; one that does not cannot be matched to a CRL, and is refused."""
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return False
    return crl.is_signature_valid(key)
