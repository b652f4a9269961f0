"""Evidence: Ed25519 decision attestations and the hash-chained, append-only audit log."""

from __future__ import annotations

from aegis.audit.attest import ATTESTATION_TYP, Attester
from aegis.audit.log import GENESIS_HASH, AuditLog, ChainReport, canonical_json, record_hash

__all__ = [
    "ATTESTATION_TYP",
    "GENESIS_HASH",
    "Attester",
    "AuditLog",
    "ChainReport",
    "canonical_json",
    "record_hash",
]
