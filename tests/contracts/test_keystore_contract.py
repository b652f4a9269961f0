"""KeyStore contract: every SQL backend (SQLite, PostgreSQL) must pass each test here."""

from __future__ import annotations

import secrets
import threading
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aegis.errors import Conflict, InvalidRequest, NotFound, Unavailable
from aegis.stores.sql.keys import SqlKeyStore
from aegis.types import KeyState, SigningKeyRecord

T0 = 1_700_000_000.0


def key(kid: str, created_at: float = T0, **kw: object) -> SigningKeyRecord:
    base = SigningKeyRecord(
        kid=kid,
        alg="EdDSA",
        state=KeyState.NEXT,
        public_jwk={"kty": "OKP", "crv": "Ed25519", "x": f"x-{kid}", "kid": kid},
        private_blob=b"\x00nonce" + kid.encode() + b"\xff\x00ciphertext",
        created_at=created_at,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_put_and_list_in_creation_order(key_store: SqlKeyStore) -> None:
    assert key_store.list_keys() == []
    k2 = key("k2", T0 + 10, state=KeyState.ACTIVE, activated_at=T0 + 20)
    k1 = key("k1", T0, state=KeyState.RETIRED, retired_at=T0 + 5, remove_after=T0 + 50)
    hsm = key("k0", T0 + 10, private_blob=None, alg="ES256")
    for k in (k2, k1, hsm):
        key_store.put_key(k)
    # Ordered by created_at, then kid.
    assert key_store.list_keys() == [k1, hsm, k2]


def test_put_refuses_a_duplicate_kid(key_store: SqlKeyStore) -> None:
    key_store.put_key(key("k1"))
    with pytest.raises(Conflict):
        key_store.put_key(key("k1", private_blob=b"other"))
    assert key_store.list_keys() == [key("k1")]


def test_set_state_changes_only_what_it_is_given(key_store: SqlKeyStore) -> None:
    key_store.put_key(key("k1"))
    key_store.set_state("k1", KeyState.ACTIVE, activated_at=T0 + 1)
    assert key_store.list_keys() == [key("k1", state=KeyState.ACTIVE, activated_at=T0 + 1)]
    key_store.set_state("k1", KeyState.RETIRED, retired_at=T0 + 2, remove_after=T0 + 3)
    retired = key(
        "k1",
        state=KeyState.RETIRED,
        activated_at=T0 + 1,
        retired_at=T0 + 2,
        remove_after=T0 + 3,
    )
    assert key_store.list_keys() == [retired]
    with pytest.raises(NotFound):
        key_store.set_state("k9", KeyState.ACTIVE)
    with pytest.raises(NotFound):
        key_store.set_state("k1\x00", KeyState.ACTIVE)
    with pytest.raises(NotFound):
        key_store.set_state("\udc00", KeyState.ACTIVE)
    assert key_store.list_keys() == [retired]


def test_delete(key_store: SqlKeyStore) -> None:
    key_store.put_key(key("k1"))
    key_store.put_key(key("k2", T0 + 1))
    key_store.delete_key("k1")
    assert key_store.list_keys() == [key("k2", T0 + 1)]
    key_store.delete_key("k1")  # deleting what is gone is a no-op: retirement may run twice
    assert key_store.list_keys() == [key("k2", T0 + 1)]


def test_replace_all_swaps_the_whole_ring(key_store: SqlKeyStore) -> None:
    key_store.put_key(key("old", state=KeyState.ACTIVE))
    ring = [
        key("old", state=KeyState.RETIRED, retired_at=T0 + 9, remove_after=T0 + 99),
        key("cur", T0 + 1, state=KeyState.ACTIVE, activated_at=T0 + 9),
        key("nxt", T0 + 2),
    ]
    key_store.replace_all(ring)
    assert key_store.list_keys() == ring
    key_store.replace_all([])
    assert key_store.list_keys() == []


def test_replace_all_is_one_transaction(key_store: SqlKeyStore) -> None:
    ring = [key("a", state=KeyState.ACTIVE), key("b", T0 + 1)]
    key_store.replace_all(ring)
    # A duplicate kid makes the insert fail after the delete: nothing of the rotation may stay.
    with pytest.raises(Conflict):
        key_store.replace_all([key("c"), key("c", T0 + 1)])
    assert key_store.list_keys() == ring
    with pytest.raises(InvalidRequest):
        key_store.replace_all([key("d"), key("e" * 65)])
    assert key_store.list_keys() == ring


def test_readers_never_see_a_half_rotated_ring(key_store: SqlKeyStore) -> None:
    rings = [[key(f"r{n}-{i}", T0 + i) for i in range(4)] for n in range(2)]
    key_store.replace_all(rings[0])
    stop = threading.Event()
    seen: list[list[str]] = []

    def read() -> None:
        while not stop.is_set():
            seen.append([k.kid for k in key_store.list_keys()])

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(20):
            key_store.replace_all(rings[n % 2])
    finally:
        stop.set()
        reader.join(10)
    allowed = [[k.kid for k in ring] for ring in rings]
    assert seen
    assert all(kids in allowed for kids in seen), [k for k in seen if k not in allowed][:3]


def test_secrets_do_not_reach_error_messages(key_store: SqlKeyStore) -> None:
    """Driver errors carry the statement's parameters; the private blob must not be among them."""
    marker = f"secret-{secrets.token_hex(8)}".encode()
    key_store.put_key(key("k1"))
    with pytest.raises(Conflict) as info:
        key_store.put_key(key("k1", private_blob=marker))
    chain = []
    exc: BaseException | None = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert len(chain) > 1
    text = "\n".join(chain)
    assert marker.decode() not in text
    assert marker.hex() not in text


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(blob=st.binary(max_size=4096), jwk_x=st.text(max_size=100))
def test_blobs_round_trip_byte_exact(key_store: SqlKeyStore, blob: bytes, jwk_x: str) -> None:
    record = key("k", private_blob=blob, public_jwk={"kty": "OKP", "x": jwk_x})
    key_store.replace_all([record])
    [stored] = key_store.list_keys()
    assert stored == record
    assert type(stored.private_blob) is bytes
    assert stored.private_blob == blob


def test_an_unreachable_database_is_key_store_unavailable() -> None:
    store = SqlKeyStore("postgresql+psycopg://postgres@127.0.0.1:1/none")
    try:
        with pytest.raises(Unavailable) as info:
            store.list_keys()
        assert info.value.code == "key_store_unavailable"
        with pytest.raises(Unavailable):
            store.replace_all([key("k1")])
    finally:
        store.close()
