"""The token-signing key ring: Ed25519 keys moving ``next -> active -> retired``.

Invariants (each one is tested):

* a key is published in the JWKS (as ``next``) before anything is signed with it, and a manual
  rotation refuses to promote a ``next`` key younger than :attr:`KeyRingSettings.publish_lead`
  unless forced, so verifiers that cache the JWKS have had time to see it;
* a retired key stays published until every token it signed has expired
  (``max token lifetime + leeway`` after retirement), then it leaves the JWKS and stops
  verifying; its public half is archived (private key erased) so that the attestations and
  audit checkpoints it signed can still be checked (:meth:`KeyRing.evidence_jwks`);
* the JWKS never carries a private member; private keys are stored only as AES-256-GCM ciphertext
  under the key-encryption key, with the ``kid`` as associated data so blobs cannot be swapped;
* ``kid`` is the RFC 7638 thumbprint of the public key.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from aegis.clock import Clock, random_bytes
from aegis.crypto.keys import Ed25519SigningKey, PublicKey, public_key_from_jwk
from aegis.errors import ConfigError, Conflict, Unavailable
from aegis.stores.base import KeyStore
from aegis.telemetry.logging import log_event
from aegis.types import Event, KeyState, SigningKeyRecord

__all__ = ["KeyRing", "KeyRingSettings", "decrypt_seed", "encrypt_seed"]

_AAD_PREFIX = b"aegis-signing-key:"


def encrypt_seed(kek: bytes, kid: str, seed: bytes) -> bytes:
    nonce = random_bytes(12)
    return nonce + AESGCM(kek).encrypt(nonce, seed, _AAD_PREFIX + kid.encode())


def decrypt_seed(kek: bytes, kid: str, blob: bytes) -> bytes:
    try:
        return AESGCM(kek).decrypt(blob[:12], blob[12:], _AAD_PREFIX + kid.encode())
    except (InvalidTag, ValueError) as exc:
        # ValueError: a blob shorter than its 12-byte nonce. Damaged data, same answer.
        raise ConfigError(
            f"cannot decrypt signing key {kid}: wrong key-encryption key (keys.kek) or damaged data",
            key="keys.kek",
        ) from exc


@dataclass(frozen=True, slots=True)
class KeyRingSettings:
    #: The longest lifetime any token signed by the ring can have (seconds).
    max_token_lifetime: float = 3600.0
    #: Clock skew verifiers allow; a retired key stays published this much longer.
    leeway: float = 30.0
    #: How long a ``next`` key must have been published before a normal rotation promotes it.
    publish_lead: float = 300.0
    #: Scheduled rotation interval; 0 disables scheduled rotation.
    rotation_interval: float = 86400.0
    #: JWS ``alg`` written in headers: ``EdDSA`` (widely deployed) or ``Ed25519`` (RFC 9864).
    signing_alg: str = "EdDSA"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    records: tuple[SigningKeyRecord, ...]
    active: Ed25519SigningKey | None
    public: dict[str, PublicKey]
    loaded_at: float
    #: ``remove_after`` of each retired key: past it the key verifies nothing.
    remove_after: dict[str, float] = field(default_factory=dict)
    #: Each retired or archived key with the time it was retired, for the lookups that accept a
    #: key for longer after its retirement (``public_key(retired_within=...)``).
    retired: dict[str, tuple[PublicKey, float]] = field(default_factory=dict)


class KeyRing:
    """Holds the current key records; signs with the active key; resolves public keys by kid."""

    def __init__(
        self, store: KeyStore, kek: bytes, clock: Clock, settings: KeyRingSettings | None = None
    ) -> None:
        if len(kek) != 32:
            raise ConfigError("the key-encryption key must be 32 bytes", key="keys.kek")
        self._store = store
        self._kek = kek
        self._clock = clock
        self.settings = settings or KeyRingSettings()
        self._lock = threading.Lock()
        self._snap = _Snapshot((), None, {}, 0.0)
        self._last_miss_reload = 0.0
        #: Whether the last reload on a kid miss failed: until the next one (at most a second
        #: later) a miss is still the store's outage (503), not an unknown key (401).
        self._miss_reload_failed = False
        self._refreshing = False
        #: Bumped by every install: a read that began before one is not installed after it.
        self._generation = 0
        #: Set by :meth:`close`: the refresh thread stops, and never reads a closed store.
        self._closed = threading.Event()

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the records from the store and decrypt the active key. The read holds no lock
        (the event loop may be waiting on a kid miss); it is installed only if nothing was
        installed since it began, so a read taken before a rotation in this process is never
        installed after it."""
        generation = self._generation
        records = tuple(self._store.list_keys())
        with self._lock:
            if self._generation == generation:
                self._install(records)

    def _install(self, records: tuple[SigningKeyRecord, ...]) -> None:
        active = None
        public: dict[str, PublicKey] = {}
        remove_after: dict[str, float] = {}
        retired: dict[str, tuple[PublicKey, float]] = {}
        for rec in records:
            if rec.retired_at is not None:
                retired[rec.kid] = (public_key_from_jwk(rec.public_jwk), rec.retired_at)
            if rec.state is KeyState.ARCHIVED:
                continue  # verifies nothing (but for retired_within); evidence_jwks() shows it
            public[rec.kid] = public_key_from_jwk(rec.public_jwk)
            if rec.state is KeyState.RETIRED and rec.remove_after is not None:
                remove_after[rec.kid] = rec.remove_after
            if rec.state is KeyState.ACTIVE and rec.private_blob is not None:
                active = Ed25519SigningKey(decrypt_seed(self._kek, rec.kid, rec.private_blob))
                if active.kid != rec.kid or active.public.to_jwk() != public[rec.kid].to_jwk():
                    raise ConfigError(
                        f"signing key {rec.kid} does not match its published public key",
                        key="keys",
                    )
        self._snap = _Snapshot(
            records, active, public, self._clock.monotonic(), remove_after, retired
        )
        self._generation += 1

    def ensure_initialized(self) -> None:
        """Create an active and a next key if the store has no active key.

        The check and the write are one step of the store's :meth:`KeyStore.update`: replicas
        starting together on one database end up with one active key, not each with its own
        (the later write would unpublish the keys the earlier replica already signs with)."""

        def initialise(records: list[SigningKeyRecord]) -> list[SigningKeyRecord] | None:
            if any(r.state is KeyState.ACTIVE and r.private_blob is not None for r in records):
                return None
            now = self._clock.now()
            records = [r for r in records if r.state is not KeyState.ACTIVE]
            records.append(replace(self._new_record(now), state=KeyState.ACTIVE, activated_at=now))
            if not any(r.state is KeyState.NEXT for r in records):
                records.append(self._new_record(now))
            return records

        with self._lock:
            self._install(tuple(self._store.update(initialise)))

    def refresh_if_stale(self, max_age: float) -> None:
        """Reload when the snapshot is older than ``max_age`` seconds (picks up other processes'
        rotations). A failed reload keeps the current snapshot: it is still correct until then."""
        if self._clock.monotonic() - self._snap.loaded_at >= max_age:
            with contextlib.suppress(Unavailable):
                self.load()

    def refresh_in_background(self, interval: float) -> None:
        """Re-read the store every ``interval`` seconds (real time) on a daemon thread, for a
        process that verifies and signs with the ring but does not run the control plane's
        maintenance (a standalone gateway): a rotation made elsewhere must reach it within about
        an interval, or it would keep signing with the retired key and keep accepting that key
        past the end of its overlap (its own copy of the records never learns the key's
        ``remove_after``). One thread per ring, however often called; it ends when the ring is
        gone. A failed read keeps the current snapshot and is logged."""
        with self._lock:
            if self._refreshing or self._closed.is_set():
                return
            self._refreshing = True
        _start_refreshing(weakref.ref(self), self._closed, interval)

    def close(self) -> None:
        """Stop the background refresh (before the key store is closed)."""
        self._closed.set()

    # -- using -----------------------------------------------------------------------------

    def signing_key(self) -> Ed25519SigningKey:
        key = self._snap.active
        if key is None:
            raise Unavailable(
                "no active signing key; run `aegis keys rotate`", code="key_store_unavailable"
            )
        return key

    def public_key(
        self, kid: str, *, retired_within: float = 0.0, signed_at: float | None = None
    ) -> PublicKey | None:
        """The published key with this kid. On a miss, reload at most once a second so keys
        rotated by another process are found without letting unknown kids hammer the store; a
        store that cannot answer then raises ``Unavailable`` (503), never reads as an unknown
        key. With ``retired_within``, a key retired (or archived) less than that many seconds
        ago verifies too, for a signature the ring made that outlives the tokens it signed (a
        delegation chain's first link, carried by tokens exchanged after it): only one that
        says it was made (``signed_at``, within ``leeway``) while the key was still active. A
        leaked retired key can still sign a link dated before its retirement, but such a link
        outlives its grant lifetime only through the tokens exchanged from it in time."""
        key = self._snap.public.get(kid)
        if key is None and kid not in self._snap.retired:
            now = self._clock.monotonic()
            if now - self._last_miss_reload >= 1.0:
                self._last_miss_reload = now
                try:
                    self.load()
                except Unavailable:
                    self._miss_reload_failed = True
                    raise
                self._miss_reload_failed = False
                key = self._snap.public.get(kid)
            elif self._miss_reload_failed:  # within the throttle, the store is still down
                raise Unavailable(
                    "the key store cannot be read to find this token's key",
                    code="key_store_unavailable",
                )
        if key is not None:
            # A retired key past its overlap is gone from the JWKS; it must stop verifying at the
            # same instant even if no rotation has pruned it from the store yet, or a leaked
            # retired key would keep minting accepted tokens.
            until = self._snap.remove_after.get(kid)
            if until is not None and self._clock.now() >= until:
                key = None
        if key is None and retired_within > 0 and (found := self._snap.retired.get(kid)):
            retired_key, retired_at = found
            signed_in_time = (
                signed_at is not None and signed_at <= retired_at + self.settings.leeway
            )
            if signed_in_time and self._clock.now() < retired_at + retired_within:
                return retired_key
        return key

    def records(self) -> tuple[SigningKeyRecord, ...]:
        return self._snap.records

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: next, active, and retired keys still inside their overlap."""
        now = self._clock.now()
        return self._key_set(
            r
            for r in self._snap.records
            if r.state is not KeyState.ARCHIVED
            and not (
                r.state is KeyState.RETIRED and r.remove_after is not None and now >= r.remove_after
            )
        )

    def evidence_jwks(self) -> dict[str, Any]:
        """Every key this ring has had, archived ones included: for checking attestations and
        audit checkpoints signed long ago. Never a token verifier's JWKS: a key past its
        overlap must not make a token valid again."""
        return self._key_set(self._snap.records)

    def _key_set(self, records: Iterable[SigningKeyRecord]) -> dict[str, Any]:
        keys = []
        for rec in records:
            jwk = {k: v for k, v in rec.public_jwk.items() if k in ("kty", "crv", "x", "y")}
            keys.append({**jwk, "kid": rec.kid, "use": "sig", "alg": self.settings.signing_alg})
        return {"keys": keys}

    # -- rotating --------------------------------------------------------------------------

    def rotate(
        self, *, force: bool = False, event: Callable[[SigningKeyRecord], Event] | None = None
    ) -> SigningKeyRecord:
        """Promote ``next`` to active, retire the old active key, publish a new ``next``.

        Returns the new active record. Raises ``Conflict`` if ``next`` has been published for
        less than ``publish_lead`` and ``force`` is false. ``event``, given the new active
        record, is the lifecycle event the store writes in the rotation's own transaction."""
        rotated = self._rotate(force=force, only_if_due=False, event=event)
        assert rotated is not None
        return rotated

    def rotate_if_due(self) -> bool:
        """Scheduled rotation: rotate when the active key is older than the interval.

        Every replica runs this schedule; the age is checked again inside the store's update, so
        when several find the key due at once, one rotates and the others find it fresh."""
        interval = self.settings.rotation_interval
        if interval <= 0 or not self._is_due(self._snap.records):
            return False
        try:
            return self._rotate(force=False, only_if_due=True) is not None
        except Conflict:
            return False

    def _is_due(self, records: Sequence[SigningKeyRecord]) -> bool:
        active = next((r for r in records if r.state is KeyState.ACTIVE), None)
        if active is None or active.activated_at is None:
            return False
        return self._clock.now() - active.activated_at >= self.settings.rotation_interval

    def _rotate(
        self,
        *,
        force: bool,
        only_if_due: bool,
        event: Callable[[SigningKeyRecord], Event] | None = None,
    ) -> SigningKeyRecord | None:
        # A refusal found inside the update: raised once the update has committed, because the
        # "no next key" refusal still publishes one.
        refusal: list[Conflict] = []
        promoted: list[SigningKeyRecord] = []

        def rotation(recs: list[SigningKeyRecord]) -> list[SigningKeyRecord] | None:
            now = self._clock.now()
            if only_if_due and not self._is_due(recs):
                return None
            nxt = next((r for r in recs if r.state is KeyState.NEXT), None)
            if nxt is None:
                nxt = self._new_record(now)
                recs.append(nxt)
                if not force:
                    refusal.append(
                        Conflict(
                            "no next key was published; one is published now, rotate again "
                            f"after {int(self.settings.publish_lead)} s or use --force"
                        )
                    )
                    return recs
            elif not force and now - nxt.created_at < self.settings.publish_lead:
                wait = int(self.settings.publish_lead - (now - nxt.created_at)) + 1
                refusal.append(
                    Conflict(
                        f"the next key was published {int(now - nxt.created_at)} s ago; "
                        "verifiers may not have fetched it yet: rotate again in "
                        f"{wait} s or use --force"
                    )
                )
                return None
            overlap = self.settings.max_token_lifetime + self.settings.leeway
            out: list[SigningKeyRecord] = []
            for r in recs:
                if (
                    r.state is KeyState.RETIRED
                    and r.remove_after is not None
                    and now >= r.remove_after
                ):
                    # Every token it signed has expired: keep only its public half.
                    r = replace(r, state=KeyState.ARCHIVED, private_blob=None)
                if r.state is KeyState.ACTIVE:
                    r = replace(
                        r, state=KeyState.RETIRED, retired_at=now, remove_after=now + overlap
                    )
                elif r.kid == nxt.kid:
                    r = replace(r, state=KeyState.ACTIVE, activated_at=now)
                    promoted[:] = [r]
                out.append(r)
            out.append(self._new_record(now))
            return out

        def events(written: Sequence[SigningKeyRecord]) -> list[Event]:
            return [event(promoted[0])] if event is not None and promoted else []

        with self._lock:
            if event is None:
                records = tuple(self._store.update(rotation))
            else:
                records = tuple(self._store.update(rotation, events=events))
            self._install(records)
        if refusal:
            raise refusal[0]
        return promoted[0] if promoted else None

    def _new_record(self, now: float) -> SigningKeyRecord:
        key = Ed25519SigningKey.generate()
        return SigningKeyRecord(
            kid=key.kid,
            alg=self.settings.signing_alg,
            state=KeyState.NEXT,
            public_jwk=key.public.to_jwk(),
            private_blob=encrypt_seed(self._kek, key.kid, key.seed()),
            created_at=now,
        )


def _start_refreshing(ring: weakref.ref[KeyRing], closed: threading.Event, interval: float) -> None:
    def run() -> None:
        while not closed.wait(interval):
            alive = ring()
            if alive is None:
                return
            try:
                alive.load()
            except Exception as exc:  # keep the current keys; the next round tries again
                log_event("keys.reload_failed", level=logging.ERROR, error=type(exc).__name__)
            del alive  # no strong reference while sleeping: the ring may go

    threading.Thread(target=run, name="aegis-keyring", daemon=True).start()
