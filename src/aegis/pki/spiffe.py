"""SPIFFE IDs (SPIFFE-ID spec §2) and X.509-SVID leaf rules (X509-SVID spec §2-§4.3).

A SPIFFE ID is ``spiffe://<trust-domain>/<path>``. Parsing is strict and never normalises:
anything the spec forbids is an error, so two different strings can never name one identity.

* §2.1 "Trust domain names MUST only contain lowercase letters, numbers, dots, dashes, and
  underscores"; the ``userinfo`` and ``port`` parts "MUST NOT be set".
* §2.2 path segments "MUST only contain letters, numbers, dots, dashes, and underscores"; no empty
  segment, no ``.`` or ``..`` segment, no percent-encoding, no trailing ``/``.
* §2 "MUST NOT include a query or fragment component".
* §2.3 at most 2048 bytes in total, at most 255 bytes of trust domain.

Aegis agent identities have exactly the path ``/tenant/<t>/env/<e>/agent/<id>``.

X509-SVID §4.3: a leaf "MUST have the cA field set to false", "MUST have digitalSignature set",
"MUST NOT have keyCertSign or cRLSign set"; §2: "An X.509 SVID MUST contain exactly one URI SAN".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from aegis.errors import AegisError

__all__ = [
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "AgentSpiffeId",
    "SpiffeId",
    "agent_spiffe_id",
    "check_leaf_svid",
    "parse_agent_spiffe_id",
    "parse_spiffe_id",
]

MAX_SPIFFE_ID_BYTES: Final = 2048
MAX_TRUST_DOMAIN_BYTES: Final = 255
_SCHEME: Final = "spiffe://"
_TRUST_DOMAIN: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9._-]+")


def _bad(message: str, value: str = "") -> AegisError:
    # Bound what is echoed: a SPIFFE ID is not secret, but a hostile one may be huge.
    return AegisError(message, code="spiffe_id_invalid", spiffe_id=value[:256])


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    #: ``""`` or ``/seg/seg...``.
    path: str

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


@dataclass(frozen=True, slots=True)
class AgentSpiffeId:
    """The identity an Aegis agent certificate carries."""

    trust_domain: str
    tenant: str
    env: str
    agent: str

    def __str__(self) -> str:
        return agent_spiffe_id(self.trust_domain, self.tenant, self.env, self.agent)


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse ``value`` strictly; raise ``AegisError(code="spiffe_id_invalid")`` naming the rule."""
    if not isinstance(value, str):
        raise _bad("spiffe id must be a string")
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise _bad("spiffe id must be ascii", value) from None
    if len(raw) > MAX_SPIFFE_ID_BYTES:
        raise _bad(f"spiffe id is longer than {MAX_SPIFFE_ID_BYTES} bytes", value)
    if not value.startswith(_SCHEME):
        raise _bad("spiffe id must start with the lowercase scheme spiffe://", value)
    rest = value[len(_SCHEME) :]
    if "?" in rest or "#" in rest:
        raise _bad("spiffe id must not have a query or fragment", value)
    if "%" in rest:
        raise _bad("spiffe id must not contain percent-encoding", value)
    domain, slash, path = rest.partition("/")
    if not domain:
        raise _bad("spiffe id needs a trust domain", value)
    if "@" in domain:
        raise _bad("spiffe id must not contain userinfo", value)
    if ":" in domain:
        raise _bad("spiffe id must not contain a port", value)
    if len(domain) > MAX_TRUST_DOMAIN_BYTES:
        raise _bad(f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes", value)
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise _bad(
            "trust domain may only contain lowercase letters, digits, '.', '-' and '_'", value
        )
    if not slash:
        return SpiffeId(domain, "")
    for segment in path.split("/"):
        if not segment:
            raise _bad("spiffe id path must not have empty segments or a trailing '/'", value)
        if segment in (".", ".."):
            raise _bad("spiffe id path must not have '.' or '..' segments", value)
        if not _SEGMENT.fullmatch(segment):
            raise _bad("path segments may only contain letters, digits, '.', '-' and '_'", value)
    return SpiffeId(domain, "/" + path)


def agent_spiffe_id(trust_domain: str, tenant: str, env: str, agent: str) -> str:
    """Build (and check) ``spiffe://<td>/tenant/<t>/env/<e>/agent/<id>``."""
    value = f"{_SCHEME}{trust_domain}/tenant/{tenant}/env/{env}/agent/{agent}"
    parse_agent_spiffe_id(value, trust_domain)
    return value


def parse_agent_spiffe_id(value: str, trust_domain: str) -> AgentSpiffeId:
    """Parse an Aegis agent identity in ``trust_domain``; any other shape is refused."""
    sid = parse_spiffe_id(value)
    if sid.trust_domain != trust_domain:
        raise _bad(f"spiffe id is not in the trust domain {trust_domain}", value)
    parts = sid.path.split("/")[1:]
    if len(parts) != 6 or parts[0::2] != ["tenant", "env", "agent"]:
        raise _bad("spiffe id path must be /tenant/<t>/env/<e>/agent/<id>", value)
    return AgentSpiffeId(trust_domain, parts[1], parts[3], parts[5])


def _ext(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def check_leaf_svid(
    cert: x509.Certificate, trust_domain: str, *, eku: x509.ObjectIdentifier | None = None
) -> AgentSpiffeId:
    """Apply the X509-SVID leaf rules and return the agent identity it names.

    ``eku`` is the extended key usage this use needs (clientAuth for a caller); raises
    ``spiffe_id_invalid`` for the SAN rules and ``cert_wrong_usage`` for the usage rules.
    """
    san = _ext(cert, x509.SubjectAlternativeName)
    uris = (
        san.get_values_for_type(x509.UniformResourceIdentifier)
        if isinstance(san, x509.SubjectAlternativeName)
        else []
    )
    if len(uris) != 1:
        raise _bad(f"certificate must carry exactly one uri san, found {len(uris)}")
    identity = parse_agent_spiffe_id(uris[0], trust_domain)
    bc = _ext(cert, x509.BasicConstraints)
    if not isinstance(bc, x509.BasicConstraints) or bc.ca:
        raise AegisError(
            "a ca certificate cannot be used as an agent certificate",
            code="cert_wrong_usage",
            spiffe_id=str(identity),
        )
    ku = _ext(cert, x509.KeyUsage)
    if not isinstance(ku, x509.KeyUsage) or not ku.digital_signature:
        raise AegisError(
            "agent certificate needs the digitalSignature key usage",
            code="cert_wrong_usage",
            spiffe_id=str(identity),
        )
    if ku.key_cert_sign or ku.crl_sign:
        raise AegisError(
            "agent certificate must not have keyCertSign or cRLSign",
            code="cert_wrong_usage",
            spiffe_id=str(identity),
        )
    if eku is not None:
        ekus = _ext(cert, x509.ExtendedKeyUsage)
        if not isinstance(ekus, x509.ExtendedKeyUsage) or eku not in list(ekus):
            name = "clientAuth" if eku == ExtendedKeyUsageOID.CLIENT_AUTH else eku.dotted_string
            raise AegisError(
                f"agent certificate lacks the {name} extended key usage",
                code="cert_wrong_usage",
                spiffe_id=str(identity),
            )
    return identity
