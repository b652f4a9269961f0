"""The signing key ring: publication before use, rotation, overlap, encryption at rest."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aegis.clock import FrozenClock, random_bytes
from aegis.crypto.jws import parse_compact
from aegis.crypto.keyring import KeyRing, KeyRingSettings, decrypt_seed, encrypt_seed
from aegis.crypto.keys import PRIVATE_JWK_MEMBERS, jwk_thumbprint, public_key_from_jwk
from aegis.errors import ConfigError, Conflict, TokenError, Unavailable
from aegis.stores import open_key_store
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import AccessTokenVerifier
from aegis.types import KeyState
from tests.crypto.fakes import MemoryKeyStore

T0 = 1_800_000_000.0
ISS = "https://aegis.example"
AUD = "https://payments.example"
SETTINGS = KeyRingSettings(max_token_lifetime=3600, leeway=30, publish_lead=300)
OVERLAP = 3600 + 30


def _ring(store: MemoryKeyStore | None = None, kek: bytes | None = None) -> KeyRing:
    ring = KeyRing(store or MemoryKeyStore(), kek or bytes(range(32)), FrozenClock(T0), SETTINGS)
    ring.ensure_initialized()
    return ring


def _clock(ring: KeyRing) -> FrozenClock:
    clock = ring._clock
    assert isinstance(clock, FrozenClock)
    return clock


def _count_reads(store: Any) -> list[int]:
    """Count the store's ``list_keys`` calls in the returned one-item list."""
    reads = [0]
    original = store.list_keys

    def counting() -> list:  # type: ignore[type-arg]
        reads[0] += 1
        return original()  # type: ignore[no-any-return]

    store.list_keys = counting
    return reads


def _kids(ring: KeyRing) -> list[str]:
    return [k["kid"] for k in ring.jwks()["keys"]]


def _state(ring: KeyRing, state: KeyState) -> list[str]:
    return [r.kid for r in ring.records() if r.state is state]


def test_initial_ring_has_an_active_and_a_published_next_key() -> None:
    ring = _ring()
    (active,) = _state(ring, KeyState.ACTIVE)
    (nxt,) = _state(ring, KeyState.NEXT)
    assert ring.signing_key().kid == active
    assert set(_kids(ring)) == {active, nxt}


def test_next_key_is_published_before_it_signs() -> None:
    ring = _ring()
    (nxt,) = _state(ring, KeyState.NEXT)
    assert nxt in _kids(ring)
    assert ring.signing_key().kid != nxt
    _clock(ring).advance(300)
    ring.rotate()
    assert ring.signing_key().kid == nxt
    # The new next key is again published, and is not the signer.
    (new_next,) = _state(ring, KeyState.NEXT)
    assert new_next in _kids(ring) and new_next != nxt


def test_rotation_moves_next_to_active_and_active_to_retired() -> None:
    ring = _ring()
    (old,) = _state(ring, KeyState.ACTIVE)
    (nxt,) = _state(ring, KeyState.NEXT)
    _clock(ring).advance(300)
    promoted = ring.rotate()
    assert promoted.kid == nxt and promoted.state is KeyState.ACTIVE
    assert promoted.activated_at == T0 + 300
    (retired,) = [r for r in ring.records() if r.state is KeyState.RETIRED]
    assert retired.kid == old
    assert retired.retired_at == T0 + 300
    assert retired.remove_after == T0 + 300 + OVERLAP


def test_retired_key_is_published_until_the_overlap_ends_then_archived() -> None:
    ring = _ring()
    (old,) = _state(ring, KeyState.ACTIVE)
    clock = _clock(ring)
    clock.advance(300)
    ring.rotate()
    retired_at = clock.now()
    clock.set(retired_at + OVERLAP - 1)
    assert old in _kids(ring)
    assert ring.public_key(old) is not None
    clock.set(retired_at + OVERLAP)
    assert old not in _kids(ring)
    assert ring.public_key(old) is None
    # A later rotation erases its private key and keeps its public half for the evidence set
    # (tests/tokens/test_key_archive.py); it never verifies again.
    ring.rotate(force=True)
    (archived,) = [r for r in ring.records() if r.kid == old]
    assert (archived.state, archived.private_blob) == (KeyState.ARCHIVED, None)
    assert old not in _kids(ring) and ring.public_key(old) is None


def test_tokens_signed_before_a_rotation_verify_until_they_expire() -> None:
    ring = _ring()
    clock = _clock(ring)
    issuer = TokenIssuer(ring, issuer=ISS, clock=clock)
    verifier = AccessTokenVerifier(ring.public_key, issuer=ISS, audience=AUD, clock=clock)
    clock.advance(300)
    issued = issuer.issue(
        agent_id="a", client_id="c", tenant="t", env="e", scopes=(), audience=(AUD,), lifetime=3600
    )
    signed_with = parse_compact(issued.token).header["kid"]
    assert signed_with in _kids(ring)
    ring.rotate()
    assert ring.signing_key().kid != signed_with
    assert signed_with in _state(ring, KeyState.RETIRED) and signed_with in _kids(ring)
    verifier.verify(issued.token)
    clock.set(issued.claims["exp"] + 29)
    verifier.verify(issued.token)
    clock.set(issued.claims["exp"] + 30)
    with pytest.raises(TokenError) as err:
        verifier.verify(issued.token)
    # The key's overlap ends at the same instant: it is the key lookup that refuses first.
    assert clock.now() == T0 + 300 + OVERLAP
    assert err.value.code == "unknown_key"


def test_too_early_rotation_is_a_conflict_unless_forced() -> None:
    ring = _ring()
    (active,) = _state(ring, KeyState.ACTIVE)
    _clock(ring).advance(299)
    with pytest.raises(Conflict):
        ring.rotate()
    assert _state(ring, KeyState.ACTIVE) == [active]  # nothing changed
    ring.rotate(force=True)
    assert _state(ring, KeyState.ACTIVE) != [active]


def test_rotation_at_exactly_the_publish_lead_is_allowed() -> None:
    ring = _ring()
    _clock(ring).advance(300)
    ring.rotate()


def test_rotation_without_a_next_key_publishes_one_and_refuses() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    (nxt,) = _state(ring, KeyState.NEXT)
    store.delete_key(nxt)
    ring.load()
    (active,) = _state(ring, KeyState.ACTIVE)
    with pytest.raises(Conflict):
        ring.rotate()
    assert _state(ring, KeyState.ACTIVE) == [active]
    (published,) = _state(ring, KeyState.NEXT)
    assert published in _kids(ring)
    _clock(ring).advance(300)
    assert ring.rotate().kid == published


def test_scheduled_rotation() -> None:
    ring = _ring()
    clock = _clock(ring)
    (active,) = _state(ring, KeyState.ACTIVE)
    clock.advance(86400 - 1)
    assert ring.rotate_if_due() is False
    clock.advance(1)
    assert ring.rotate_if_due() is True
    assert _state(ring, KeyState.RETIRED) == [active]


def test_replicas_finding_the_key_due_together_rotate_once() -> None:
    """Each replica runs the schedule on its own snapshot: both see the key due, the second
    must find it rotated when it comes to write, not rotate the fresh key again (with no
    publish lead to refuse it)."""
    store = MemoryKeyStore()
    eager = dataclasses.replace(SETTINGS, publish_lead=0)
    clock = FrozenClock(T0)
    ring_a = KeyRing(store, bytes(range(32)), clock, eager)
    ring_a.ensure_initialized()
    ring_b = KeyRing(store, bytes(range(32)), clock, eager)
    ring_b.load()
    (first,) = _state(ring_a, KeyState.ACTIVE)
    clock.advance(86400)
    assert ring_a.rotate_if_due() is True
    assert ring_b.rotate_if_due() is False
    assert _state(ring_b, KeyState.RETIRED) == [first]  # and B now holds A's ring
    assert ring_b.signing_key().kid == ring_a.signing_key().kid


def test_a_ring_initialised_elsewhere_is_used_not_replaced() -> None:
    store = MemoryKeyStore()
    ring_a = _ring(store)
    ring_b = _ring(store)
    assert ring_b.records() == ring_a.records()


def test_jwks_never_carries_a_private_member() -> None:
    ring = _ring()
    clock = _clock(ring)
    for _ in range(3):
        clock.advance(300)
        ring.rotate()
    states = {r.state for r in ring.records()}
    assert states == {KeyState.NEXT, KeyState.ACTIVE, KeyState.RETIRED}
    for jwk in ring.jwks()["keys"]:
        assert "d" not in jwk
        assert not PRIVATE_JWK_MEMBERS.intersection(jwk)
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert jwk["kid"] == jwk_thumbprint(jwk)
        assert public_key_from_jwk({k: v for k, v in jwk.items() if k != "kid"}).kid == jwk["kid"]


def test_private_keys_are_stored_encrypted() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    seed = ring.signing_key().seed()
    for rec in store.list_keys():
        assert rec.private_blob is not None
        assert seed not in rec.private_blob
        assert len(rec.private_blob) == 12 + 32 + 16  # nonce, seed, tag


def test_aad_binds_the_blob_to_its_kid() -> None:
    kek = random_bytes(32)
    seed = random_bytes(32)
    blob = encrypt_seed(kek, "kid-a", seed)
    assert decrypt_seed(kek, "kid-a", blob) == seed
    with pytest.raises(ConfigError) as err:
        decrypt_seed(kek, "kid-b", blob)
    assert err.value.details["key"] == "keys.kek"


def test_swapping_blobs_between_records_is_detected() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    active = next(r for r in store.list_keys() if r.state is KeyState.ACTIVE)
    nxt = next(r for r in store.list_keys() if r.state is KeyState.NEXT)
    store.put_key(dataclasses.replace(active, private_blob=nxt.private_blob))
    with pytest.raises(ConfigError):
        ring.load()


def test_active_record_whose_public_key_does_not_match_is_refused() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    active = next(r for r in store.list_keys() if r.state is KeyState.ACTIVE)
    nxt = next(r for r in store.list_keys() if r.state is KeyState.NEXT)
    store.put_key(dataclasses.replace(active, public_jwk=nxt.public_jwk))
    with pytest.raises(ConfigError):
        ring.load()


def test_wrong_kek_is_a_config_error() -> None:
    store = MemoryKeyStore()
    _ring(store, kek=bytes(range(32)))
    other = KeyRing(store, bytes(32), FrozenClock(T0), SETTINGS)
    with pytest.raises(ConfigError) as err:
        other.load()
    assert err.value.details["key"] == "keys.kek"


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_kek_of_the_wrong_length(length: int) -> None:
    with pytest.raises(ConfigError):
        KeyRing(MemoryKeyStore(), bytes(length), FrozenClock(T0))


@pytest.mark.parametrize("blob", [b"", b"short", bytes(12), bytes(27)])
def test_damaged_blob_is_a_config_error(blob: bytes) -> None:
    with pytest.raises(ConfigError):
        decrypt_seed(bytes(32), "kid", blob)


def test_a_rotation_by_another_process_is_found_on_a_kid_miss() -> None:
    store = MemoryKeyStore()
    ring_a = _ring(store)
    ring_b = KeyRing(store, bytes(range(32)), _clock(ring_a), SETTINGS)
    ring_b.load()
    _clock(ring_a).advance(300)
    ring_a.rotate()
    (new_next,) = _state(ring_a, KeyState.NEXT)
    assert new_next not in ring_b._snap.public
    assert ring_b.public_key(new_next) is not None


def test_unknown_kid_misses_reload_at_most_once_a_second() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    reads = _count_reads(store)
    for i in range(100):
        assert ring.public_key(f"nope-{i}") is None
    assert reads[0] == 1
    _clock(ring).advance(1)
    ring.public_key("nope")
    assert reads[0] == 2


def test_background_refresh_reads_the_store_until_the_ring_is_closed(tmp_path: Path) -> None:
    store = open_key_store(f"sqlite:///{tmp_path / 'keys.db'}")
    ring = KeyRing(store, bytes(range(32)), FrozenClock(T0), SETTINGS)
    ring.ensure_initialized()
    reads = _count_reads(store)
    ring.refresh_in_background(0.02)
    ring.refresh_in_background(0.02)  # one thread per ring
    deadline = time.monotonic() + 5
    while reads[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reads[0] >= 3
    ring.close()
    time.sleep(0.5)  # a read under way (or just begun) finishes
    after = reads[0]
    time.sleep(0.2)
    assert reads[0] == after  # a closed ring never reads its (soon closed) store again
    store.close()


def test_a_read_begun_before_a_rotation_here_is_not_installed_after_it() -> None:
    store = MemoryKeyStore()
    ring = _ring(store)
    _clock(ring).advance(300)
    stale = store.list_keys()
    original = store.list_keys

    def rotating_meanwhile() -> list:  # type: ignore[type-arg]
        store.list_keys = original  # type: ignore[method-assign]
        ring.rotate()  # this process rotates while the read is on its way
        return stale

    store.list_keys = rotating_meanwhile  # type: ignore[method-assign]
    before = ring.signing_key().kid
    # On a worker thread, bounded: a load that held the ring's lock through its read would
    # deadlock with the rotation here.
    loading = threading.Thread(target=ring.load, daemon=True)
    loading.start()
    loading.join(10)
    assert not loading.is_alive()
    assert ring.signing_key().kid != before  # the rotation stands; the stale read was dropped
    ring.load()  # a read begun after it is installed as usual
    assert ring.signing_key().kid == next(
        r.kid for r in store.list_keys() if r.state.value == "active"
    )


class _FlakyStore(MemoryKeyStore):
    down = False

    def list_keys(self) -> Any:
        if self.down:
            raise Unavailable("the key store is down", code="key_store_unavailable")
        return super().list_keys()


def test_a_key_store_outage_on_a_kid_miss_is_unavailable_not_an_unknown_key() -> None:
    """A token from a key this ring has not loaded, while the store cannot answer, is a 503 the
    client retries, never a 401 that has it throw a good token away."""
    store = _FlakyStore()
    control, gateway = _ring(store), KeyRing(store, bytes(range(32)), FrozenClock(T0), SETTINGS)
    gateway.load()
    for _ in range(2):  # the next key, then one the gateway never loaded, become active
        _clock(control).advance(400)
        _clock(gateway).advance(400)
        control.rotate()
    token = TokenIssuer(control, issuer=ISS, clock=_clock(control)).issue(
        agent_id="a", client_id="c", tenant="t", env="e", scopes=("s",), audience=(AUD,),
        lifetime=60,
    ).token  # fmt: skip
    store.down = True
    verifier = AccessTokenVerifier(
        gateway.public_key, issuer=ISS, audience=AUD, clock=_clock(gateway)
    )
    for _ in range(3):  # within the reload throttle too: still the store's outage
        with pytest.raises(Unavailable) as err:
            verifier.verify(token)
        assert err.value.code == "key_store_unavailable"
    store.down = False
    _clock(gateway).advance(1)
    verifier.verify(token)


def test_a_retired_key_verifies_longer_only_where_asked() -> None:
    """Past its overlap a retired key verifies no access token; a lookup that accepts keys
    retired within a window (a delegation chain's first link) finds it within that window."""
    ring = _ring()
    old = ring.signing_key().kid
    ring.rotate(force=True)
    _clock(ring).advance(OVERLAP)
    window = {"retired_within": OVERLAP + 60, "signed_at": T0}
    assert ring.public_key(old) is None
    assert ring.public_key(old, **window) is not None
    # Only for what the key signed while it was active: a leaked retired key mints nothing.
    assert ring.public_key(old, retired_within=OVERLAP + 60, signed_at=T0 + 60) is None
    assert ring.public_key(old, retired_within=OVERLAP + 60) is None
    ring.rotate(force=True)  # archived now: still within the window
    assert ring.public_key(old) is None
    assert ring.public_key(old, **window) is not None
    _clock(ring).advance(60)
    assert ring.public_key(old, **window) is None
