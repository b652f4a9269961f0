"""The internal certificate authority: an offline-capable root and issuing intermediates (RFC 5280).

Layout of ``pki.ca_dir`` (every key PKCS#8, encrypted under a passphrase derived from the KEK)::

    root.pem  root.key.pem                      the trust anchor; move root.key.pem offline after init
    intermediate.pem  intermediate.key.pem      signs agent certificates and CRLs
    previous.pem  previous.key.pem  rotation.json   the intermediate before the last rotation, kept
                                                in the bundle and its CRL signed until its leaves expire

Keys are ECDSA P-256 with SHA-256: what every TLS stack, nginx and Envoy accept for client chains.
Only :meth:`init` and :meth:`rotate_intermediate` need the root key.

A running process sees a rotation made elsewhere (``aegis ca rotate``): :meth:`refresh` reloads the
files when they changed or when the previous intermediate's overlap has ended.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from aegis.clock import Clock
from aegis.config import AegisConfig
from aegis.errors import ConfigError, Conflict

__all__ = ["CaFiles", "CertificateAuthority", "Intermediate", "ca_passphrase"]

_ROOT_DAYS = 3650
_INTERMEDIATE_DAYS = 365


def ca_passphrase(kek: bytes) -> bytes:
    """The CA key passphrase: HKDF-SHA256 of the KEK, so one secret protects every key at rest."""
    okm = HKDF(hashes.SHA256(), 32, salt=None, info=b"aegis pki ca key v1").derive(kek)
    return base64.b64encode(okm)


@dataclass(frozen=True, slots=True)
class CaFiles:
    directory: Path
    root_cert: Path
    root_key: Path
    cert: Path
    key: Path

    @property
    def previous_cert(self) -> Path:
        return self.directory / "previous.pem"

    @property
    def previous_key(self) -> Path:
        return self.directory / "previous.key.pem"

    @property
    def rotation(self) -> Path:
        return self.directory / "rotation.json"

    @classmethod
    def from_config(cls, config: AegisConfig) -> CaFiles:
        p = config.pki
        d = config.path(p.ca_dir)
        return cls(
            d,
            d / p.root_cert_file,
            d / p.root_key_file,
            d / p.intermediate_cert_file,
            d / p.intermediate_key_file,
        )


@dataclass(frozen=True, slots=True)
class Intermediate:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def ski(self) -> str:
        return self.cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest.hex()


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(int(t), tz=UTC)


def _ca_cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Intermediate | None,
    *,
    now: float,
    days: int,
    path_length: int,
    trust_domain: str,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Aegis"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    signer_cert, signer_key = (issuer.cert, issuer.key) if issuer else (None, key)
    not_after = now + days * 86400
    if signer_cert is not None:  # never outlive the issuer (RFC 5280 §6.1.3 would reject it)
        not_after = min(not_after, signer_cert.not_valid_after_utc.timestamp())
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_cert.public_key())  # type: ignore[arg-type]
        if signer_cert is not None
        else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    )
    usage = x509.KeyUsage(True, False, False, False, False, True, True, False, False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_cert.subject if signer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_dt(now - 60))
        .not_valid_after(_dt(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
        # X509-SVID §3.1: a signing certificate may carry the trust domain's SPIFFE ID.
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    return builder.sign(signer_key, hashes.SHA256())


def _write_pair(
    passphrase: bytes,
    cert: x509.Certificate,
    path: Path,
    key: ec.EllipticCurvePrivateKey,
    key_path: Path,
) -> None:
    """The key file is created 0600 before a byte is written; PKCS#8, encrypted."""
    enc = serialization.BestAvailableEncryption(passphrase)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(pem)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """The loaded intermediate(s) and root certificate; never holds the root key after init."""

    def __init__(self, files: CaFiles, kek: bytes, clock: Clock, trust_domain: str) -> None:
        self.files = files
        self.trust_domain = trust_domain
        self._pass = ca_passphrase(kek)
        self._clock = clock
        self.reload()

    # -- files -----------------------------------------------------------------------------

    def _read_key(self, path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=self._pass)
        except FileNotFoundError:
            raise ConfigError(
                f"ca key {path} does not exist; run `aegis ca init`", key="pki.ca_dir"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                f"ca key {path} cannot be decrypted; is keys.kek the one it was created with?",
                key="keys.kek",
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"ca key {path} is not an ECDSA key", key="pki.ca_dir")
        return key

    def reload(self) -> None:
        f = self.files
        try:
            self.root = x509.load_pem_x509_certificate(f.root_cert.read_bytes())
            cert = x509.load_pem_x509_certificate(f.cert.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"no ca in {f.directory}; run `aegis ca init`", key="pki.ca_dir"
            ) from None
        self.current = Intermediate(cert, self._read_key(f.key))
        self.previous: Intermediate | None = None
        self._previous_until: float | None = None
        if f.previous_cert.exists() and f.rotation.exists():
            until = float(json.loads(f.rotation.read_text())["previous_until"])
            if self._clock.now() < until:
                prev = x509.load_pem_x509_certificate(f.previous_cert.read_bytes())
                self.previous = Intermediate(prev, self._read_key(f.previous_key))
                self._previous_until = until
        self._stamp = self._files_stamp()

    def _files_stamp(self) -> tuple[tuple[int, int] | None, ...]:
        def stat(path: Path) -> tuple[int, int] | None:
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            return (st.st_mtime_ns, st.st_size)

        f = self.files
        return tuple(stat(p) for p in (f.cert, f.rotation, f.previous_cert))

    def refresh(self) -> bool:
        """Reload if the CA files changed on disk or the rotation overlap ended; True if so."""
        ended = self._previous_until is not None and self._clock.now() >= self._previous_until
        if not ended and self._files_stamp() == self._stamp:
            return False
        self.reload()
        return True

    @classmethod
    def init(
        cls,
        files: CaFiles,
        kek: bytes,
        clock: Clock,
        trust_domain: str,
        *,
        root_days: int = _ROOT_DAYS,
        intermediate_days: int = _INTERMEDIATE_DAYS,
        force: bool = False,
    ) -> CertificateAuthority:
        """Create a root and its first intermediate. Refuses to overwrite unless ``force``."""
        if files.root_cert.exists() and not force:
            raise Conflict(f"a ca already exists in {files.directory}; use --force to replace it")
        files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = clock.now()
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _ca_cert(
            f"Aegis Root CA {trust_domain}",
            root_key,
            None,
            now=now,
            days=root_days,
            path_length=1,
            trust_domain=trust_domain,
        )
        key = ec.generate_private_key(ec.SECP256R1())
        inter = _ca_cert(
            f"Aegis Issuing CA {trust_domain}",
            key,
            Intermediate(root, root_key),
            now=now,
            days=intermediate_days,
            path_length=0,
            trust_domain=trust_domain,
        )
        passphrase = ca_passphrase(kek)
        _write_pair(passphrase, root, files.root_cert, root_key, files.root_key)
        _write_pair(passphrase, inter, files.cert, key, files.key)
        files.rotation.unlink(missing_ok=True)
        return cls(files, kek, clock, trust_domain)

    def rotate_intermediate(
        self, *, overlap: float, days: int = _INTERMEDIATE_DAYS
    ) -> Intermediate:
        """New issuing intermediate (needs the root key); the old one stays trusted for ``overlap``
        seconds, which must cover the longest agent certificate it signed."""
        root = Intermediate(self.root, self._read_key(self.files.root_key))
        now = self._clock.now()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_cert(
            f"Aegis Issuing CA {self.trust_domain}",
            key,
            root,
            now=now,
            days=days,
            path_length=0,
            trust_domain=self.trust_domain,
        )
        f = self.files
        _write_pair(
            self._pass, self.current.cert, f.previous_cert, self.current.key, f.previous_key
        )
        f.rotation.write_text(json.dumps({"previous_until": now + overlap}))
        _write_pair(self._pass, cert, f.cert, key, f.key)
        self.reload()
        return self.current

    # -- trust material --------------------------------------------------------------------

    def intermediates(self) -> list[Intermediate]:
        return [self.current] + ([self.previous] if self.previous is not None else [])

    def bundle_pem(self) -> bytes:
        """Root first, then every intermediate still trusted (both during a rotation overlap)."""
        certs = [self.root] + [i.cert for i in self.intermediates()]
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    def not_after_cap(self) -> float:
        return self.current.cert.not_valid_after_utc.timestamp()
