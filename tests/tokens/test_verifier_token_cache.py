"""The accepted-token cache of AccessTokenVerifier saves parsing, the claim checks that do not
depend on time and, while the key ring still serves the very key the signature verified with, the
signature check: every use still resolves the key and checks the time claims, and verifies the
signature again with any other key, so a key that is removed, retired past its overlap or replaced,
a token that expires or is not yet valid, and rules replaced since, are refused on the next call."""

from __future__ import annotations

import dataclasses

import pytest

from aegis.clock import FrozenClock
from aegis.crypto.jws import encode_segment
from aegis.crypto.keys import Ed25519PublicKey, Ed25519SigningKey, PublicKey
from aegis.errors import TokenError
from aegis.tokens.verifier import MAX_VERIFIED_TOKENS, AccessTokenVerifier
from tests.tokens.test_verifier_adversarial import (
    AUD,
    ISS,
    LEEWAY,
    T0,
    Env,
    _retired_signer,
    env,
    raw_token,
)

__all__ = ["env"]  # the fixture, shared with the adversarial suite


def test_a_cached_token_is_refused_once_its_key_is_retired_past_the_overlap(env: Env) -> None:
    old_kid = env.key.kid
    env.clock.advance(301)
    env.ring.rotate()
    remove_after = T0 + 301 + 3600 + LEEWAY
    # Signed with the retired key (say, leaked) and valid well past the key's removal.
    token = env.token(
        env.header(kid=old_kid),
        env.claims(iat=remove_after - 10, nbf=remove_after - 10, exp=remove_after + 60),
        signer=_retired_signer(env, old_kid),
    )
    env.clock.set(remove_after - 1)
    env.verify(token)
    env.verify(token)
    assert token in env.verifier._verified
    env.clock.set(remove_after)
    env.refuse(token, "unknown_key")


def test_a_cached_token_is_refused_when_its_kid_no_longer_resolves() -> None:
    key = Ed25519SigningKey.generate()
    keys: dict[str, PublicKey] = {key.kid: key.public}
    verifier, token = _verifier(keys.get, key)
    verifier.verify(token)
    verifier.verify(token)
    del keys[key.kid]  # removed from the key ring
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "unknown_key"


def test_a_cached_token_is_refused_when_its_kid_resolves_to_another_key() -> None:
    key = Ed25519SigningKey.generate()
    keys: dict[str, PublicKey] = {key.kid: key.public}
    verifier, token = _verifier(keys.get, key)
    verifier.verify(token)
    keys[key.kid] = Ed25519SigningKey.generate().public  # same kid, different key
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_signature"
    keys[key.kid] = key.public
    assert verifier.verify(token).jti == "jti-1"


def test_a_cached_token_expires_at_the_same_instant_as_an_uncached_one(env: Env) -> None:
    token = env.token()
    env.verify(token)
    env.clock.set(T0 + 300 + LEEWAY - 1)
    env.verify(token)
    env.clock.set(T0 + 300 + LEEWAY)
    env.refuse(token, "token_expired")


def test_only_accepted_tokens_are_cached_and_a_forged_signature_is_never_a_hit(env: Env) -> None:
    good = env.token()
    env.verify(good)
    forged = good[: good.rindex(".") + 1] + good[good.rindex(".") + 1 :][::-1]
    for _ in range(3):
        with pytest.raises(TokenError):
            env.verify(forged)
    assert forged not in env.verifier._verified
    other = Ed25519SigningKey.generate()
    h, p, _ = good.split(".")
    resigned = raw_token(h, p, other.sign)  # same header and claims, someone else's signature
    env.refuse(resigned, "invalid_signature")
    assert set(env.verifier._verified) == {good}


def test_a_cached_token_not_yet_valid_or_issued_in_the_future_is_refused_at_that_instant() -> None:
    key = Ed25519SigningKey.generate()
    clock = FrozenClock(T0 + 10 - LEEWAY)
    verifier, _ = _verifier({key.kid: key.public}.get, key, clock)
    early, plain = _token(key, nbf=T0 + 10), _token(key, jti="jti-2")
    verifier.verify(early)
    verifier.verify(plain)
    assert {early, plain} <= set(verifier._verified)
    clock.set(T0 + 10 - LEEWAY - 1)  # before nbf (beyond the skew) again
    with pytest.raises(TokenError) as err:
        verifier.verify(early)
    assert err.value.code == "token_not_yet_valid"
    clock.set(T0 - LEEWAY - 1)  # iat is now in the future, beyond the skew
    with pytest.raises(TokenError) as err:
        verifier.verify(plain)
    assert err.value.code == "token_issued_in_future"


def test_a_cached_token_is_checked_whole_again_under_replaced_rules() -> None:
    key = Ed25519SigningKey.generate()
    verifier, token = _verifier({key.kid: key.public}.get, key)
    verifier.verify(token)
    verifier.verify(token)
    verifier.rules = dataclasses.replace(verifier.rules, audience="https://other.example")
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_audience"
    verifier.rules = dataclasses.replace(verifier.rules, audience=AUD, issuer="https://elsewhere")
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_issuer"


def test_the_cache_is_bounded() -> None:
    key = Ed25519SigningKey.generate()
    verifier, _ = _verifier({key.kid: key.public}.get, key)
    for i in range(MAX_VERIFIED_TOKENS + 5):
        verifier.verify(_token(key, jti=f"jti-{i}"))
        assert len(verifier._verified) <= MAX_VERIFIED_TOKENS


class _Counting:
    """A verification key that counts its signature checks."""

    def __init__(self, key: PublicKey) -> None:
        self.key, self.kid, self.algs, self.checks = key, key.kid, key.algs, 0

    def verify(self, message: bytes, signature: bytes) -> None:
        self.checks += 1
        self.key.verify(message, signature)

    def to_jwk(self) -> dict[str, object]:
        return self.key.to_jwk()


def test_the_signature_is_checked_once_while_the_ring_serves_the_same_key() -> None:
    key = Ed25519SigningKey.generate()
    counting = _Counting(key.public)
    keys: dict[str, PublicKey] = {key.kid: counting}
    verifier, token = _verifier(keys.get, key)
    for _ in range(5):
        assert verifier.verify(token).jti == "jti-1"
    assert counting.checks == 1
    other = _Counting(key.public)  # another object for the same kid: checked again, once
    keys[key.kid] = other
    for _ in range(3):
        verifier.verify(token)
    assert (counting.checks, other.checks) == (1, 1)


def test_a_reloaded_ring_with_the_same_key_bytes_needs_no_new_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aegis.crypto.keys as keys_module

    key = Ed25519SigningKey.generate()
    keys: dict[str, PublicKey] = {key.kid: key.public}
    verifier, token = _verifier(keys.get, key)
    verifier.verify(token)
    real, checks = keys_module._crypto_sign_open, []

    def counted(signed: bytes, pk: bytes) -> bytes:
        checks.append(pk)
        return real(signed, pk)

    monkeypatch.setattr(keys_module, "_crypto_sign_open", counted)
    keys[key.kid] = Ed25519PublicKey(key.public.raw)  # what a reload of the ring builds
    verifier.verify(token)
    assert checks == []
    keys[key.kid] = Ed25519SigningKey.generate().public  # other bytes under the same kid
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_signature"
    assert len(checks) == 1


def test_the_cache_remembers_the_key_that_verified_not_a_later_lookup() -> None:
    """The ring may change between the check and the caching (a reload in between): the entry
    must name the key the signature verified with, or a later call resolving the new key would
    skip a check that key never passed."""
    key, swapped = Ed25519SigningKey.generate(), Ed25519SigningKey.generate().public
    served: list[PublicKey] = [key.public]

    def resolve(kid: str) -> PublicKey | None:
        return served.pop(0) if served else swapped  # the real key once, then another

    verifier, token = _verifier(resolve, key)
    assert verifier.verify(token).jti == "jti-1"
    with pytest.raises(TokenError) as err:
        verifier.verify(token)
    assert err.value.code == "invalid_signature"


def _verifier(
    resolve: object, key: Ed25519SigningKey, clock: FrozenClock | None = None
) -> tuple[AccessTokenVerifier, str]:
    verifier = AccessTokenVerifier(
        resolve,  # type: ignore[arg-type]
        issuer=ISS,
        audience=AUD,
        clock=clock or FrozenClock(T0),
        leeway=LEEWAY,
    )
    return verifier, _token(key)


def _token(key: Ed25519SigningKey, jti: str = "jti-1", nbf: float | None = None) -> str:
    claims = {
        "iss": ISS, "sub": "agent-1", "aud": AUD, "exp": T0 + 300, "iat": T0, "jti": jti,
        "client_id": "client-1", "tenant": "acme", "env": "prod", "agent_id": "agent-1",
    }  # fmt: skip
    if nbf is not None:
        claims["nbf"] = nbf
    header = encode_segment({"alg": "EdDSA", "typ": "at+jwt", "kid": key.kid})
    return raw_token(header, encode_segment(claims), key.sign)
