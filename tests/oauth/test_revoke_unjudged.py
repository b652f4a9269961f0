"""RFC 7009: a revocation the server could not carry out is never answered as done. A token
whose key this replica cannot load (rotated in by another replica while the key store is
unavailable) cannot be judged: 503, not the 200 an invalid token gets."""

from __future__ import annotations

import os

import pytest

from aegis.crypto.keyring import KeyRing
from aegis.errors import AegisError, Unavailable
from aegis.oauth.service import TokenService
from aegis.stores.memory import MemoryRevocationStore
from aegis.tokens.issuer import TokenIssuer
from aegis.tokens.verifier import AccessTokenVerifier
from aegis.types import SigningKeyRecord
from tests.crypto.fakes import MemoryKeyStore
from tests.support.delegation import ISSUER, World


class FlakyKeyStore(MemoryKeyStore):
    down = False

    def list_keys(self) -> list[SigningKeyRecord]:
        if self.down:
            raise Unavailable("key store down", code="key_store_unavailable")
        return super().list_keys()


async def test_a_token_that_cannot_be_judged_is_not_reported_revoked() -> None:
    w = World()
    victim = w.agent("victim")
    store, kek = FlakyKeyStore(), os.urandom(32)
    rotating = KeyRing(store, kek, w.clock)
    rotating.ensure_initialized()
    lagging = KeyRing(store, kek, w.clock)
    lagging.load()
    rotating.rotate(force=True)
    rotating.rotate(force=True)  # the active key is now one the lagging replica never saw
    token = TokenIssuer(rotating, issuer=ISSUER, clock=w.clock).issue(
        agent_id="victim", client_id=victim.client_id, tenant="acme", env="prod",
        scopes=("payments:read",), audience=("aegis-gateway",), lifetime=300,
    ).token  # fmt: skip
    revocation = MemoryRevocationStore(w.clock)
    verifier = AccessTokenVerifier(lagging.public_key, issuer=ISSUER, audience=None, clock=w.clock)
    service = TokenService(
        issuer=TokenIssuer(lagging, issuer=ISSUER, clock=w.clock), verifier=verifier,
        cache=w.cache, revocation=revocation, clock=w.clock, audiences=("aegis-gateway",),
        default_lifetime=300, max_lifetime=3600,
    )  # fmt: skip
    await service.revoke("not.a.token", client_id=None)  # invalid: silently nothing (§2.2)
    store.down = True
    w.clock.advance(2)  # past the reload throttle after an unknown kid
    with pytest.raises(AegisError) as info:
        await service.revoke(token, client_id=None)
    assert info.value.code == "key_store_unavailable" and info.value.status == 503
    store.down = False
    w.clock.advance(2)
    await service.revoke(token, client_id=None)  # the store is back: revoked for real
    verified = verifier.verify(token)
    with pytest.raises(AegisError) as revoked:
        await revocation.check(verified.jti, (), verified.iat)
    assert revoked.value.code == "token_revoked"
