"""Signed checkpoints (signed tree heads, RFC 9162 §4.10 in spirit) as compact JWS, RFC 7515 / 8037.

A checkpoint says, under the key ring's Ed25519 key, "the first ``tree_size`` audit records have
Merkle root ``root_hash`` and hash-chain head ``chain_hash``". It is a JWS with header
``typ: aegis-checkpoint+jwt`` and claims::

    iss         the Aegis issuer            tree_size   records covered (int >= 0)
    iat         when it was signed          root_hash   hex RFC 9162 root of those records
    purpose     "periodic" or "export"      chain_hash  hex hash of record ``tree_size``

so anyone holding only the JWKS can check it (:func:`verify_checkpoint`). ``purpose: export`` marks
the one checkpoint an export ends with: a periodic checkpoint cannot stand in for it, so cutting an
export back to an earlier periodic checkpoint is detected. Periodic ones are stored in
``audit_checkpoints`` (:class:`Checkpointer`) and survive pruning.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from aegis.audit.log import AuditLog
from aegis.audit.sql_tables import AUDIT_CHECKPOINTS, AUDIT_RECORDS
from aegis.audit.tree import MerkleStore, TreeHead
from aegis.clock import Clock
from aegis.crypto.jws import encode_segment, parse_compact, sign_compact
from aegis.crypto.keyring import KeyRing
from aegis.crypto.keys import PublicKey, public_key_from_jwk
from aegis.errors import AegisError, EvidenceError
from aegis.telemetry.metrics import AUDIT_CHECKPOINT_SIZE
from aegis.tokens.verifier import VerifyRules, verify_jwt

__all__ = [
    "CHECKPOINT_TYP",
    "Checkpoint",
    "Checkpointer",
    "jwks_resolver",
    "sign_checkpoint",
    "verify_checkpoint",
]

CHECKPOINT_TYP: Final = "aegis-checkpoint+jwt"
Purpose = Literal["periodic", "export"]
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_RULES: Final = VerifyRules(
    typ=CHECKPOINT_TYP,
    issuer=None,
    audience=None,
    required=frozenset({"iss", "iat", "tree_size", "root_hash", "chain_hash", "purpose"}),
    leeway=float("inf"),  # a checkpoint is evidence of the past: it does not expire
)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    tree_size: int
    root_hash: bytes
    chain_hash: str
    time: float
    purpose: str
    issuer: str
    kid: str
    token: str


def sign_checkpoint(
    keyring: KeyRing,
    *,
    issuer: str,
    head: TreeHead,
    now: float,
    purpose: Purpose = "periodic",
    base: int | None = None,
) -> str:
    """Raises ``Unavailable(key_store_unavailable)`` when there is no active key. ``base``: for
    an export, the position its records start after (the prune point, 0 for the whole log),
    signed so that an export cut at its start does not pass for a pruned log's."""
    key = keyring.signing_key()
    header = encode_segment(
        {"alg": keyring.settings.signing_alg, "typ": CHECKPOINT_TYP, "kid": key.kid}
    )
    claims: dict[str, Any] = {
        "iss": issuer,
        "iat": int(now),
        "tree_size": head.size,
        "root_hash": head.root.hex(),
        "chain_hash": head.chain_hash,
        "purpose": purpose,
    }
    if base is not None:
        claims["base"] = base
    return sign_compact(header, claims, key.sign)


def jwks_resolver(jwks: Any) -> Callable[[str], PublicKey | None]:
    """A ``kid -> key`` lookup over a JWK Set document; a malformed set is ``evidence_invalid``,
    and so is a kid given two different keys: whichever won, one file (an archived set handed
    over by whoever is audited, say) could re-publish a trusted kid with a key of its own, and
    forged checkpoints would verify. The same key listed twice is one key."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise EvidenceError("the JWKS must be a JSON object with a 'keys' array")
    keys: dict[str, PublicKey] = {}
    for jwk in jwks["keys"]:
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        if not isinstance(kid, str) or not kid:
            raise EvidenceError("every key in the JWKS needs a kid")
        try:
            key = public_key_from_jwk(jwk)
        except AegisError as exc:
            raise EvidenceError(f"JWKS key {kid}: {exc.message}") from exc
        known = keys.get(kid)
        if known is not None and known.to_jwk() != key.to_jwk():
            raise EvidenceError(
                f"JWKS kid {kid[:64]!r} is given two different keys; verify with the key sets you "
                "trust only, and find out where the other came from"
            )
        keys[kid] = key
    return keys.get


def verify_checkpoint(
    token: str, resolve_key: Callable[[str], PublicKey | None], *, issuer: str | None = None
) -> Checkpoint:
    """Signature (key from the JWKS by ``kid``), type and claims; raises ``EvidenceError``."""
    try:
        jws = verify_jwt(token, resolve_key, _RULES, 0.0)
    except AegisError as exc:
        raise EvidenceError(f"checkpoint signature does not verify: {exc.message}") from exc
    c = jws.payload
    size, root, chain, iss = c["tree_size"], c["root_hash"], c["chain_hash"], c["iss"]
    if type(size) is not int or size < 0:
        raise EvidenceError("checkpoint tree_size must be a non-negative integer")
    if not isinstance(root, str) or not _HEX64.fullmatch(root):
        raise EvidenceError("checkpoint root_hash must be 64 lowercase hex digits")
    if not isinstance(chain, str) or not _HEX64.fullmatch(chain):
        raise EvidenceError("checkpoint chain_hash must be 64 lowercase hex digits")
    if c["purpose"] not in ("periodic", "export") or not isinstance(iss, str):
        raise EvidenceError("checkpoint purpose must be periodic or export")
    if issuer is not None and iss != issuer:
        raise EvidenceError("checkpoint was signed by another issuer")
    iat = c["iat"]
    if type(iat) not in (int, float):
        raise EvidenceError("checkpoint iat must be a number")
    return Checkpoint(
        size, bytes.fromhex(root), chain, float(iat), c["purpose"], iss, jws.header["kid"], token
    )


#: How many of the newest stored checkpoints are tried for one this log signed.
_TRUST_SCAN: Final = 16


class Checkpointer:
    """Extends the tree and stores a periodic checkpoint when the log has grown since the last."""

    def __init__(self, log: AuditLog, keyring: KeyRing, *, issuer: str, clock: Clock) -> None:
        self.log, self.tree = log, MerkleStore(log.engine)
        self._keyring, self._issuer, self._clock = keyring, issuer, clock

    @property
    def issuer(self) -> str:
        return self._issuer

    def latest(self, *, at_least: int = 0) -> Checkpoint | None:
        """The newest stored checkpoint, or the oldest covering ``at_least`` records."""
        query = select(AUDIT_CHECKPOINTS.c.token)
        if at_least:
            query = query.where(AUDIT_CHECKPOINTS.c.tree_size >= at_least).order_by(
                AUDIT_CHECKPOINTS.c.tree_size
            )
        else:
            query = query.order_by(AUDIT_CHECKPOINTS.c.tree_size.desc())
        with self.log.engine.connect() as conn:
            token = conn.execute(query.limit(1)).scalar()
        return None if token is None else self._decode(token)

    def all(self) -> list[Checkpoint]:
        query = select(AUDIT_CHECKPOINTS.c.token).order_by(AUDIT_CHECKPOINTS.c.tree_size)
        with self.log.engine.connect() as conn:
            return [self._decode(t) for (t,) in conn.execute(query)]

    @staticmethod
    def _decode(token: str) -> Checkpoint:
        # Rows this log wrote itself; third parties verify with :func:`verify_checkpoint`. The
        # signature is not re-checked here because the signing key may long be retired. A row
        # that is not a checkpoint at all was written outside Aegis: said so, not a crash.
        try:
            jws = parse_compact(token)
            c = jws.payload
            size, root = int(c["tree_size"]), bytes.fromhex(c["root_hash"])
        except (AegisError, KeyError, TypeError, ValueError):
            raise EvidenceError(
                "a row of the checkpoint table is not a checkpoint; it was written outside Aegis"
            ) from None
        return Checkpoint(
            size,
            root,
            str(c["chain_hash"]),
            float(c["iat"]),
            str(c["purpose"]),
            str(c["iss"]),
            str(jws.header.get("kid", "")),
            token,
        )

    def _trusted_size(self) -> int:
        """The size of the newest stored checkpoint this log signed (its signature verifies with
        a key of the ring, its root is the stored tree's at its size): what is stored up to there
        is known good. A row that does not verify (written by something else) is passed over."""
        resolve = jwks_resolver(self._keyring.evidence_jwks())
        query = (
            select(AUDIT_CHECKPOINTS.c.token)
            .order_by(AUDIT_CHECKPOINTS.c.tree_size.desc())
            .limit(_TRUST_SCAN)
        )
        with self.log.engine.connect() as conn:
            tokens = [t for (t,) in conn.execute(query)]
        for token in tokens:
            try:
                cp = verify_checkpoint(token, resolve, issuer=self._issuer)
            except EvidenceError:
                continue
            stored = self.tree.size()  # read after the checkpoints: a sync precedes each
            if cp.tree_size > stored or (
                cp.tree_size and self.tree.root(cp.tree_size) != cp.root_hash
            ):
                raise EvidenceError(
                    f"the newest stored checkpoint (tree size {cp.tree_size}) does not match the "
                    f"log (stored tree size {stored}): the checkpoint table or the tree was "
                    "changed outside Aegis; refusing to sign over it"
                )
            return cp.tree_size
        return 0

    def verify_stored(self, size: int, token: str, chain_head: str) -> Checkpoint:
        """That ``token``, stored as the checkpoint at ``size``, is one this log signed (a key of
        the ring, this issuer) for that size and chain head; ``EvidenceError`` otherwise."""
        try:
            cp = verify_checkpoint(
                token, jwks_resolver(self._keyring.evidence_jwks()), issuer=self._issuer
            )
        except EvidenceError as exc:
            raise EvidenceError(
                f"the checkpoint stored at {size} is not one this log signed ({exc.message}); "
                "it was written outside Aegis: nothing is pruned"
            ) from exc
        if (cp.tree_size, cp.chain_hash) != (size, chain_head):
            raise EvidenceError(
                f"the checkpoint stored at {size} signs another size or chain head; it was "
                "written outside Aegis: nothing is pruned"
            )
        return cp

    def checkpoint(self) -> Checkpoint:
        """Sync the tree; sign and store a checkpoint unless one already covers the whole log."""
        head = self.tree.sync(trusted=self._trusted_size())
        last = self.latest()
        if last is not None and last.tree_size > head.size:
            # Another process may have appended and checkpointed since (or a row nobody signed
            # says so): the nodes past the newest checkpoint this log signed are verified again.
            head = self.tree.sync(trusted=self._trusted_size())
        if last is not None and last.tree_size >= head.size:
            # A stored checkpoint covering the whole log must be of this log: one larger than
            # the log, or of another root or chain head, was not written by a checkpointer of
            # this log, and taking it as cover would stop checkpointing for good.
            if (last.tree_size, last.root_hash, last.chain_hash) != (
                head.size,
                head.root,
                head.chain_hash,
            ):
                raise EvidenceError(
                    f"the newest stored checkpoint (tree size {last.tree_size}) does not match "
                    f"the log (tree size {head.size}): the checkpoint table or the log was "
                    "changed outside Aegis"
                )
            return last
        now = self._clock.now()
        token = sign_checkpoint(self._keyring, issuer=self._issuer, head=head, now=now)
        row = {"tree_size": head.size, "time": now, "root_hash": head.root.hex()}
        row |= {"chain_hash": head.chain_hash, "token": token}
        try:
            with self.log.engine.begin() as conn:
                conn.execute(insert(AUDIT_CHECKPOINTS), [row])
        except IntegrityError:  # another process checkpointed this size first: keep theirs
            pass
        latest = self.latest()
        assert latest is not None
        AUDIT_CHECKPOINT_SIZE.set(latest.tree_size)
        return latest

    def head_for_export(self) -> tuple[TreeHead, str, int]:
        """Sync, and sign an ``export`` checkpoint of the whole log (not stored), naming where
        the records still held start (after ``base``, the prune point; every record pruned,
        the head). Returns the head, the token and the base."""
        head = self.tree.sync(trusted=self._trusted_size())
        with self.log.engine.connect() as conn:
            first = conn.execute(select(func.min(AUDIT_RECORDS.c.seq))).scalar()
        base = head.size if first is None else int(first) - 1
        now = self._clock.now()
        token = sign_checkpoint(
            self._keyring, issuer=self._issuer, head=head, now=now, purpose="export", base=base
        )
        return head, token, base
